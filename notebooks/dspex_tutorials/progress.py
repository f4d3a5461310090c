"""Follow an optimization run from a cell: print its phases and trials as they happen.

Standard library only. The events come from ``run.on_event`` (called on the pool manager's
thread); this prints them from the cell's own thread, so they land in the cell's output
(and, with ``scripts/run_tutorial.py``, in the terminal) while the run goes on.
"""

from __future__ import annotations

import queue
from typing import Any

ENDS = ("complete", "error", "cancelled")


def describe(event: dict[str, Any], last_phase: list[str], candidates: bool = True) -> str | None:
    """One line for the events worth a line; None for the others."""
    kind = event["kind"]
    if kind == "phase" and event["phase"] != last_phase[0]:
        last_phase[0] = event["phase"]
        return f"phase: {event['phase']}"
    if kind == "candidate" and candidates:
        return f"  candidate instruction {event['index']}: {event['instruction']}"
    if kind == "trial":
        best = "  <- best so far" if event["score"] == event["best_score"] else ""
        number, kind = event["number"], event["eval"]
        return f"  trial {number:>2} ({kind:<9}) score {event['score']:5.1f}{best}"
    if kind == "recovery":
        if event.get("action") == "halve_batch":
            return (
                f"  recovery: cleared the GPU cache, minibatch {event['from_size']} -> "
                f"{event['to_size']}"
            )
        return f"  recovery: {event.get('action')} ({event.get('reason', '')})"
    if kind == "resumed":
        return f"resumed from checkpoint (phase {event.get('phase')})"
    if kind == "complete":
        return f"complete: best score {event['best_score']}"
    if kind == "error":
        return f"error: {event['error_type']}: {event['message']}"
    if kind == "cancelled":
        return "cancelled (resumable from its checkpoint)"
    return None


def watch(run: Any, timeout: float = 600.0, candidates: bool = True) -> None:
    """Print the run's progress until it ends (``candidates``: with the candidate
    instructions)."""
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    run.on_event(events.put)
    last_phase = [""]
    idle = 0.0
    while True:
        try:
            event = events.get(timeout=1.0)
        except queue.Empty:
            event = None
        if event is None:
            idle += 1.0
            if run.done and events.empty():  # ended without a final event (kernel lost)
                print(f"run ended: {run.status}")
                return
            if idle >= timeout:
                raise TimeoutError(f"run {run.run_id} still {run.status} after {timeout} s")
            continue
        idle = 0.0
        line = describe(event, last_phase, candidates)
        if line is not None:
            print(line, flush=True)
        if event["kind"] in ENDS:
            return
