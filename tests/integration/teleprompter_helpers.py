"""Teleprompters and helpers for the generic-path tests, importable inside pool kernels
(classes defined here travel by reference, as a user's own package would)."""

from __future__ import annotations

from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from dspex_jupyter.testing import capitals


def task():
    return capitals()  # dspy.Predict: cheap, and its state is JSON


class FirstDemos(Teleprompter):
    """A user's own optimizer: the first ``k`` training examples as every predictor's
    demos, scored once on the valset with ``dspy.Evaluate`` (the program's ``score``)."""

    def __init__(self, metric: Any, k: int = 2) -> None:
        self.metric = metric
        self.k = k

    def compile(self, student: Any, *, trainset: list, valset: list | None = None) -> Any:
        program = student.deepcopy()
        for predictor in program.predictors():
            predictor.demos = list(trainset[: self.k])
        evaluate = dspy.Evaluate(devset=valset or trainset, metric=self.metric, num_threads=1)
        program.score = evaluate(program).score
        return program


class MetricRounds(Teleprompter):
    """Calls its metric ``rounds`` times on the trainset's labels (pure Python, no LM):
    a long run that a cancel stops at its next metric call."""

    def __init__(self, metric: Any, rounds: int) -> None:
        self.metric = metric
        self.rounds = rounds

    def compile(self, student: Any, *, trainset: list) -> Any:
        for _ in range(self.rounds):
            for example in trainset:
                self.metric(example, dspy.Prediction(**example.labels()))
        return student


def letter_counts(texts: list[str]) -> Any:
    """A tiny deterministic embedder: letter frequencies (KNNFewShot needs vectors)."""
    import numpy as np

    rows = []
    for text in texts:
        row = np.zeros(26, dtype=np.float32)
        for char in str(text).lower():
            if "a" <= char <= "z":
                row[ord(char) - 97] += 1.0
        rows.append(row)
    return np.stack(rows)


class FakeFinetuneProvider(dspy.Provider):
    """A fine-tuning provider that trains nothing (no GPU or hosted trainer here): the
    "fine-tuned" model is the same simulated model. BootstrapFinetune only needs a
    provider that is ``finetunable`` and returns a model name."""

    def __init__(self) -> None:
        super().__init__()
        self.finetunable = True

    @staticmethod
    def finetune(job: Any, model: str, train_data: list, train_data_format: Any, train_kwargs=None):
        if not train_data:
            raise ValueError("BootstrapFinetune sent no training data")
        return model


class Finetunable(dspy.Module):
    """A program whose predictor has its own LM (BootstrapFinetune fine-tunes that one)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.predict = task().make_program()
        self.predict.set_lm(lm)

    def forward(self, **kwargs: Any) -> Any:
        return self.predict(**kwargs)


def finetunable_lm() -> Any:
    from dspex_jupyter.testing.simulated import SimulatedLM

    base = task().lm()
    return SimulatedLM(base.model, engine=base.simulated_engine, provider=FakeFinetuneProvider())
