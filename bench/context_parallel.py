"""Context parallelism on this machine: training tokens/s of the tiny model on one long sequence, in one process
and at cp = 2 and 4 with each implementation (ring, allgather, ulysses), each a torchrun job of gloo ranks.

On the 2-core development machine 2 and 4 ranks share two cores, so these figures show each exchange's overhead
against the others, not scaling: on real devices each rank has its own. `python -m bench context_parallel`, a few
minutes.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.smoke import _error_line, _launch

SEQ_LEN = 4096
STEPS = 6
SETTINGS = ("model=tiny", f"model.max_seq_len={SEQ_LEN}", "device=cpu", "train.mixed_precision=fp32",
            f"train.seq_len={SEQ_LEN}", "train.global_batch=1", "train.micro_batch=1", f"train.steps={STEPS}",
            "train.eval_every=0", "logging.mode=disabled", "logging.every=1", "checkpoint.every=0",
            "checkpoint.final=false", "data.max_bytes=2000000")
RUNS = [("cp1", 1, ())] + [(f"cp{cp} {impl}", cp, (f"parallel.cp={cp}", f"parallel.cp_impl={impl}"))
                           for cp in (2, 4) for impl in ("ring", "allgather", "ulysses")]


def _train(nproc: int, parallel: tuple[str, ...]) -> dict[str, Any]:
    launcher = ["-m", "train"] if nproc == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as run_dir:
        code, stderr = _launch([sys.executable, *launcher, *SETTINGS, *parallel, f"run.dir={run_dir}"], 900)
        metrics = Path(run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steady = [r["tokens_per_s"] for r in records if r.get("step", 0) > 2 and r.get("tokens_per_s")]
    if code != 0 or not steady:
        return {"error": stderr if code is None else f"exit code {code}: {_error_line(stderr)}"}
    losses = [r["loss"] for r in records if "loss" in r]
    return {"tokens_per_s": statistics.median(steady), "first_loss": losses[0], "last_loss": losses[-1]}


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {"seq_len": SEQ_LEN}
    failed = 0
    for name, nproc, parallel in RUNS:
        result = _train(nproc, parallel)
        figures[name] = result
        failed += "error" in result
        shown = f"{result['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in result else f"FAIL {result['error']}"
        print(f"  {name:<14} {shown}", flush=True)
    figures["failed"] = failed
    return figures
