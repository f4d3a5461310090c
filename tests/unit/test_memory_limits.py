"""The /proc watch's measure: a process tree's RSS, found both ways the watch can."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dspex_jupyter.core import memory_limits
from dspex_jupyter.runtime import proc_tree

CHILD = (
    "import sys\n"
    "block = bytearray(60_000_000)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.parametrize("children_files", [True, False])
def test_tree_rss_counts_a_child(monkeypatch, children_files):
    if children_files and not proc_tree.has_children_files():
        pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children")
    monkeypatch.setattr(proc_tree, "has_children_files", lambda: children_files)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        alone = proc_tree.statm_rss(os.getpid())
        tree = memory_limits.process_tree_rss(os.getpid(), memory_limits._Descendants())
        assert tree >= alone + 60_000_000
    finally:
        child.kill()
        child.wait()


def test_no_pid_uses_nothing():
    assert memory_limits.process_tree_rss(None) == 0


def test_a_bad_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv(memory_limits.ENV_VAR, "fast")
    with pytest.raises(memory_limits.MemoryLimitsUnavailable, match="auto, cgroup, proc"):
        memory_limits.memory_limits(1 << 30, lambda w, u: None, lambda w, u: None)


def test_proc_is_chosen_when_asked(monkeypatch):
    monkeypatch.setenv(memory_limits.ENV_VAR, "proc")
    limits = memory_limits.memory_limits(1 << 30, lambda w, u: None, lambda w, u: None)
    assert limits.kind == "proc"
