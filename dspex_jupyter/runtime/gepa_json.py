"""GEPA's run state as JSON, exactly: what a checkpoint needs for an exact resume.

gepa 0.1.4 saves its ``GEPAState`` with pickle (``run_dir/gepa_state.bin``) and keeps the
rest of a run's state in objects it never saves: the ``random.Random`` shared by the Pareto
candidate selector, the epoch-shuffled batch sampler and the merge proposer; the sampler's
shuffled ids and counters; the merge proposer's schedule and the merges it already tried.
Resuming from its pickle therefore restarts those from the seed and the run diverges.
Here all of it is written as JSON and read back so that the resumed run draws the same
numbers in the same order.

Python values are tagged so they come back with their exact types *and orders*: dicts as
``{"dict": [[key, value], ...]}`` (insertion order and non-string keys such as validation
ids kept), tuples, sets (in iteration order: gepa's Pareto sampling depends on it),
``Counter``s (``most_common`` breaks ties by insertion order), non-finite floats, long
runs of 32-bit words (RNG states) packed into one hex string, and DSPy
``Prediction``/``Example`` outputs and gepa's ``EvaluationCache`` (when
``track_best_outputs`` or ``cache_evaluation`` keep them). Anything else is refused with
``SerializationError`` naming where it was: never pickle.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
from collections import Counter
from typing import Any

from ..core.errors import SerializationError

VERSION = 1

# MergeProposer attributes that change during a run (gepa 0.1.4, proposer/merge.py).
MERGE_FIELDS = (
    "merges_due",
    "total_merges_tested",
    "merges_performed",
    "last_iter_found_new_program",
)
# GEPAState attributes not written with it: budget hooks hold closures (runtime only); the
# adapter's state is a stale copy there (the engine refreshes it before each iteration from
# the adapter, whose live state a checkpoint keeps beside the GEPAState).
STATE_NOT_WRITTEN = frozenset({"_budget_hooks", "adapter_state"})


def to_json(value: Any, where: str = "state") -> Any:
    """``value`` as tagged JSON (see the module docstring); ``where`` names it in errors."""
    try:
        return _encode(value)
    except _Unencodable as exc:
        path = "".join(reversed(exc.path))
        kind = type(exc.value)
        raise SerializationError(
            f"GEPA state at {where}{path} holds a {kind.__module__}.{kind.__qualname__}, "
            "which a JSON checkpoint cannot keep",
            hint="GEPA runs checkpoint to JSON only (never pickle): keep custom samplers, "
            "selectors and adapter state to numbers, strings, lists and dicts",
        ) from None


class _Unencodable(Exception):
    """Raised where a value has no JSON form; the path is added while it unwinds (so the
    common case, which succeeds, builds no path strings: a checkpoint per iteration is
    mostly RNG states of 625 integers)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.path: list[str] = []


PACK_MIN = 64  # a run of at least this many 32-bit words is written as one hex string


def _plain(value: Any) -> bool:
    """JSON as it is, and read back as the same value and type."""
    kind = type(value)
    return kind is str or kind is int or (kind is float and math.isfinite(value)) or value is None


def _encode(value: Any) -> Any:
    if value is None or type(value) in (bool, str, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list | tuple):
        # An RNG state (625 words) as one string: the type check and the packing run in C.
        if len(value) >= PACK_MIN and set(map(type, value)) == {int}:
            with contextlib.suppress(struct.error):  # a number outside 0..2**32-1
                packed = struct.pack(f">{len(value)}I", *value).hex()
                return {"u32": packed} if isinstance(value, list) else {"u32_tuple": packed}
        # The common case next, fast: scores, example ids.
        plain = all(map(_plain, value))
        items = list(value) if plain else _encode_items(enumerate(value))
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, set | frozenset):
        return {"set": _encode_items(enumerate(value))}
    if isinstance(value, Counter):
        return {"counter": _pairs(value)}
    if type(value) is dict:
        if all(_plain(k) and _plain(v) for k, v in value.items()):  # scores by example id
            return {"dict": [[k, v] for k, v in value.items()]}
        return {"dict": _pairs(value)}
    if isinstance(value, dict):
        return {"dict": _pairs(value)}
    if isinstance(value, bool | str | int):  # subclasses (an IntEnum, say)
        return value
    kind = _dspy_kind(value)
    if kind is not None:
        return {kind: _pairs(value.toDict())}
    if _class_path(value) == "gepa.core.state.EvaluationCache":  # cache_evaluation=True
        entries = {k: [e.output, e.score, e.objective_scores] for k, e in value._cache.items()}
        return {"evaluation_cache": _pairs(entries)}
    raise _Unencodable(value)


def _encode_items(items: Any) -> list[Any]:
    out = []
    for i, item in items:
        try:
            out.append(_encode(item))
        except _Unencodable as exc:
            exc.path.append(f"[{i}]")
            raise
    return out


def _pairs(mapping: Any) -> list[list[Any]]:
    out = []
    for key, item in mapping.items():
        try:
            out.append([_encode(key), _encode(item)])
        except _Unencodable as exc:
            exc.path.append(f"[{key!r}]")
            raise
    return out


def from_json(data: Any) -> Any:
    """The Python value ``to_json`` wrote."""
    if isinstance(data, list):
        return [from_json(item) for item in data]
    if not isinstance(data, dict):
        return data
    ((tag, body),) = data.items()
    if tag == "float":
        return float(body)
    if tag == "tuple":
        return tuple(from_json(item) for item in body)
    if tag in ("u32", "u32_tuple"):
        words = struct.unpack(f">{len(body) // 8}I", bytes.fromhex(body))
        return list(words) if tag == "u32" else words
    if tag == "set":
        return {from_json(item) for item in body}
    if tag == "counter":
        return Counter({from_json(k): from_json(v) for k, v in body})
    if tag == "dict":
        return {from_json(k): from_json(v) for k, v in body}
    if tag == "evaluation_cache":
        from gepa.core.state import CachedEvaluation, EvaluationCache

        entries = {from_json(k): from_json(v) for k, v in body}
        return EvaluationCache(_cache={k: CachedEvaluation(*v) for k, v in entries.items()})
    if tag in ("prediction", "example"):
        import dspy

        cls = dspy.Prediction if tag == "prediction" else dspy.Example
        return cls(**{from_json(k): from_json(v) for k, v in body})
    raise SerializationError(f"unknown tag {tag!r} in a GEPA checkpoint")


def state_to_json(state: Any) -> Any:
    """A ``GEPAState``'s attributes (all but runtime hooks) as tagged JSON."""
    attrs = {k: v for k, v in vars(state).items() if k not in STATE_NOT_WRITTEN}
    return to_json(attrs, "GEPAState")


def state_from_json(data: Any) -> dict[str, Any]:
    """The attributes to put back into a ``GEPAState``."""
    return from_json(data)


def rng_to_json(rng: random.Random) -> Any:
    return to_json(rng.getstate(), "rng")


def rng_from_json(rng: random.Random, data: Any) -> None:
    rng.setstate(from_json(data))


def plain_attributes(obj: Any, *, skip: tuple[str, ...] = ("rng",)) -> Any:
    """An object's attributes as JSON (for samplers and selectors; their RNGs go apart)."""
    attrs = {k: v for k, v in vars(obj).items() if k not in skip}
    return to_json(attrs, type(obj).__name__)


def restore_attributes(obj: Any, data: Any) -> None:
    for name, value in from_json(data).items():
        setattr(obj, name, value)


def _class_path(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _dspy_kind(value: Any) -> str | None:
    """ "prediction" / "example" for DSPy's record types (checked by class path, so this
    module needs no DSPy import until it meets one)."""
    for cls in type(value).__mro__:
        path = f"{cls.__module__}.{cls.__qualname__}"
        if path == "dspy.primitives.prediction.Prediction":
            return "prediction"
        if path == "dspy.primitives.example.Example":
            return "example"
    return None
