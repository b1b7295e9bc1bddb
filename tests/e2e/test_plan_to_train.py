"""The planner's promise, end to end: plan `tiny` for 8 CPU ranks, then `torchrun -m train parallel=<plan>` runs the
written config unchanged and reports its measured step time next to the predicted one."""

import json
import subprocess
import sys

import pytest

from conftest import clean_env, run_train


@pytest.mark.slow
def test_planned_layout_runs_unchanged_under_torchrun(tmp_path):
    name = "e2e_tiny8"
    plan = subprocess.run(
        [sys.executable, "-m", "parallel.plan", "model=tiny", "cluster=local", "cluster.num_devices=8",
         "plan.seq_len=128", "plan.global_batch=16", f"plan.name={name}", "plan.plot=", "plan.out=plan.json"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert plan.returncode == 0, plan.stderr
    assert (tmp_path / "configs" / "parallel" / f"{name}.yaml").is_file() and f"parallel={name}" in plan.stdout
    best = json.loads((tmp_path / "plan.json").read_text())["candidates"][0]
    result = run_train(
        ["model=tiny", f"parallel={name}", "device=cpu", "train.steps=4", "logging.every=1", "logging.mode=disabled",
         "checkpoint.every=0", "train.eval_every=0", "data.max_bytes=2000000", f"run.dir={tmp_path / 'run'}"],
        nproc=8, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"planner predicted {best['step_time_s']:.3g}s" in result.stderr
