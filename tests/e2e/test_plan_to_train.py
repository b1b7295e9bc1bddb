"""The planner's promise, end to end: plan `tiny` for 8 CPU ranks, then `torchrun -m train parallel=<plan>` runs the
written config unchanged and reports its measured step time next to the predicted one."""

import json
import os
import subprocess
import sys

from conftest import REPO, clean_env, run_train


def test_planned_layout_runs_unchanged_under_torchrun(tmp_path):
    name = f"e2e_tiny8_{os.getpid()}"
    config = REPO / "configs" / "parallel" / f"{name}.yaml"
    plan = subprocess.run(
        [sys.executable, "-m", "parallel.plan", "model=tiny", "cluster=local", "cluster.num_devices=8",
         "plan.seq_len=128", "plan.global_batch=16", f"plan.name={name}", "plan.plot=", f"plan.out={tmp_path / 'plan.json'}"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    try:
        assert plan.returncode == 0, plan.stderr
        assert config.is_file() and f"parallel={name}" in plan.stdout
        best = json.loads((tmp_path / "plan.json").read_text())["candidates"][0]
        result = run_train(
            ["model=tiny", f"parallel={name}", "device=cpu", "train.steps=4", "logging.every=1", "logging.mode=disabled",
             "checkpoint.every=0", "train.eval_every=0", "data.max_bytes=2000000", f"run.dir={tmp_path / 'run'}"],
            nproc=8, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"planner predicted {best['step_time_s']:.3g}s" in result.stderr
    finally:
        config.unlink(missing_ok=True)
