"""Stand-ins shared by the notebook unit tests (this module holds no tests).

FakeRun behaves like an ``OptimizationRun`` seen from the notebook (events, status,
checkpoint, cancel) without a kernel; FakeManager answers ``health()`` like a
``PoolManager``; FakeNvml is a MOCK of the NVML module (pynvml): the test machines have
no GPU, so the GPU code is exercised against this fake.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dspex_jupyter.optimizers.mipro import RunCancelled, RunFailed


class FakeRun:
    """An optimization run driven by the test: ``emit`` delivers an event to callbacks."""

    def __init__(self, run_id: str = "fake01", checkpoint_dir: Path | str = "/tmp/fake-run"):
        self.run_id = run_id
        self.checkpoint_dir = Path(checkpoint_dir)
        self.session = SimpleNamespace(pool_name="fakepool", id=f"session-{run_id}")
        self.status = "starting"
        self.error: BaseException | None = None
        self.events: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {"trials": 0, "best_score": None, "usage": {}}
        self.resume_objects: dict[str, Any] = {}
        self.checkpoint_rows: list[dict[str, Any]] = []
        self.checkpoint_gate: threading.Event | None = None  # set by a test to hold checkpoint()
        self.checkpoint_calls = 0
        self.cancel_calls = 0
        self._callbacks: list[Any] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def on_event(self, callback: Any) -> None:
        with self._lock:
            past = list(self.events)
            self._callbacks.append(callback)
        for event in past:
            callback(event)

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {
            "seq": len(self.events),
            "time": data.pop("time", time.time()),
            "kind": kind,
            **data,
        }
        if kind == "trial":
            self.metrics["trials"] = max(self.metrics["trials"], event["number"])
            self.metrics["best_score"] = event["best_score"]
            self.metrics["usage"] = event.get("usage", {})
        elif kind == "phase" and self.status == "starting":
            self.status = "running"
        with self._lock:
            self.events.append(event)
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(event)
        return event

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self.status = status
        self.error = error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("still running")
        if self.status == "cancelled":
            raise RunCancelled("cancelled")
        if self.status == "failed":
            raise RunFailed(f"failed: {self.error}")
        return "result"

    def checkpoint(self, timeout: float | None = None) -> Path:
        self.checkpoint_calls += 1
        if self.checkpoint_gate is not None:
            assert self.checkpoint_gate.wait(timeout or 10), "test never released the gate"
        name = f"ckpt-{len(self.checkpoint_rows) + 1:06d}.json"
        self.checkpoint_rows.append(checkpoint_row(name, self.metrics["trials"]))
        return self.checkpoint_dir / name

    def cancel(self, timeout: float | None = None) -> Path:
        self.cancel_calls += 1
        name = f"ckpt-{len(self.checkpoint_rows) + 1:06d}.json"
        self.checkpoint_rows.append(checkpoint_row(name, self.metrics["trials"], "search"))
        self.emit("cancelled", checkpoint=str(self.checkpoint_dir / name))
        self.finish("cancelled")
        return self.checkpoint_dir / name

    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.checkpoint_rows)


def checkpoint_row(name: str, trial: int, phase: str = "search", ok: bool = True) -> dict[str, Any]:
    row = {
        "path": f"/tmp/fake-run/{name}",
        "name": name,
        "written_at": time.time(),
        "phase": phase,
        "trial": trial,
        "best_score": 55.0,
        "reason": "trial",
        "ok": ok,
    }
    if not ok:
        row = {"path": row["path"], "name": name, "ok": False, "error": "fails its checksum"}
    return row


def usage(calls: int) -> dict[str, Any]:
    return {
        "calls": calls,
        "prompt_tokens": 250 * calls,
        "completion_tokens": 20 * calls,
        "total_tokens": 270 * calls,
        "cost": 0.0001 * calls,
    }


INSTRUCTIONS = [
    "Answer the question.",
    "Work step by step, then give the final number.",
    "Compute carefully and check the arithmetic.",
    "Think about <units> & answer",  # needs escaping in HTML
]


def feed_typical_run(run: FakeRun, *, trials: int = 7, start: float = 1000.0) -> None:
    """A run's events: bootstrap 4 sets, 4 proposed instructions, then ``trials`` trials
    (every third one a full evaluation), one second apart."""
    run.emit("status", status="running", time=start)
    for step in range(5):
        run.emit("phase", phase="bootstrap", step=step, total=4, time=start)
    run.emit(
        "checkpoint",
        path="/tmp/fake-run/ckpt-000001.json",
        phase="bootstrapped",
        reason="step",
        trial=0,
        best_score=None,
        time=start,
    )
    run.emit("phase", phase="propose", step=0, total=4, time=start)
    for index, text in enumerate(INSTRUCTIONS):
        run.emit("candidate", predictor=0, index=index, instruction=text, time=start)
    best = None
    for number in range(1, trials + 1):
        kind = "full" if number == 1 or number % 3 == 0 else "minibatch"
        score = 40.0 + 5 * (number % 4)
        if kind == "full" and (best is None or score > best):
            best = score
        run.emit("phase", phase="search", step=number, total=13, time=start + number)
        run.emit(
            "trial",
            number=number,
            eval=kind,
            score=score,
            best_score=best,
            params={"0_predictor_instruction": number % 4, "0_predictor_demos": 0},
            usage=usage(10 * number),
            time=start + number,
        )


class FakeManager:
    """Answers ``health()`` like a PoolManager with one pool of two kernels."""

    def __init__(self, pids: tuple[int, int] = (4242, 4343), max_memory: int | None = 2**30):
        self.pids = pids
        self.max_memory = max_memory

    def health(self) -> dict[str, Any]:
        kernels = [
            {
                "id": f"fakepool/{i}",
                "pid": pid,
                "state": state,
                "session": session,
                "rss": 300 * 2**20,
                "rss_text": "300.0 MiB",
                "uptime": 12.5,
                "calls_served": 3,
            }
            for i, (pid, state, session) in enumerate(
                zip(self.pids, ("idle", "session"), (None, "s1"), strict=True)
            )
        ]
        pool = {
            "name": "fakepool",
            "source": "python /usr/bin/python3",
            "python": "python3",
            "size": 2,
            "max_memory": self.max_memory,
            "gpu": True,
            "kernels": kernels,
            "sessions": ["s1"],
            "idle": 1,
            "waiting": 0,
            "deaths": 1,
            "last_error": "",
            "closed": False,
        }
        return {"pools": {"fakepool": pool}, "kernels": 2, "sessions": 1}


class FakeNvml:
    """MOCK of the NVML module (pynvml) for machines without a GPU: one 80 GiB device,
    with the given processes (pid -> bytes) running on it."""

    def __init__(self, processes: dict[int, int | None], *, fail_init: bool = False):
        self.processes = processes
        self.fail_init = fail_init
        self.initialised = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle-{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3 (mock)"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(total=80 * 2**30, used=30 * 2**30, free=50 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.items()
        ]
