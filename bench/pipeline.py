"""Pipeline benchmark: step time per schedule on 2 CPU ranks, and the measured bubble against the textbook one.

Each schedule trains the same small model (8 layers) with pp=2 and m micro-batches per step under torchrun, one
thread per rank. The ideal pipeline step is the same training step on one rank with one thread (the same trainer,
data and micro-batches), divided by p: perfect stages and no waiting. Measured bubble = (step time - ideal) / ideal,
the quantity the textbook writes as (p - 1) / m for GPipe and 1F1B and (p - 1) / (v m) for interleaved 1F1B;
zero-bubble schedules aim at 0. Here it also holds what the textbook leaves out: CPU send/recv of activations,
and the stage holding the output head being heavier than the others.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
PP = 2
MICRO_BATCHES = 8
MODEL = ["model.n_layers=8", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_hidden=768"]
COMMON = [
    *MODEL, "device=cpu", "train.mixed_precision=fp32", "train.seq_len=256", "train.micro_batch=2",
    f"train.global_batch={2 * MICRO_BATCHES}", "train.steps=8", "train.eval_every=0", "logging.mode=disabled",
    "logging.every=1", "checkpoint.every=0", "data.max_bytes=2000000",
]
SCHEDULES = {
    "gpipe": (["parallel.pp_schedule=gpipe"], 1),
    "1f1b": (["parallel.pp_schedule=1f1b"], 1),
    "interleaved_1f1b": (["parallel.pp_schedule=interleaved_1f1b", "parallel.vpp=2"], 2),
    "zero_bubble": (["parallel.pp_schedule=zero_bubble", "parallel.vpp=2"], 2),
    "dualpipev": (["parallel.pp_schedule=dualpipev", "parallel.vpp=2"], 2),
}


def _step_time(args: list[str], nproc: int = PP) -> float:
    """Median step time (s) of a torchrun run, from its metrics (warm-up steps dropped)."""
    run_dir = tempfile.mkdtemp(prefix="bench-pp-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train",
           *COMMON, *args, f"run.dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens = 2 * MICRO_BATCHES * 256
    return statistics.median(tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 2)


def run() -> dict[str, Any]:
    ideal = _step_time(["parallel.pp=1"], nproc=1) / PP
    results: dict[str, Any] = {"pp": PP, "micro_batches": MICRO_BATCHES, "ideal_step_s": ideal}
    for name, (args, vpp) in SCHEDULES.items():
        step = _step_time(["parallel.pp=2", *args])
        textbook = 0.0 if name in ("zero_bubble", "dualpipev") else (PP - 1) / (vpp * MICRO_BATCHES)
        results[name] = {"step_s": step, "measured_bubble": step / ideal - 1, "textbook_bubble": textbook}
    return results
