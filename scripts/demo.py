"""The main job, end to end: two environments, their pools, calls, a session, health.

Run it with ``bash scripts/demo.sh`` (which sets up .venv and a demo DSPEX_HOME).
"""

from __future__ import annotations

import argparse
import sys
import time

from dspex_jupyter import PoolManager, PoolSpec
from dspex_jupyter.core import envs
from dspex_jupyter.core.errors import DependencyMissing, EnvironmentNotFound
from dspex_jupyter.core.spec import format_bytes

ENVIRONMENTS = {"demo-light": [], "demo-extra": ["six"]}


def say(message: str) -> None:
    print(f"[dspex demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_environment(name: str, packages: list[str]) -> envs.Environment:
    try:
        env = envs.get_environment(name)
        say(f"environment {name!r} already exists at {env.path}")
        return env
    except EnvironmentNotFound:
        pass
    say(f"creating environment {name!r} with {packages or 'no extra packages'} (pip, venv)")
    started = time.perf_counter()
    env = envs.create_environment(name, packages=packages, progress=lambda line: None)
    say(f"  done in {time.perf_counter() - started:.1f} s: {env.python}")
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    say(f"DSPEX_HOME is {envs.dspex_home()}")
    for name, packages in ENVIRONMENTS.items():
        ensure_environment(name, packages)

    specs = [
        PoolSpec("light", env="demo-light", size=2, env_vars={"DEMO_POOL": "light"}),
        PoolSpec("extra", env="demo-extra", size=2, warmup=["six"], max_memory="1GB"),
    ]
    with PoolManager(specs) as manager:
        say(f"pools started: {', '.join(manager.pools)}")
        light, extra = manager["light"], manager["extra"]

        say("calls: each pool runs in its own environment")
        print(f"  light sys.prefix: {light.call(prefix)}")
        print(f"  extra sys.prefix: {extra.call(prefix)}")
        print(f"  extra: six {extra.call(six_version)}")
        try:
            light.call(six_version)
        except DependencyMissing as exc:
            print(f"  light: {type(exc).__name__}: six is not installed there")
            print(f"         to add it: {exc.install_command}")

        say("map: squares of 0..9 spread over the light pool, order kept")
        print(f"  {light.map(square, range(10))}")

        say("a session keeps its state in one kernel")
        with extra.session(state={"run": "demo"}) as session:
            session.execute("total = sum(range(10))\nprint('total in the kernel:', total)")
            result = session.execute("total * 2", show=False)
            print(f"  total * 2 = {result.result} (same kernel, pid {session.pid})")

        say("health")
        for pool in manager.health()["pools"].values():
            print(f"  pool {pool['name']} ({pool['source']}), {pool['size']} kernels:")
            for k in pool["kernels"]:
                print(
                    f"    {k['id']:<8} pid {k['pid']:<7} {k['state']:<8} "
                    f"rss {format_bytes(k['rss']):>10}  calls {k['calls_served']:<3} "
                    f"up {k['uptime']:.1f} s"
                )
    say("shut down: no kernel left running")
    return 0


def prefix() -> str:
    import sys

    return sys.prefix


def six_version() -> str:
    import six

    return six.__version__


def square(x: int) -> int:
    return x * x


if __name__ == "__main__":
    sys.exit(main())
