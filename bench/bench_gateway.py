"""Pools behind a Jupyter gateway against a local pool, all in one run (issue #17).

Run from the repository root (the gateways come from ``bash scripts/gateway_setup.sh``)::

    .venv/bin/python bench/bench_gateway.py [--quick] [--size-mb 100] [--reps 5] [--no-eg]

The gateways are the test suite's (``tests/integration/gateway_fixtures.py``): Kernel Gateway
3.0.1 and Enterprise Gateway 3.3.0 on 127.0.0.1, each from its own environment, with a token;
EG also behind TLS (self-signed certificate). Every kernel runs this Python. Measured, medians:

1. no-op call round trip: a local dspex pool (the baseline), a dspex pool of one kernel through
   each gateway, and the gateway's own floor: a ``kernel_info_request`` answered over a bare
   websocket (websocket-client, TCP_QUICKACK as dspex sets it) to a kernel of the same gateway;
2. a table of ``--size-mb`` MB (Arrow) to a session's kernel and back, through each gateway
   against the local pool.

Prints a table and the ratios; exit status 0 whatever the figures (1 if processes leaked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_exchange import make_table  # noqa: E402
from bench.common import (  # noqa: E402
    exit_code_after_leak_check,
    print_table,
    say,
)
from bench.common import timed_after_warmup as timed  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402
from tests.integration.gateway_fixtures import GatewayServer, missing_reason  # noqa: E402

NOOP = "bench.noop:noop"
IDENTITY = "bench.exchange_helpers:identity"
MB = 1_000_000
perf = time.perf_counter


# ---- the gateway's floor: one bare websocket ------------------------------------------------
@contextlib.contextmanager
def bare_websocket(server: GatewayServer) -> Iterator[Callable[[], None]]:
    """A kernel of ``server`` and a function doing one kernel_info round trip over a plain
    websocket-client connection (what any client pays for the gateway hop itself)."""
    import websocket

    body = json.dumps({"name": server.kernel_name, "env": {"KERNEL_USERNAME": "bench"}})
    request = urllib.request.Request(
        server.url + "/api/kernels",
        data=body.encode(),
        headers={**server.headers, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60, context=server.ssl_context()) as reply:
        kernel_id = json.loads(reply.read())["id"]
    sslopt = {"ca_certs": str(server.ca_cert)} if server.ca_cert else None
    ws = websocket.create_connection(
        f"{server.ws_url}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {server.token}"],
        sslopt=sslopt,
        timeout=60,
    )
    raw = ws.sock

    def kernel_info() -> None:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": "bench",
                  "username": "bench", "date": "2026-01-01T00:00:00Z",
                  "version": "5.3"}  # fmt: skip
        ws.send(json.dumps({"header": header, "parent_header": {}, "metadata": {},
                            "content": {}, "channel": "shell"}))  # fmt: skip
        while True:
            message = json.loads(ws.recv())
            # The gateways' websockets run with Nagle on: without a quick ACK each reply
            # waits ~40 ms (GATEWAY_NOTES §0); dspex's client does the same.
            if hasattr(socket, "TCP_QUICKACK"):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if (
                message["header"]["msg_type"] == "kernel_info_reply"
                and message["parent_header"].get("msg_id") == msg_id
            ):
                return

    try:
        yield kernel_info
    finally:
        ws.close()
        delete = urllib.request.Request(
            f"{server.url}/api/kernels/{kernel_id}", headers=server.headers, method="DELETE"
        )
        with contextlib.suppress(OSError):
            urllib.request.urlopen(delete, timeout=30, context=server.ssl_context()).close()


# ---- the measures ---------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 MB table, fewer repetitions")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--reps", type=int, default=5, help="round trips per table measure")
    parser.add_argument("--calls", type=int, default=300, help="no-op calls per measure")
    parser.add_argument("--no-eg", action="store_true", help="Kernel Gateway only")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.reps, args.calls = 10.0, 3, 100
    kinds = [("kg", False)] + ([] if args.no_eg else [("eg", False), ("eg", True)])
    for kind, _ in kinds:
        reason = missing_reason(kind)
        if reason:
            print(reason)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="dspex-bench-gateway-"))
    os.environ.setdefault("DSPEX_HOME", str(tmp / "home"))
    results: dict[str, Any] = {}
    notes: list[str] = [f"load average at start: {os.getloadavg()[0]:.2f} (2 cores)"]
    try:
        measure(args, tmp, kinds, results, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    report(args, kinds, results, notes)
    return exit_code_after_leak_check()


def label(kind: str, tls: bool) -> str:
    return kind.upper() + (" TLS" if tls else "")


def measure(
    args: argparse.Namespace,
    tmp: Path,
    kinds: list[tuple[str, bool]],
    results: dict[str, Any],
    notes: list[str],
) -> None:
    table = make_table(args.size_mb)
    results["table_bytes"] = table.nbytes
    say(f"{table.num_rows} rows, {table.nbytes / MB:.0f} MB")
    say("dspex: a local pool of 1")
    with PoolManager([PoolSpec("local", size=1)]) as manager:
        pool_figures(manager["local"], "local", table, args, results)
    for kind, tls in kinds:
        name = label(kind, tls)
        say(f"{name}: the gateway, a bare websocket, a dspex pool of 1")
        folder = tmp / f"{kind}{'-tls' if tls else ''}"
        try:
            with GatewayServer(kind, folder, tls=tls, kernel_cwd=ROOT) as server:
                with bare_websocket(server) as kernel_info:
                    results[f"{name} bare"] = timed(kernel_info, args.calls)
                gateway: Any = server.url
                if tls:
                    gateway = {"url": server.url, "ca_certs": str(server.ca_cert)}
                spec = PoolSpec("gw", gateway=gateway, kernel=server.kernel_name,
                                auth_token=server.token, size=1)  # fmt: skip
                with PoolManager([spec]) as manager:
                    pool_figures(manager["gw"], name, table, args, results)
        except Exception as exc:  # reported as missing; the other gateways go on
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}")


def pool_figures(
    pool: Any, name: str, table: Any, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    results[f"{name} call"] = timed(lambda: pool.call(NOOP), args.calls)
    with pool.session() as session:
        back = session.call(IDENTITY, table)
        if not back.equals(table):
            raise AssertionError(f"{name}: the table came back different")
        results[f"{name} table"] = timed(lambda: session.call(IDENTITY, table), args.reps)


def _median_ms(values: list[float] | None) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report(
    args: argparse.Namespace,
    kinds: list[tuple[str, bool]],
    results: dict[str, Any],
    notes: list[str],
) -> None:
    nbytes = results.get("table_bytes", 0)
    local_call = _median_ms(results.get("local call"))
    local_table = _median_ms(results.get("local table"))

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    def speed(ms: float | None) -> str:
        return "-" if not ms else f"{nbytes / MB / (ms / 1e3):.0f} MB/s"

    print(f"\nno-op call round trip, median of {args.calls} (ms):")
    rows = [["dspex local pool", _fmt(local_call, ".3f"), "1.00x", "-", "-"]]
    for kind, tls in kinds:
        name = label(kind, tls)
        call, bare = (
            _median_ms(results.get(f"{name} call")),
            _median_ms(results.get(f"{name} bare")),
        )
        rows.append([f"dspex pool via {name}", _fmt(call, ".3f"), ratio(call, local_call),
                     _fmt(bare, ".3f"), ratio(call, bare)])  # fmt: skip
    print_table(["", "ms", "/ local", "bare websocket kernel_info ms", "dspex / bare"], rows)

    print(f"\n{nbytes / MB:.0f} MB table to a session's kernel and back, median of {args.reps}:")
    rows = [["dspex local pool", _fmt(local_table, ".0f"), speed(local_table), "1.00x"]]
    for kind, tls in kinds:
        name = label(kind, tls)
        ms = _median_ms(results.get(f"{name} table"))
        rows.append([f"dspex pool via {name}", _fmt(ms, ".0f"), speed(ms), ratio(ms, local_table)])
    print_table(["", "ms", "speed", "time / local"], rows)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    raise SystemExit(main())
