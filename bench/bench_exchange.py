"""Exchange benchmark: a table of DSPy-like rows to a session kernel and back.

Run from the repository root (kernels import ``bench.exchange_helpers``)::

    .venv/bin/python bench/bench_exchange.py [--quick] [--sizes 1,10,100,500]

For each size (MB of Arrow data: ``table.nbytes``), three ways, in the same run:

- dspex:      ``session.call("bench.exchange_helpers:identity", table)``, default tiers
              (over 1 MB: an Arrow IPC file in /dev/shm each way, mapped zero-copy)
- JSON:       the same rows as a JSON string through the same kernel (``json.dumps`` here,
              ``json.loads`` + ``json.dumps`` there, ``json.loads`` here; the text travels
              inside the message both ways), starting and ending with a list of dicts
- ipyparallel: ``view.push({"t": table})`` then ``view.pull("t")`` on a 1-engine cluster

Effective speed = table bytes (``table.nbytes``, 1 MB = 10^6 bytes) / median round-trip
seconds, from handing the value over until the returned value is usable here. The
returned dspex table is memory-mapped: ``scan`` reports, apart, what a first full read of
it costs against the same read of the in-memory original. Targets at 100 MB: >= 1 GB/s,
>= 10x ipyparallel, >= 20x JSON. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import leaked_processes  # noqa: E402
from dspex_jupyter import PoolManager, PoolSpec  # noqa: E402

IDENTITY = "bench.exchange_helpers:identity"
JSON_IDENTITY = "bench.exchange_helpers:json_identity"
MB = 1_000_000
TARGET_SIZE = 100
TARGET_MBPS, TARGET_VS_IPP, TARGET_VS_JSON = 1000.0, 10.0, 20.0
perf = time.perf_counter


def say(message: str) -> None:
    print(f"  .. {message}", flush=True)


# ---- data ---------------------------------------------------------------------------
def make_table(size_mb: float, seed: int = 0) -> pa.Table:
    """DSPy-like rows (question, answer, context text) filling ``size_mb`` of Arrow data."""
    rng = np.random.default_rng(seed)
    vocabulary = (
        "the of model answer question context retrieval paris capital language signature "
        "program module optimizer trainset metric bootstrap few shot demo prompt token "
        "which what who when where why how is was were river mountain city year"
    )
    words = np.array(vocabulary.split())

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words, n_words))

    contexts = [text(int(rng.integers(120, 200))) for _ in range(256)]
    questions = [text(int(rng.integers(8, 20))) + "?" for _ in range(256)]
    answers = [text(int(rng.integers(1, 5))) for _ in range(256)]
    text_bytes = sum(map(len, contexts)) + sum(map(len, questions)) + sum(map(len, answers))
    per_row = 3 * 4 + 8 + text_bytes / 256  # offsets, the "[i] " prefix, the text
    rows = max(1, int(size_mb * MB / per_row) + 1)
    pick = rng.integers(0, 256, size=rows)
    table = pa.table(
        {
            "question": pa.array([f"[{i}] {questions[k]}" for i, k in enumerate(pick)]),
            "answer": pa.array(answers).take(pick),
            "context": pa.array(contexts).take(pick),
        }
    )
    return table


def scan(table: pa.Table) -> int:
    """Read every byte of a table once (xor of its buffers)."""
    total = 0
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None and buf.size >= 8:
                    words = np.frombuffer(buf, dtype=np.uint64, count=buf.size // 8)
                    total ^= int(np.bitwise_xor.reduce(words))
    return total


def timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    """``reps`` timed runs after one untimed warm-up run (its time is the first entry
    returned apart, in ``cold``)."""
    times, result = [], None
    for _ in range(reps + 1):
        result = None
        gc.collect()
        start = perf()
        result = fn()
        times.append(perf() - start)
    return times, result


# ---- the three ways -------------------------------------------------------------------
def run_dspex(session: Any, table: pa.Table, reps: int) -> dict[str, Any]:
    (cold, *times), back = timed(lambda: session.call(IDENTITY, table), reps)
    ok = isinstance(back, pa.Table) and back.equals(table)
    start = perf()
    scan(back)
    scan_ms = (perf() - start) * 1e3
    start = perf()
    scan(table)
    local_ms = (perf() - start) * 1e3
    return {"times": times, "cold": cold, "ok": ok, "scan_ms": scan_ms, "scan_local_ms": local_ms}


def run_json(session: Any, table: pa.Table, reps: int) -> dict[str, Any]:
    rows = table.to_pylist()  # a JSON user starts and ends with rows

    def round_trip() -> list[dict[str, Any]]:
        (text,) = session.call(JSON_IDENTITY, [json.dumps(rows)])
        return json.loads(text)

    (cold, *times), back = timed(round_trip, reps)
    return {"times": times, "cold": cold, "ok": back == rows}


def run_ipp(view: Any, table: pa.Table, reps: int) -> dict[str, Any]:
    def round_trip() -> pa.Table:
        view.push({"t": table}, block=True)
        return view.pull("t", block=True)

    (cold, *times), back = timed(round_trip, reps)
    view.execute("del t", block=True)
    return {"times": times, "cold": cold, "ok": isinstance(back, pa.Table) and back.equals(table)}


def start_cluster(tmp: Path) -> tuple[Any, Any]:
    import ipyparallel

    say("starting a 1-engine ipyparallel cluster")
    profile = tmp / "ipyparallel"
    profile.mkdir()
    cluster = ipyparallel.Cluster(n=1, profile_dir=str(profile), log_level=logging.ERROR)
    client = cluster.start_and_connect_sync()
    view = client[0]
    view.push({"warm": pa.table({"a": [1]})}, block=True)
    return cluster, view


# ---- report ---------------------------------------------------------------------------
def mbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / MB / seconds


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def report(results: list[dict[str, Any]], notes: list[str]) -> None:
    head = (
        f"{'size':>6} {'rows':>8} {'tier':>10} | {'dspex s':>8} {'cold s':>7} {'MB/s':>7}"
        f" {'scan ms':>11}"
        f" | {'JSON s':>8} {'MB/s':>6} {'x':>6} | {'ipp s':>7} {'MB/s':>6} {'x':>6}"
    )
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        d, j, i = r["dspex"], r.get("json"), r.get("ipp")
        scan_text = f"{d['scan_ms']:.0f} ({d['scan_local_ms']:.0f})"
        print(
            f"{r['size_mb']:>4}MB {r['rows']:>8} {r['tier']:>10} | {d['median']:>8.3f}"
            f" {d['cold']:>7.3f} {fmt(d['mbps']):>7} {scan_text:>11}"
            f" | {fmt(j and j['median'], '.3f'):>8} {fmt(j and j['mbps']):>6}"
            f" {fmt(r.get('vs_json'), '.1f'):>6}"
            f" | {fmt(i and i['median'], '.3f'):>7} {fmt(i and i['mbps']):>6}"
            f" {fmt(r.get('vs_ipp'), '.1f'):>6}"
        )
    print(
        "\nMB/s = table.nbytes / median round-trip seconds (1 MB = 10^6 B), after one untimed "
        "warm-up round trip\nper size and method (cold s: that first one, dspex); x = dspex "
        "speed / baseline speed;\nscan ms = first full read of the returned (memory-mapped) "
        "table, in brackets the same read of the in-memory original."
    )
    target = next((r for r in results if r["size_mb"] == TARGET_SIZE), None)
    if target is not None:
        print(f"\nTargets at {TARGET_SIZE} MB:")
        checks = [
            ("effective speed", target["dspex"]["mbps"], TARGET_MBPS, "MB/s"),
            ("vs ipyparallel", target.get("vs_ipp"), TARGET_VS_IPP, "x"),
            ("vs JSON", target.get("vs_json"), TARGET_VS_JSON, "x"),
        ]
        for name, value, goal, unit in checks:
            verdict = "SKIPPED" if value is None else "PASS" if value >= goal else "MISS"
            print(f"  {name:<16} {fmt(value, '.1f'):>8} {unit:<5} target >= {goal:g}  {verdict}")
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 MB, 2 repetitions")
    parser.add_argument("--sizes", default="", help="MB sizes, comma-separated (1,10,100,500)")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default by size)")
    parser.add_argument("--json-max", type=float, default=100, help="largest JSON baseline, MB")
    parser.add_argument("--ipp-max", type=float, default=500, help="largest ipyparallel run, MB")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s] or (
        [1, 10] if args.quick else [1, 10, 100, 500]
    )
    sizes = [int(s) if s == int(s) else s for s in sizes]
    notes: list[str] = []
    results: list[dict[str, Any]] = []
    manager = cluster = None
    print(
        f"exchange benchmark: python {platform.python_version()}, pyarrow {pa.__version__}, "
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="dspex-bench-") as tmp:
            manager = PoolManager([PoolSpec("bench", size=1)])
            say("starting a pool of 1 kernel")
            manager.start()
            session = manager.session("bench")
            session.call(IDENTITY, make_table(2))  # warm: pyarrow imported in the kernel
            inline_max = manager.exchange.config.inline_max
            if any(s <= args.ipp_max for s in sizes):
                try:
                    cluster, view = start_cluster(Path(tmp))
                except Exception as exc:  # no ipyparallel: report dspex alone
                    notes.append(f"ipyparallel baseline skipped: {exc}")
            for size in sizes:
                reps = args.reps or (2 if args.quick else 5 if size <= 10 else 3)
                say(f"{size} MB: building the table")
                table = make_table(size)
                entry: dict[str, Any] = {
                    "size_mb": size,
                    "rows": table.num_rows,
                    "nbytes": table.nbytes,
                    "reps": reps,
                    "tier": "arrow-file" if table.nbytes >= inline_max else "message",
                }
                say(f"{size} MB: dspex x{reps}")
                entry["dspex"] = run_dspex(session, table, reps)
                if size <= args.json_max:
                    say(f"{size} MB: JSON x{reps}")
                    entry["json"] = run_json(session, table, reps)
                elif not any("JSON baseline" in n for n in notes):
                    notes.append(
                        f"JSON baseline skipped above {args.json_max:g} MB (--json-max): at "
                        "~50 MB/s it takes minutes and several GB of Python objects"
                    )
                if cluster is not None and size <= args.ipp_max:
                    say(f"{size} MB: ipyparallel x{reps}")
                    entry["ipp"] = run_ipp(view, table, reps)
                for key in ("dspex", "json", "ipp"):
                    if key in entry:
                        entry[key]["median"] = statistics.median(entry[key]["times"])
                        entry[key]["mbps"] = mbps(table.nbytes, entry[key]["median"])
                        if not entry[key]["ok"]:
                            notes.append(f"{key} at {size} MB did NOT return an equal value")
                for key, name in (("json", "vs_json"), ("ipp", "vs_ipp")):
                    if key in entry:
                        entry[name] = entry["dspex"]["mbps"] / entry[key]["mbps"]
                results.append(entry)
                del table
            leftovers = [p for p in manager.exchange.root.rglob("*") if p.is_file()]
            if leftovers:
                notes.append(f"{len(leftovers)} exchange file(s) left behind: {leftovers[:3]}")
            session.release()
    except Exception:
        traceback.print_exc()
        notes.append("the run stopped early on the error above")
    finally:
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as exc:
                notes.append(f"stopping ipyparallel failed: {exc}")
        if manager is not None:
            manager.shutdown()
    leaked = leaked_processes()
    for proc in leaked:
        notes.append(f"leaked process {proc.pid}: killed")
        proc.kill()
    if results:
        report(results, notes)
    else:
        for note in notes:
            print(f"note: {note}")
    if args.out:
        payload = {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": {"cpus": os.cpu_count(), "ram": psutil.virtual_memory().total},
            "results": results,
            "notes": notes,
        }
        Path(args.out).write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
