"""The loopback SIMULATED LM server, driven by DSPy's own client over real HTTP, and LM
provider failures classified from real pool kernels."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import dspy
import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMRateLimitError,
    LMServerError,
    LMTransportError,
    LMUnsupportedModelError,
)

from dspex_jupyter.core.errors import (
    LMAuthenticationFailed,
    LMBillingFailed,
    LMModelNotFound,
    LMRateLimited,
    LMTimedOut,
    LMUnavailable,
    RemoteError,
)
from dspex_jupyter.testing import get_task, simulated_lm
from dspex_jupyter.testing.lm_server import SimulatedLMServer
from tests.integration.lm_fixtures import OFFLINE_DSPY_ENV, TEST_KEY, http_lm

pytestmark = pytest.mark.integration


def _get(url: str, key: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_answers_are_the_simulated_models(lm_server):
    task = get_task("arithmetic")
    over_http = task.evaluate(lm=http_lm(lm_server), devset=task.valset[:12], num_threads=4)
    in_process = task.evaluate(lm=simulated_lm("arithmetic"), devset=task.valset[:12])
    assert over_http == in_process
    assert lm_server.requests == 12
    assert lm_server.statuses == {200: 12}


def test_usage_is_reported(lm_server):
    lm = http_lm(lm_server)
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="What is 2 + 3?")
    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_models_listing_needs_the_key(lm_server):
    status, body = _get(f"{lm_server.url}/models", None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _get(f"{lm_server.url}/models", TEST_KEY)
    assert status == 200
    assert {"arithmetic", "sentiment", "capitals", "generic"} <= {m["id"] for m in body["data"]}


def test_wrong_key_is_an_auth_error(lm_server):
    with pytest.raises(LMAuthError) as info:
        http_lm(lm_server, api_key="sk-wrong")("hello")
    assert info.value.status == 401
    assert lm_server.statuses == {401: 1}  # DSPy does not retry an auth failure


def test_unknown_model_is_reported_as_such(lm_server):
    with pytest.raises(LMUnsupportedModelError):
        http_lm(lm_server, task="gpt-nothing")("hello")


def test_injected_context_window_error(lm_server):
    lm_server.fail_next(400, code="context_length_exceeded", message="maximum context length")
    with pytest.raises(ContextWindowExceededError):
        http_lm(lm_server)("hello")


def test_rate_limit_honours_retry_after(lm_server):
    """DSPy 3.4.1 waits what Retry-After says (``execution._delay``), not its own backoff
    (1 s on the first retry): 1.3 s here, so the call cannot be quicker than that."""
    lm_server.rate_limit_every(2, retry_after=1.3)
    lm = http_lm(lm_server, task="generic")
    lm("one")  # request 1: answered
    started = time.monotonic()
    lm("two")  # request 2: 429, waits Retry-After, request 3 answered
    assert time.monotonic() - started >= 1.3
    assert lm_server.statuses == {200: 2, 429: 1}
    assert lm_server.retry_after_sent == pytest.approx(1.3)


def test_rate_limit_that_persists_surfaces_after_retries(lm_server):
    lm_server.fail_next(429, count=2, retry_after=0.01)
    with pytest.raises(LMRateLimitError) as info:
        http_lm(lm_server, task="generic", num_retries=1)("hello")
    assert info.value.retry_after == pytest.approx(0.01)
    assert lm_server.requests == 2


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_then_answered(lm_server, status):
    lm_server.fail_next(status, retry_after=0.01)
    assert http_lm(lm_server, task="generic")("hello")
    assert lm_server.statuses == {status: 1, 200: 1}


def test_server_error_without_retries_is_raised(lm_server):
    lm_server.fail_next(500)
    with pytest.raises(LMServerError):
        http_lm(lm_server, task="generic", num_retries=0)("hello")


def test_latency_is_added(lm_server):
    lm = http_lm(lm_server, task="generic")
    lm("warm")
    lm_server.set_latency(0.2)
    started = time.monotonic()
    lm("slow")
    assert time.monotonic() - started >= 0.2


def test_hang_and_release(lm_server):
    lm_server.hang()
    answers: list[object] = []
    caller = threading.Thread(target=lambda: answers.append(http_lm(lm_server)("hello")))
    caller.start()
    assert lm_server.wait_for_hung(1, timeout=10)
    assert answers == [] and caller.is_alive()
    lm_server.release()
    caller.join(timeout=10)
    assert not caller.is_alive() and len(answers) == 1
    assert lm_server.hung == 0


def test_a_hung_request_times_out_on_the_client(lm_server):
    lm_server.hang()
    with pytest.raises(LMTransportError, match="timed out"):
        http_lm(lm_server, num_retries=0, timeout=0.3)("hello")
    assert lm_server.hung == 1
    lm_server.stop()  # stop() drops what still hangs
    assert lm_server.hung == 0


def test_go_down_and_come_back_on_the_same_port(lm_server):
    lm = http_lm(lm_server, task="generic", num_retries=0)
    lm("up")  # leaves a keep-alive connection in the client's pool
    port = lm_server.port
    lm_server.go_down()
    with pytest.raises(LMTransportError, match="refused"):
        lm("down")
    lm_server.come_back()
    assert lm_server.port == port
    assert lm("back")


def test_wait_for_requests_is_event_based(lm_server):
    assert not lm_server.wait_for_requests(1, timeout=0.05)
    caller = threading.Thread(target=lambda: http_lm(lm_server, task="generic")("x"))
    caller.start()
    assert lm_server.wait_for_requests(1, timeout=10)
    caller.join(timeout=10)


def test_stopped_server_refuses_and_cannot_come_back():
    with SimulatedLMServer(api_key=TEST_KEY) as server:
        url = server.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/models", timeout=5)
    with pytest.raises(RuntimeError):
        server.come_back()


def test_bad_injection_arguments():
    server = SimulatedLMServer()
    with pytest.raises(ValueError):
        server.fail_next(500, count=0)
    with pytest.raises(ValueError):
        server.set_latency(-1)
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018 (not started)


# ---------------------------------------------------------------- classified in real kernels

ASK = "tests.integration.lm_fixtures:ask_lm"


@pytest.fixture(scope="module")
def lm_pool(tmp_path_factory):
    from dspex_jupyter import PoolManager, PoolSpec

    env = {**OFFLINE_DSPY_ENV, "DSPY_CACHEDIR": str(tmp_path_factory.mktemp("dspy-cache"))}
    with PoolManager([PoolSpec("lm", size=1, env_vars=env)]) as manager:
        yield manager["lm"]


def _raised(pool, *args, **kwargs) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        pool.call(ASK, *args, **kwargs)
    return info.value


def test_kernel_call_through_the_server(lm_pool, lm_server):
    assert lm_pool.call(ASK, lm_server.url, api_key=TEST_KEY) == "5"
    assert lm_server.statuses == {200: 1}


def test_wrong_key_in_a_kernel(lm_pool, lm_server):
    error = _raised(lm_pool, lm_server.url, api_key="sk-wrong")
    assert type(error) is LMAuthenticationFailed
    assert error.remote_type == "LMAuthError" and error.kind == "auth"
    assert "put OPENAI_API_KEY in PoolSpec(env_vars=...) of pool 'lm'" in error.hint


def test_no_key_in_a_kernel(lm_pool, lm_server):
    assert lm_pool.call("tests.integration.helpers:env", "OPENAI_API_KEY") is None
    error = _raised(lm_pool, lm_server.url)
    assert type(error) is LMAuthenticationFailed
    assert error.remote_type == "LMNotConfiguredError"
    assert "OPENAI_API_KEY" in error.hint and "'lm'" in error.hint
    assert lm_server.requests == 0  # refused before any request


def test_rate_limit_after_retries_in_a_kernel(lm_pool, lm_server):
    lm_server.fail_next(429, count=3, retry_after=0.01)
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY, num_retries=2)
    assert type(error) is LMRateLimited
    assert error.retry_after == pytest.approx(0.01)
    assert "rate-limited; it asked for 0.01 s" in error.hint
    assert lm_server.statuses == {429: 3}


def test_retry_after_is_honoured_in_a_kernel(lm_pool, lm_server):
    """The LM that travels to the kernel keeps DSPy's own retry policy, which follows
    Retry-After: 1.3 s waited here where DSPy's fixed backoff would wait 1 s."""
    lm_server.fail_next(429, retry_after=1.3)

    def timed_ask(url: str) -> float:
        import time

        from tests.integration.lm_fixtures import ask_lm

        started = time.monotonic()
        ask_lm(url, api_key=TEST_KEY)
        return time.monotonic() - started

    assert lm_pool.call(timed_ask, lm_server.url) >= 1.3
    assert lm_server.statuses == {429: 1, 200: 1}


def test_server_errors_after_retries_in_a_kernel(lm_pool, lm_server):
    lm_server.fail_next(503, count=2, retry_after=0.01)
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY, num_retries=1)
    assert type(error) is LMUnavailable
    assert "pool 'lm'" in error.hint


def test_connection_refused_in_a_kernel(lm_pool, lm_server):
    lm_server.go_down()
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY, num_retries=0)
    assert type(error) is LMUnavailable and error.remote_type == "LMTransportError"
    lm_server.come_back()
    assert lm_pool.call(ASK, lm_server.url, api_key=TEST_KEY) == "5"


def test_timeout_in_a_kernel(lm_pool, lm_server):
    lm_server.hang()
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY, num_retries=0, timeout=0.5)
    assert type(error) is LMTimedOut
    assert "timeout=" in error.hint
    lm_server.release()


def test_unknown_model_in_a_kernel(lm_pool, lm_server):
    error = _raised(lm_pool, lm_server.url, "openai/gpt-nothing", api_key=TEST_KEY)
    assert type(error) is LMModelNotFound
    assert "openai/gpt-nothing" in error.hint


def test_billing_in_a_kernel(lm_pool, lm_server):
    lm_server.fail_next(402, code="insufficient_quota", message="You exceeded your quota.")
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY)
    assert type(error) is LMBillingFailed and "OPENAI_API_KEY" in error.hint


def test_context_window_stays_the_programs_failure(lm_pool, lm_server):
    lm_server.fail_next(400, code="context_length_exceeded", message="maximum context length")
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY)
    assert type(error) is RemoteError
    assert error.remote_type == "ContextWindowExceededError"
    assert "lm_failure" not in error.details


def test_content_policy_stays_the_programs_failure(lm_pool, lm_server):
    lm_server.fail_next(400, code="content_policy_violation", message="blocked by policy")
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY)
    assert type(error) is RemoteError and error.remote_type == "LMInvalidRequestError"


@pytest.mark.parametrize(
    ("status", "kind", "error_class"),
    [
        (401, "auth", LMAuthenticationFailed),
        (429, "rate_limited", LMRateLimited),
        (503, "unavailable", LMUnavailable),
        (404, "model_not_found", LMModelNotFound),
    ],
)
def test_litellm_engine_is_classified_too(lm_pool, lm_server, status, kind, error_class):
    lm_server.fail_next(status)
    error = _raised(lm_pool, lm_server.url, api_key=TEST_KEY, num_retries=0, engine="litellm")
    assert type(error) is error_class and error.kind == kind
    assert error.hint


def test_lm_failure_in_code_executed_in_a_session(lm_pool, lm_server):
    """An execute reply names only the exception's type (``%%dspex run`` cells): DSPy's LM
    errors are still recognised, with the model read from DSPy's message."""
    code = (
        "import dspy\n"
        f"lm = dspy.LM('openai/arithmetic', api_base={lm_server.url!r}, api_key='sk-wrong',"
        " cache=False)\n"
        "lm('hello')\n"
    )
    with lm_pool.session() as session, pytest.raises(LMAuthenticationFailed) as info:
        session.execute(code, show=False)
    assert info.value.model == "openai/arithmetic"
    assert "put OPENAI_API_KEY in PoolSpec(env_vars=...) of pool 'lm'" in info.value.hint
