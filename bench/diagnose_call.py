"""Where a no-op ``pool.call`` spends its time: the round trip taken apart.

Run from the repository root: ``.venv/bin/python bench/diagnose_call.py [-n 300]``.
It reaches into private attributes (the manager's loop thread, a pool's worker) on
purpose: it is a diagnosis aid for the library's owner, not an API user.

Measures, all in one run, p50 of n round trips each (interleaved in blocks):

- ``pool.call`` from the caller thread (what users see)
- the same coroutine timed inside the loop thread (no caller <-> loop thread hops)
- ``worker.request`` inside the loop thread (no acquire, no extra task, no asyncio.wait)
- the thread hop alone: ``runner.run`` of an empty coroutine
- on a bare kernel, from a plain blocking zmq socket (no asyncio, no thread):
  kernel_info; a comm_msg to the dspex runtime's ``call`` op (reply read from IOPub);
  a comm_msg to a trivial echo comm target (ipykernel's comm path, no dspex runtime)
- client-side message costs: building + signing a request, deserializing one reply
- the kernel-side handler ``handle_message`` alone, in this process
- the two thread hops of a real call, from time stamps on both threads
- A/B: pool.call with one cost removed at a time (patched in this process only)
- a cProfile of the loop thread during n calls, wall and CPU time (top by own time)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import timed  # noqa: E402

perf = time.perf_counter
NOOP = "bench.noop:noop"
ECHO_TARGET = """
def _echo_open(comm, msg):
    comm.on_msg(lambda m: comm.send(m["content"]["data"]))
get_ipython().kernel.comm_manager.register_target("echo", _echo_open)
"""


def us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:8.1f} us"


class RawComm:
    """A comm to a bare kernel driven from blocking zmq sockets."""

    def __init__(self, kernel: Any, target: str) -> None:
        self.kc = kernel.kc
        self.session = self.kc.session
        self.shell = self.kc.shell_channel.socket
        self.iopub = self.kc.iopub_channel.socket
        self.comm_id = uuid.uuid4().hex
        self.session.send(
            self.shell, "comm_open", {"comm_id": self.comm_id, "target_name": target, "data": {}}
        )
        time.sleep(0.3)
        self.drain()
        self.iopub_messages = 0

    def drain(self) -> None:
        while self.iopub.poll(0):
            self.session.recv(self.iopub, mode=0)

    def round_trip(self, data: dict[str, Any]) -> None:
        msg = self.session.send(self.shell, "comm_msg", {"comm_id": self.comm_id, "data": data})
        msg_id = msg["header"]["msg_id"]
        while True:
            _, reply = self.session.recv(self.iopub, mode=0)
            self.iopub_messages += 1
            if reply["msg_type"] == "comm_msg" and reply["parent_header"].get("msg_id") == msg_id:
                return


def hop_times(pool: Any, n: int) -> dict[str, list[float]]:
    """Time stamps at the start and end of ``pool._call`` on the loop thread, against the
    caller's: how long the request waits to start there, and the result to come back."""
    original = pool._call
    marks: dict[str, float] = {}

    async def traced(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        marks["start"] = perf()
        try:
            return await original(func, args, kwargs)
        finally:
            marks["end"] = perf()

    pool._call = traced
    out: dict[str, list[float]] = {
        "caller -> loop (submit until the coroutine starts)": [],
        "on the loop thread (pool._call start to end)": [],
        "loop -> caller (coroutine end until call returns)": [],
    }
    try:
        for i in range(n + 20):
            t0 = perf()
            pool.call(NOOP)
            t1 = perf()
            if i >= 20:
                parts = (marks["start"] - t0, marks["end"] - marks["start"], t1 - marks["end"])
                for samples, value in zip(out.values(), parts, strict=True):
                    samples.append(value)
    finally:
        del pool._call
    return out


def ab_experiments(
    pool: Any, runner: Any, worker: Any, n: int, block: int
) -> dict[str, list[float]]:
    """pool.call with one cost removed at a time, interleaved in blocks.

    - IOPub narrowed to the comm's topic: the kernel's status busy/idle messages (2 of
      the 3 IOPub messages a call makes) are filtered out at the kernel's PUB socket
    - Session.deserialize without extract_dates (dateutil parsing of 2 headers/message)
    - Pool._run_op awaiting worker.request directly (no extra task, no asyncio.wait)
    """
    import types

    import jupyter_client.session as jsession_module
    import zmq

    from dspex_jupyter import protocol

    sub = worker._kc.iopub_channel.socket
    topic = f"comm-{worker._comm_id}".encode()
    original_dates = jsession_module.extract_dates
    original_run_op = pool._run_op

    async def direct_run_op(
        self: Any,
        worker: Any,
        op: str,
        args: dict[str, Any],
        buffers: list[bytes],
        *,
        session: str | None = None,
        timeout: float | None = None,
        **rest: Any,  # outgoing, decode: a no-op call sends no exchange file
    ) -> Any:
        if timeout is not None or not rest.get("decode", True):
            return await original_run_op(
                worker, op, args, buffers, session=session, timeout=timeout, **rest
            )
        result, reply_buffers = await worker.request(op, args, session=session, buffers=buffers)
        worker.calls_served += 1
        return protocol.decode_value(result, reply_buffers)

    async def set_narrow(on: bool) -> None:
        if on:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.setsockopt(zmq.UNSUBSCRIBE, b"")
        else:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    def configure(narrow: bool, no_dates: bool, direct: bool) -> None:
        runner.run(set_narrow(narrow))
        jsession_module.extract_dates = (lambda obj: obj) if no_dates else original_dates
        if direct:
            pool._run_op = types.MethodType(direct_run_op, pool)
        else:
            pool.__dict__.pop("_run_op", None)
        time.sleep(0.02)  # let the subscription change reach the kernel
        for _ in range(5):
            pool.call(NOOP)

    variants = {
        "as shipped": (False, False, False),
        "IOPub narrowed to the comm topic": (True, False, False),
        "no extract_dates in deserialize": (False, True, False),
        "_run_op awaits worker.request directly": (False, False, True),
        "all three": (True, True, True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(max(1, n // block)):
            for name, flags in variants.items():
                configure(*flags)
                results[name].extend(timed(lambda: pool.call(NOOP), block))
    finally:
        configure(False, False, False)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="take a no-op pool.call apart")
    parser.add_argument("-n", type=int, default=300, help="round trips per measure")
    args = parser.parse_args()
    n = args.n
    os.chdir(ROOT)

    from bench.bench_core import BareKernel, write_kernelspec
    from dspex_jupyter import PoolManager, PoolSpec, protocol
    from dspex_jupyter.runtime.kernel import handle_message

    tmp = Path(tempfile.mkdtemp(prefix="dspex-diag-"))
    kernel = BareKernel(write_kernelspec(tmp / "ks"), tmp)
    manager = PoolManager([PoolSpec("diag", size=1)])
    results: dict[str, list[float]] = {}
    try:
        kernel.start()
        kc = kernel.kc
        kc.execute("import dspex_jupyter.runtime as r; r.install()\n" + ECHO_TARGET)
        time.sleep(1.0)
        kernel.drain_iopub()
        while kc.shell_channel.msg_ready():
            kc.get_shell_msg(timeout=0)
        dspex_comm = RawComm(kernel, protocol.COMM_TARGET)
        echo_comm = RawComm(kernel, "echo")
        call_args = {"func": {"ref": NOOP}, "payload": {"enc": "json", "value": [[], {}]}}

        def dspex_raw() -> None:
            dspex_comm.round_trip(protocol.make_request("call", call_args))

        def echo_raw() -> None:
            echo_comm.round_trip({"id": "x"})

        manager.start()
        pool = manager["diag"]
        runner = manager._runner
        worker = pool._workers[0]
        loop = runner.loop

        async def empty() -> None:
            return None

        def in_loop(make: Callable[[], Any], count: int) -> list[float]:
            async def go() -> list[float]:
                out = []
                for _ in range(count):
                    t0 = perf()
                    await make()
                    out.append(perf() - t0)
                return out

            return runner.run(go())

        async def worker_request() -> None:
            # What pool._call does minus acquire/release, the extra task and asyncio.wait.
            await worker.request("call", call_args)

        measures: dict[str, Callable[[int], list[float]]] = {
            "pool.call (caller thread)": lambda k: timed(lambda: pool.call(NOOP), k),
            "pool._call inside loop thread": lambda k: in_loop(lambda: pool._call(NOOP, (), {}), k),
            "worker.request inside loop": lambda k: in_loop(worker_request, k),
            "thread hop: runner.run(empty)": lambda k: timed(lambda: runner.run(empty()), k),
            "bare kernel: raw kernel_info": lambda k: timed(kernel.kernel_info_raw, k),
            "bare kernel: raw comm -> dspex call": lambda k: timed(dspex_raw, k),
            "bare kernel: raw comm -> echo": lambda k: timed(echo_raw, k),
        }
        for measure in measures.values():
            measure(20)  # warm-up
        block = 30
        for _ in range(max(1, n // block)):
            for name, measure in measures.items():
                results.setdefault(name, []).extend(measure(block))
            kernel.drain_iopub()

        # IOPub messages a comm round trip produces (those after the reply included).
        kernel.drain_iopub()
        dspex_comm.iopub_messages = 0
        for _ in range(50):
            dspex_raw()
        time.sleep(0.3)
        while dspex_comm.iopub.poll(0):
            dspex_comm.session.recv(dspex_comm.iopub, mode=0)
            dspex_comm.iopub_messages += 1
        per_call = dspex_comm.iopub_messages / 50
        print(f"round trips, p50 of {n} each (2 CPUs, interleaved blocks of {block}):")
        for name, samples in results.items():
            print(f"  {name:<38} {us(samples)}")
        print(f"  IOPub messages per comm round trip (1 needed): {per_call:.1f}")

        # ---- client-side per-message costs ----------------------------------------------
        jsession = worker._jsession
        request = protocol.make_request("call", call_args)
        content = {"comm_id": "x" * 32, "data": request}

        def build_and_serialize() -> None:
            msg = jsession.msg("comm_msg", content)
            jsession.serialize(msg)

        def frames_of(msg_type: str, body: Callable[[], dict[str, Any]]) -> list[list[bytes]]:
            # Fresh messages: Session.deserialize refuses a signature it has seen before.
            return [jsession.serialize(jsession.msg(msg_type, body())) for _ in range(2200)]

        def reply_body() -> dict[str, Any]:
            reply = protocol.make_reply(uuid.uuid4().hex, {"enc": "json", "value": None})
            return {"comm_id": "x" * 32, "data": reply}

        reply_frames = frames_of("comm_msg", reply_body)
        status_frames = frames_of("status", lambda: {"execution_state": "idle"})

        def deserialize(frames: list[list[bytes]]) -> Callable[[], None]:
            pending = iter(frames)

            def go() -> None:
                _, parts = jsession.feed_identities(next(pending))
                jsession.deserialize(parts)

            return go

        data = protocol.make_request("call", call_args)
        micro = {
            "Session.msg + serialize (sign) request": build_and_serialize,
            "feed_identities + deserialize comm reply": deserialize(reply_frames),
            "feed_identities + deserialize status msg": deserialize(status_frames),
            "protocol.make_request (uuid4)": lambda: protocol.make_request("call", call_args),
            "protocol.encode_value([[], {}])": lambda: protocol.encode_value([[], {}], []),
            "kernel side: handle_message(call noop)": lambda: handle_message(data, []),
        }
        print("\nper-message CPU costs (p50 of 2000, this process):")
        for name, fn in micro.items():
            timed(fn, 200)
            print(f"  {name:<42} {us(timed(fn, 2000))}")

        # ---- the two thread hops of a real call ------------------------------------
        hops = hop_times(pool, n)
        print("\nthread hops inside real pool.call round trips (p50):")
        for name, samples in hops.items():
            print(f"  {name:<52} {us(samples)}")

        # ---- A/B experiments on the live pool (patched in this process only) ---------
        ab = ab_experiments(pool, runner, worker, n, block)
        print("\nA/B on the live pool, pool.call p50 (patches live in this process only):")
        base = statistics.median(ab["as shipped"])
        for name, samples in ab.items():
            delta = statistics.median(samples) - base
            print(f"  {name:<52} {us(samples)}  ({delta * 1e6:+7.1f} us)")

        # ---- cProfile of the loop thread ---------------------------------------------
        for title, timer in (("wall time", time.perf_counter), ("CPU time", time.thread_time)):
            profiler = cProfile.Profile(timer)
            loop.call_soon_threadsafe(profiler.enable)
            time.sleep(0.05)
            for _ in range(n):
                pool.call(NOOP)
            loop.call_soon_threadsafe(profiler.disable)
            time.sleep(0.05)
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(14)
            print(f"\ncProfile ({title}) of the loop thread over {n} pool.call, by own time:")
            lines = stream.getvalue().splitlines()
            first = next(i for i, line in enumerate(lines) if "ncalls" in line)
            for line in lines[first:]:
                if line.strip():
                    print("  " + line[:160])
    finally:
        manager.shutdown()
        kernel.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
