"""In-process: the step-wise BootstrapFewShotWithRandomSearch, COPRO and SIMBA give what
upstream's ``compile`` gives, and a run cut short after any step and resumed from that
step's JSON snapshot ends the same. Real DSPy with the SIMULATED LM (offline)."""

from __future__ import annotations

import dspy
import pytest
from dspy.teleprompt import COPRO, SIMBA, BootstrapFewShotWithRandomSearch

from dspex_jupyter.checkpoint import CheckpointError
from dspex_jupyter.runtime.bootstrap_rs import ResumableRandomSearch
from dspex_jupyter.runtime.copro import ResumableCOPRO
from dspex_jupyter.runtime.simba import ResumableSIMBA
from tests.integration import optimizer_fidelity_helpers as fx


@pytest.fixture(scope="module")
def small():
    return fx.task()


@pytest.fixture(scope="module")
def lm(small):
    return small.lm()


class TwoPredictors(dspy.Module):
    """COPRO re-scores every candidate when a program has several predictors."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("review -> sentiment")
        self.final = dspy.Predict("review -> sentiment")

    def forward(self, review: str) -> dspy.Prediction:
        self.draft(review=review)
        return self.final(review=review)


# ---- BootstrapFewShotWithRandomSearch: exact ---------------------------------------------
def _bootstrap_rs(small, lm, cls, hooks=None, **extra):
    tp = fx.bootstrap_rs(small.metric, cls, **({"hooks": hooks} if hooks else {}), **extra)
    return fx.with_lm(
        lm, lambda: tp.compile(small.make_program(), trainset=small.trainset, valset=small.valset)
    )


@pytest.fixture(scope="module")
def bootstrap_rs_upstream(small, lm):
    return fx.bootstrap_rs_outcome(_bootstrap_rs(small, lm, BootstrapFewShotWithRandomSearch))


def test_bootstrap_rs_matches_upstream(small, lm, bootstrap_rs_upstream):
    hooks = fx.SnapshotHooks()
    ours = fx.bootstrap_rs_outcome(_bootstrap_rs(small, lm, ResumableRandomSearch, hooks))
    assert ours == bootstrap_rs_upstream
    assert [p["seed"] for _, p in hooks.steps] == [-3, -2, -1, 0, 1, 2]
    assert [p["step"] for _, p in hooks.steps] == [1, 2, 3, 4, 5, 6]
    assert all(p["total"] == 6 for _, p in hooks.steps)
    scores = [p["score"] for _, p in hooks.steps]
    assert [p["best_score"] for _, p in hooks.steps][-1] == max(scores)
    # Not a trivial run: the candidates differ in their demos and their scores.
    assert len({repr(c[3]) for c in bootstrap_rs_upstream["candidates"]}) > 1
    assert len({c[1] for c in bootstrap_rs_upstream["candidates"]}) > 1


@pytest.mark.parametrize("crash_after", [1, 3, 5])
def test_bootstrap_rs_resumes_exactly(small, lm, bootstrap_rs_upstream, crash_after):
    result, cut = fx.crash_and_resume(
        lambda hooks: _bootstrap_rs(small, lm, ResumableRandomSearch, hooks), crash_after
    )
    assert len(cut.last["candidates"]) == crash_after
    assert fx.bootstrap_rs_outcome(result) == bootstrap_rs_upstream


def test_bootstrap_rs_stop_at_score_matches_upstream(small, lm):
    upstream = _bootstrap_rs(small, lm, BootstrapFewShotWithRandomSearch, stop_at_score=50.0)
    ours = _bootstrap_rs(small, lm, ResumableRandomSearch, stop_at_score=50.0)
    assert fx.bootstrap_rs_outcome(ours) == fx.bootstrap_rs_outcome(upstream)
    assert len(ours.candidate_programs) < 6


def test_bootstrap_rs_refuses_a_snapshot_of_other_seeds(small, lm):
    cut = fx.SnapshotHooks(crash_after=2)
    with pytest.raises(fx.StepCrash):
        _bootstrap_rs(small, lm, ResumableRandomSearch, cut)
    resumed = fx.SnapshotHooks(restored=cut.last)
    with pytest.raises(CheckpointError, match="seeds"):
        _bootstrap_rs(small, lm, ResumableRandomSearch, resumed, num_candidate_programs=5)


# ---- COPRO: per depth --------------------------------------------------------------------
def _copro(small, lm, cls, hooks=None, make=None, examples=None):
    tp = fx.copro(small.metric, lm, cls, **({"hooks": hooks} if hooks else {}))
    program = (make or small.make_program)()
    trainset = small.trainset[:examples]
    return fx.with_lm(
        lm, lambda: tp.compile(program, trainset=trainset, eval_kwargs=fx.COPRO_EVAL_KWARGS)
    )


@pytest.mark.parametrize(
    ("make", "examples", "crash_points"),
    [
        (None, None, (1, 3)),  # after the first proposals; after depth 2 of 3
        (TwoPredictors, 6, (2,)),  # every candidate re-scored at every depth: fewer examples
    ],
    ids=["one_predictor", "two_predictors"],
)
def test_copro_matches_upstream_and_resumes_per_depth(small, lm, make, examples, crash_points):
    upstream = fx.copro_outcome(_copro(small, lm, COPRO, make=make, examples=examples))
    hooks = fx.SnapshotHooks()
    ours = _copro(small, lm, ResumableCOPRO, hooks, make, examples)
    assert fx.copro_outcome(ours) == upstream
    assert [(phase, p["step"]) for phase, p in hooks.steps] == [
        ("propose", 0),
        ("depth", 1),
        ("depth", 2),
        ("depth", 3),
    ]
    assert hooks.steps[-1][1]["best_score"] == upstream["candidates"][0][0]
    for crash_after in crash_points:
        result, _ = fx.crash_and_resume(
            lambda h: _copro(small, lm, ResumableCOPRO, h, make, examples), crash_after
        )
        assert fx.copro_outcome(result) == upstream


# ---- SIMBA: per mini-batch step ------------------------------------------------------------
def _simba(small, lm, cls, hooks=None):
    tp = fx.simba(small.metric, lm, cls, **({"hooks": hooks} if hooks else {}))
    return fx.with_lm(
        lm, lambda: tp.compile(small.make_program(), trainset=small.trainset, seed=fx.SIMBA_SEED)
    )


@pytest.fixture(scope="module")
def simba_upstream(small, lm):
    return fx.simba_outcome(_simba(small, lm, SIMBA))


def test_simba_matches_upstream(small, lm, simba_upstream):
    hooks = fx.SnapshotHooks()
    best = _simba(small, lm, ResumableSIMBA, hooks)
    assert fx.simba_outcome(best) == simba_upstream
    assert [p["step"] for _, p in hooks.steps] == [1, 2, 3]
    assert all(p["batch_size"] == 4 for _, p in hooks.steps)
    assert [phase for phase, _ in hooks.started] == ["step", "step", "step", "validate"]
    # Not a trivial run: with the simulated LM, SIMBA's program beats the one it started from.
    trainset = small.trainset
    assert small.evaluate(best, lm=lm, devset=trainset) > small.evaluate(lm=lm, devset=trainset)


@pytest.mark.parametrize("crash_after", [1, 2, 3])
def test_simba_resumes_from_the_last_step(small, lm, simba_upstream, crash_after):
    result, cut = fx.crash_and_resume(
        lambda hooks: _simba(small, lm, ResumableSIMBA, hooks), crash_after
    )
    assert cut.last["step"] == crash_after
    assert fx.simba_outcome(result) == simba_upstream


def test_simba_refuses_a_snapshot_of_another_seed(small, lm):
    cut = fx.SnapshotHooks(crash_after=1)
    with pytest.raises(fx.StepCrash):
        _simba(small, lm, ResumableSIMBA, cut)
    tp = fx.simba(small.metric, lm, ResumableSIMBA, hooks=fx.SnapshotHooks(restored=cut.last))
    with pytest.raises(CheckpointError, match="seed"):
        fx.with_lm(lm, lambda: tp.compile(small.make_program(), trainset=small.trainset, seed=7))
