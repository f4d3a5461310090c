"""DSPy programs and settings of the tutorials (imported in the notebook and in kernels that
have dspy: the notebook's own Python, or an environment made with ``dspy[optuna]``)."""

from __future__ import annotations

import os
from typing import Any

import dspy

from dspex_jupyter.testing.faults import OomOnNewInstructions  # noqa: F401 (tutorial 05)
from dspex_jupyter.testing.mipro_settings import quick_settings

# A small, fast MIPROv2 search (the simulated LM answers in microseconds): 8 trials over 4
# instruction candidates and 4 few-shot sets, minibatches of 10.
OPTIMIZER, COMPILE = quick_settings()


# ---- evaluation in pool kernels (07) ----------------------------------------------------
def score(state: dict[str, Any] | None, lm: Any, example: dspy.Example) -> dict[str, Any]:
    """Run the arithmetic program (with ``state``: the optimized one) on one example."""
    program = dspy.ChainOfThought("question -> answer")
    if state is not None:
        program.load_state(state)
    with dspy.context(lm=lm):
        prediction = program(**example.inputs())
    correct = str(prediction.answer).strip() == str(example.answer).strip()
    return {"correct": correct, "pid": os.getpid()}


# ---- errors and recovery (05) -----------------------------------------------------------
def allocate_on_gpu(gib: float) -> str:
    """Allocate ``gib`` GiB on the GPU; without one, fail as CUDA would (simulated)."""
    import torch

    if torch.cuda.is_available():
        tensor = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
        return f"allocated {tensor.numel() / 2**30:.1f} GiB on {tensor.device}"
    raise torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {gib:.2f} GiB (simulated: no GPU here)"
    )


def process_in_batches(items: list[Any], batch_size: int = 32) -> dict[str, Any]:
    """Process ``items`` in batches of ``batch_size``, as a model on a GPU would: each batch
    needs memory in proportion to its size. This machine may have no GPU, so the memory is
    simulated: a batch of more than 8 items fails with torch's ``OutOfMemoryError``."""
    import torch

    if batch_size > 8:
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {batch_size * 0.25:.2f} GiB for a batch of "
            f"{batch_size} (simulated: this kernel holds 8 items at once)"
        )
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return {
        "items": sum(len(b) for b in batches),
        "batches": len(batches),
        "batch_size": batch_size,
    }


# ---- retrieval-augmented answering (06) -------------------------------------------------
class AnswerFromContext(dspy.Signature):
    """Answer the question from the context, carefully; verify the answer in the context."""

    context: str = dspy.InputField(desc="the passage the retriever found")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words")


class CosineRetriever:
    """The ``k`` passages whose embeddings are closest (cosine) to a query embedding.

    The embeddings are computed elsewhere (the retrieval pool) and arrive as a numpy array
    of unit-length rows, so cosine similarity is a dot product."""

    def __init__(self, passages: list[str], embeddings: Any) -> None:
        import numpy as np

        if len(passages) != len(embeddings):
            raise ValueError("one embedding per passage")
        self.passages = list(passages)
        self.embeddings = np.asarray(embeddings, dtype="float32")

    def __call__(self, query_embedding: Any, k: int = 3) -> list[tuple[int, float]]:
        import numpy as np

        scores = self.embeddings @ np.asarray(query_embedding, dtype="float32")
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(i), round(float(scores[i]), 3)) for i in best]


class RAG(dspy.Module):
    """Retrieve the closest passage, then answer from it with the LM."""

    def __init__(self, passages: list[str], embeddings: Any) -> None:
        super().__init__()
        self.retrieve = CosineRetriever(passages, embeddings)
        self.answer = dspy.Predict(AnswerFromContext)

    def forward(self, question: str, question_embedding: Any) -> dspy.Prediction:
        hits = self.retrieve(question_embedding, k=3)
        context = self.retrieve.passages[hits[0][0]]
        prediction = self.answer(context=context, question=question)
        return dspy.Prediction(answer=prediction.answer, passage=hits[0][0], hits=hits)


def build_rag(passages: list[str], embeddings: Any, lm: Any) -> str:
    """Make the RAG program in this session's kernel (kept there for the next calls)."""
    from dspex_jupyter.runtime import session_state

    state = session_state()
    state["rag"], state["lm"] = RAG(passages, embeddings), lm
    return f"RAG over {len(passages)} passages, in kernel pid {os.getpid()}"


def ask(questions: list[str], question_embeddings: Any) -> list[dict[str, Any]]:
    """Answer each question with the session's RAG program."""
    from dspex_jupyter.runtime import session_state

    state = session_state()
    answers = []
    with dspy.context(lm=state["lm"]):
        for question, vector in zip(questions, question_embeddings, strict=True):
            prediction = state["rag"](question=question, question_embedding=vector)
            answers.append(
                {
                    "question": question,
                    "answer": prediction.answer,
                    "passage": prediction.passage,
                    "hits": prediction.hits,
                }
            )
    return answers
