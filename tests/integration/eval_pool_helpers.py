"""Metrics for eval-pool tests, importable inside pool kernels."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any


class GatedMetric:
    """The task's metric, except that the first eval-pool kernel to score an example
    claims the gate (writes its pid to ``claim``) and then holds its shard until it is
    killed. Only a kernel that has loaded ``runtime/eval_shard.py`` (an eval kernel)
    claims; every other call, the run's own kernel included, is the plain metric."""

    def __init__(self, metric: Any, folder: str) -> None:
        self.metric = metric
        self.folder = folder

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> Any:
        if "dspex_jupyter.runtime.eval_shard" in sys.modules and self._claim():
            threading.Event().wait()  # held until the test kills this kernel
        return self.metric(example, prediction, trace)

    def _claim(self) -> bool:
        try:
            fd = os.open(Path(self.folder) / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        (Path(self.folder) / "claimed").touch()  # written after the pid: complete
        return True
