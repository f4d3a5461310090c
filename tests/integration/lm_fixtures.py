"""Pytest fixtures for real HTTP LMs: the loopback SIMULATED server and DSPy clients of it.

tests/conftest.py registers this module as a plugin, so any test can ask for ``lm_server``.
Nothing here reaches the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dspex_jupyter.testing.lm_server import SimulatedLMServer

TEST_KEY = "sk-dspex-test-key"
# DSPy fetches a model-price map from GitHub on its first LM call (5 s timeout) unless
# told to use its bundled copy: offline tests and pool kernels set this.
OFFLINE_DSPY_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "true"}


def http_lm(server: SimulatedLMServer, task: str = "arithmetic", **kwargs: Any) -> Any:
    """DSPy's own client for the server (no cache: every call is a real request)."""
    import dspy

    kwargs.setdefault("api_key", TEST_KEY)
    kwargs.setdefault("cache", False)
    return dspy.LM(f"openai/{task}", api_base=server.url, **kwargs)


@pytest.fixture
def lm_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[SimulatedLMServer]:
    """A started loopback server (key ``TEST_KEY``, seed 0), stopped after the test."""
    for name, value in OFFLINE_DSPY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "dspy-cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with SimulatedLMServer(api_key=TEST_KEY, seed=0) as server:
        yield server


def ask_lm(api_base: str, model: str = "openai/arithmetic", **lm_kwargs: Any) -> str:
    """Runs in a pool kernel: one Predict through DSPy's own client (no cache)."""
    import dspy

    lm = dspy.LM(model, api_base=api_base, cache=False, **lm_kwargs)
    with dspy.context(lm=lm):
        return str(dspy.Predict("question -> answer")(question="What is 2 + 3?").answer)
