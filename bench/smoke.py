"""Smoke test for a freshly lent accelerator: does the harness train end to end in every layout this machine can run?

`python -m bench smoke` trains `tiny` and `tiny_moe` for 20 steps in each layout below that fits the device count
(single device; then, with 2 devices, FSDP2, tp=2 + sequence parallel, pp=2 with 1F1B and MoE ep=2; with 4, tp=2 x
FSDP 2 and MoE ep=2 x FSDP 4), each as its own `python -m train` or torchrun process, in bf16 on the accelerator
that `launch.device.resolve_device("auto")` finds. Without one it runs every layout on CPU with gloo (2 or 4
processes, fp32, shorter sequences): that is how it is tested. A layout passes when the process exits 0, all 20 steps
are logged in `run.dir/metrics.jsonl`, every loss is finite and the last loss is below the first. One line per layout:

    PASS tiny tp2 sp         loss 6.32 -> 2.94  1,792 tok/s  mfu 18.5%  (17.3 s)
    FAIL tiny pp2 1f1b       exit code 1: RuntimeError: ...  (10.2 s)

A FAIL line gives the last error line of the layout's stderr, or which check failed, or that it timed out (a hang
is stopped after `timeout_s`, 300 s); the run goes on to the next layout, and bench/results/smoke.json has
`"passed": false` for it. tok/s and MFU are medians over the steps after the first two (global, all ranks); on CPU
MFU is against the matmul rate measured at start-up, so indicative only. On the 2-core development CPU the whole run
takes about 2.5 minutes, half of it the two 4-process layouts; on an accelerator each layout should take seconds,
mostly start-up (not yet measured on one).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launch.device import CPU, Device, resolve_device

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
TIMEOUT_S = 300
CPU_DEVICES = 4  # gloo processes stand in for devices: the 4-rank layouts run on CPU too


@dataclass(frozen=True)
class Layout:
    name: str
    model: str
    nproc: int
    parallel: tuple[str, ...] = ()


LAYOUTS = (
    Layout("tiny", "tiny", 1),
    Layout("tiny_moe", "tiny_moe", 1),
    Layout("tiny fsdp2", "tiny", 2, ("parallel.dp_shard=2",)),
    Layout("tiny tp2 sp", "tiny", 2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    Layout("tiny pp2 1f1b", "tiny", 2, ("parallel.pp=2", "parallel.pp_schedule=1f1b")),
    Layout("tiny_moe ep2", "tiny_moe", 2, ("parallel.ep=2", "parallel.dp_shard=2")),
    Layout("tiny tp2 fsdp2", "tiny", 4, ("parallel.tp=2", "parallel.dp_shard=2")),
    Layout("tiny_moe ep2 fsdp4", "tiny_moe", 4, ("parallel.ep=2", "parallel.dp_shard=4")),
)
COMMON = ("logging.mode=disabled", "logging.every=1", "checkpoint.every=0", "checkpoint.final=false",
          "train.eval_every=0", "data.max_bytes=2000000")
# Batch sizes divide by every layout's data-parallel degree times its micro-batch (4 ranks of dp at most).
ON_CPU = ("device=cpu", "train.mixed_precision=fp32", "train.seq_len=128", "train.global_batch=8",
          "train.micro_batch=2")
ON_ACCELERATOR = ("train.mixed_precision=bf16", "train.seq_len=256", "train.global_batch=16", "train.micro_batch=4")
# An exception's last line ("RuntimeError: ...") or the trainer's own one-line error; not torchrun's wrapper.
_ERROR_LINE = re.compile(r"^(supertrain: error|[\w.]*(Error|Exception)\b)")


def layouts_for(device: Device) -> list[Layout]:
    available = CPU_DEVICES if device.kind == CPU else device.device_count()
    return [layout for layout in LAYOUTS if layout.nproc <= available]


def _command(layout: Layout, device: Device, steps: int, run_dir: str) -> list[str]:
    launcher = ["-m", "train"] if layout.nproc == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={layout.nproc}", "-m", "train"]
    setting = ON_CPU if device.kind == CPU else (f"device={device.kind}", *ON_ACCELERATOR)
    return [sys.executable, *launcher, f"model={layout.model}", f"train.steps={steps}", *COMMON, *setting,
            *layout.parallel, f"run.dir={run_dir}"]


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line) and "ChildFailedError" not in line]
    return (errors or lines or ["no output"])[-1]


def _launch(cmd: list[str], timeout_s: float) -> tuple[Optional[int], str]:
    """(exit code, stderr) of `cmd`; (None, "timed out ...") once it and its workers are stopped after a hang."""
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on to its workers (in sessions of their own)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()  # not communicate(): a worker that outlived torchrun may hold the pipe open
            process.stderr.close()
        return None, f"timed out after {timeout_s:g} s"
    return process.returncode, stderr


def run_layout(layout: Layout, device: Device, steps: int = STEPS, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Train one layout; its figures, with `passed` and, on failure, `error`."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as run_dir:
        returncode, stderr = _launch(_command(layout, device, steps, run_dir), timeout_s)
        metrics = Path(run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    figures: dict[str, Any] = {"nproc": layout.nproc, "wall_s": time.time() - started}
    losses = [r.get("loss") for r in records if "loss" in r]
    finite = all(loss is not None and math.isfinite(loss) for loss in losses)  # metrics.jsonl writes NaN as null
    if returncode != 0:
        error = stderr if returncode is None else f"exit code {returncode}: {_error_line(stderr)}"
    elif len(losses) != steps:
        error = f"{len(losses)} of {steps} steps logged"
    elif not finite:
        error = f"non-finite loss: {losses}"
    elif losses[-1] >= losses[0]:
        error = f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    else:
        error = None
    if losses and finite:
        figures.update(first_loss=losses[0], last_loss=losses[-1])
    steady = [r for r in records if r["step"] > 2] or records
    for key in ("tokens_per_s", "mfu"):
        values = [r[key] for r in steady if r.get(key) is not None]
        figures[key] = statistics.median(values) if values else None
    figures["passed"] = error is None
    if error:
        figures["error"] = error
    return figures


def _line(name: str, figures: dict[str, Any]) -> str:
    if not figures["passed"]:
        return f"FAIL {name:<19} {figures['error']}  ({figures['wall_s']:.1f} s)"
    mfu = f"{100 * figures['mfu']:.1f}%" if figures["mfu"] is not None else "n/a"
    return (f"PASS {name:<19} loss {figures['first_loss']:.2f} -> {figures['last_loss']:.2f}  "
            f"{figures['tokens_per_s']:,.0f} tok/s  mfu {mfu}  ({figures['wall_s']:.1f} s)")


def run(steps: int = STEPS, layouts: Optional[list[Layout]] = None, device: Optional[Device] = None,
        timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Every layout that fits (or `layouts`), one PASS/FAIL line each as it finishes; never raises on a failure."""
    device = device or resolve_device("auto")
    layouts = layouts_for(device) if layouts is None else layouts
    print(f"smoke: {len(layouts)} layouts on {device.name()} ({device.backend}), {steps} steps each", flush=True)
    results: dict[str, Any] = {"device": f"{device.name()} ({device.backend})"}
    for layout in layouts:
        results[layout.name] = run_layout(layout, device, steps, timeout_s)
        print(_line(layout.name, results[layout.name]), flush=True)
    passed = sum(results[layout.name]["passed"] for layout in layouts)
    results["passed"] = f"{passed}/{len(layouts)}"
    results["failed"] = len(layouts) - passed
    print(f"smoke: {passed} of {len(layouts)} layouts passed", flush=True)
    return results
