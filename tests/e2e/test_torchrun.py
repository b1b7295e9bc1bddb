"""The issue's launch lines under torchrun: 4 ranks train `tiny`, checkpoint, and resume, under FSDP2 and ZeRO-3."""

import pytest

from conftest import FAST, needs_deepspeed, read_metrics, run_train
from train.checkpoint import committed_checkpoints

# Tens of seconds to minutes: real ranks (or a build) per layout.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "engine",
    [["parallel.dp_shard=4", "parallel.dp_engine=fsdp"],
     pytest.param(["parallel.dp_engine=deepspeed", "parallel.zero_stage=3"], marks=needs_deepspeed)],
    ids=["fsdp", "zero3"],
)
def test_four_ranks_train_and_resume(tmp_path, engine):
    run_dir = tmp_path / "run"
    args = ["model=tiny", *engine, *FAST, "train.micro_batch=2", "checkpoint.every=2", "logging.mode=offline",
            f"run.dir={run_dir}"]
    first = run_train([*args, "train.steps=4"], nproc=4, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [s for s, _ in committed_checkpoints(run_dir / "checkpoints")] == [2, 4]

    # Same run folder, longer run: resume=auto (the default) continues from step 4.
    second = run_train([*args, "train.steps=6"], nproc=4, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "step_4" in second.stderr
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes metrics: each step once

    # One wandb run (rank 0 only, resumed in place), one log file per rank.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one per launch, same run id
    assert {p.name for p in (run_dir / "logs").iterdir()} == {f"rank_{r}.log" for r in range(4)}
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert losses[-1] < losses[0]
