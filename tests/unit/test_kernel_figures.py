"""The figures a kernel reports about itself (runtime/health.py), measured in this process:
its tree's RSS with psutil and, where psutil is missing, from /proc, against psutil's view."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest

from dspex_jupyter.runtime import health, proc_tree

MB = 1_000_000
HOLD = "import sys; block = b'x' * 80_000_000; print('ready', flush=True); sys.stdin.read()"


@pytest.fixture
def child_holding_memory():
    """A child of this process that holds 80 MB until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def _psutil_tree() -> int:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def test_tree_rss_counts_children_and_agrees_with_psutil(child_holding_memory, monkeypatch):
    pids, rss = health._tree()
    assert child_holding_memory.pid in pids and os.getpid() in pids
    expected = _psutil_tree()
    assert abs(rss - expected) <= max(0.05 * expected, 5 * MB)
    assert rss > 80 * MB  # the child's block counts
    monkeypatch.setitem(sys.modules, "psutil", None)  # a kernel without psutil: /proc
    pids, rss = health._tree()
    assert child_holding_memory.pid in pids
    assert abs(rss - expected) <= max(0.05 * expected, 5 * MB)
    # and a Linux built without /proc/<pid>/task/<tid>/children: one scan of /proc
    monkeypatch.setattr(proc_tree, "thread_children", lambda pid: None)
    pids, scanned = health._tree()
    assert child_holding_memory.pid in pids
    assert abs(scanned - expected) <= max(0.05 * expected, 5 * MB)


def test_kernel_figures_say_where_and_how_much():
    first = health.kernel_figures(fresh_gpu=True)
    assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
    assert first["rss"] > 0 and first["processes"] >= 1
    assert first["memory_total"] and first["memory_total"] > first["rss"]
    gpu = first["gpu"]
    assert set(gpu) == {"available", "source", "reason", "devices"}
    if not gpu["available"]:  # this machine: no GPU, and the figures say why
        assert gpu["reason"] and gpu["devices"] == []
    sum(range(2_000_000))  # some CPU between two samples
    second = health.kernel_figures()
    assert second["cpu_percent"] is not None and second["cpu_percent"] >= 0
    assert second["cpu_seconds"] >= first["cpu_seconds"]


def test_the_feed_yields_figures_at_once_and_the_op_is_registered():
    from dspex_jupyter.runtime import OPS

    feed = health.figures_feed(interval_s=0.01, limit=10 * MB)
    assert next(feed)["rss"] > 0  # no wait before the first
    feed.close()
    assert OPS["kernel_figures"] is health.kernel_figures_op
