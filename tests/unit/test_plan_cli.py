"""`python -m parallel.plan`: the table, the JSON, the parallel config `train` accepts, the picture, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.dims import ParallelDims
from parallel.plan.__main__ import main
from train.config import load_config

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"tp", "pp", "vpp", "cp", "ep", "dp", "micro_batch", "recompute", "zero_stage", "schedule",
          "memory_gib_per_device", "step_time_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "hfu", "fits"}


def test_plan_for_a_small_world_writes_a_config_train_accepts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the planner writes under the current folder, and the trainer looks there
    name = "test_plan_cli_tiny8"
    code = main(["model=tiny", "cluster=local", "cluster.num_devices=8", "plan.seq_len=256", "plan.precision=fp32",
                 f"plan.name={name}", "plan.out=plan.json", "plan.plot=plan.png", "plan.top=3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "MFU" in printed and f"parallel={name}" in printed
    candidates = json.loads((tmp_path / "plan.json").read_text())["candidates"]
    assert candidates and FIELDS <= set(candidates[0])
    assert [c["step_time_s"] for c in candidates] == sorted(c["step_time_s"] for c in candidates)
    assert all(c["fits"] for c in candidates)
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert not (REPO / "configs" / "parallel" / f"{name}.yaml").exists()

    best = candidates[0]
    cfg = load_config([f"parallel={name}", "model=tiny", "device=cpu"])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep) == (
        best["tp"], best["pp"], best["cp"], best["ep"])
    assert cfg.parallel.dp_engine.value == best["dp_engine"]
    assert cfg.parallel.recompute.value == best["recompute"]
    # The file carries train.* too, which configs/train.yaml lets a group file set.
    assert (cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch) == (256, 16, best["micro_batch"])
    dims = ParallelDims.from_config(cfg.parallel, 8, cfg.model, cfg.train)
    assert dims.dp == best["dp"]
    assert (tmp_path / "configs" / "parallel" / f"{name}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("args, words", [
    (["model=nope"], "nope"),
    (["model=tiny", "cluster=local", "plan.seq_len=100000"], "plan.seq_len=100000"),
    (["model=tiny", "cluster=local", "cluster.num_devices=4", "plan.tp=8"], "no layout"),
    (["model=tiny", "cluster=local", "cluster.num_devices=4", "plan.tp=3"], "tp=3 does not divide n_heads=8"),
    (["model=tiny", "cluster=local", "cluster.num_devices=16", "plan.cp=16", "plan.cp_impl=ulysses"],
     "do not split 16 ways"),
    (["model=tiny", "cluster=local", "plan.cp_impl=spiral"], "plan.cp_impl='spiral'"),
    (["model=llama3_405b", "cluster=h100"], "cluster.num_devices="),
    (["model=tiny", "plan.bogus=1"], "bogus"),
])
def test_bad_input_is_one_clear_line(args: list[str], words: str) -> None:
    result = subprocess.run([sys.executable, "-m", "parallel.plan", *args, "plan.write_config=false", "plan.plot="],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
