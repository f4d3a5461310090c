"""A true no-op, importable by pool kernels and ipyparallel engines started from the repo root.

Pool kernels run with the starting process's working directory, so ``bench.noop:noop``
resolves there when the benchmark is run from the repository root.
"""


def noop() -> None:
    return None
