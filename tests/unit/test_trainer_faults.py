"""Faults inside a real single-process training run: a poisoned batch (its logits turned into nan, or scaled into a
loss spike, by a forward hook) under train.nonfinite=stop, skip and rollback; non-finite weights at a save; a disk
that refuses a save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from configs.errors import CheckpointError
from conftest import FAST, read_metrics
from launch.device import resolve_device
from parallel.dims import ParallelDims
from train import checkpoint as ckpt
from train.config import load_config
from train.failures import Diverged
from train.trainer import Trainer

STEP_BATCH = 8  # FAST's train.global_batch: the sampler's offset moves by this much per step


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    cfg = load_config([*FAST, "device.peak_tflops=1", f"run.dir={run_dir}", *overrides])
    dims = ParallelDims.from_config(cfg.parallel, 1, cfg.model, cfg.train)
    return Trainer(cfg, resolve_device("cpu"), dims, run_dir)


class Poison:
    """Turns the logits of the batches drawn at the given (epoch, offset) positions into nan (or multiplies them by
    `scale`), counting how often each was trained on."""

    def __init__(self, trainer: Trainer, positions: set[tuple[int, int]], scale: Optional[float] = None) -> None:
        self.trainer = trainer
        self.positions = positions
        self.scale = scale
        self.hits: list[tuple[int, int]] = []  # the poisoned position of each step that drew one
        self._step = -1
        trainer.engine.parts[0].register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> Optional[torch.Tensor]:
        position = self.trainer.sampler.last_position
        if not module.training or position not in self.positions:
            return None
        if not self.hits or self.hits[-1] != position or self.trainer.step != self._step:  # once per step
            self.hits.append(position)
            self._step = self.trainer.step
        return output * (float("nan") if self.scale is None else self.scale)


def _parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.engine.parts[0].named_parameters()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m.get("event") == kind]


def test_stop_raises_before_the_update_and_writes_no_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=6", "checkpoint.every=1", "train.nonfinite=stop")
    Poison(trainer, {(0, 2 * STEP_BATCH)})  # the third step's batch
    for _ in range(2):
        trainer.train_step()
        trainer.save_checkpoint()
    before = _parameters(trainer)
    with pytest.raises(Diverged, match=r"step 3: the gradient norm is nan .*train.nonfinite=skip or rollback"):
        trainer.train_step()
    assert _equal(_parameters(trainer), before)  # the bad update was never applied
    assert [s for s, _ in ckpt.committed_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_skip_drops_the_update_and_goes_on(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=5", "train.nonfinite=skip")
    poison = Poison(trainer, {(0, 2 * STEP_BATCH)})
    trainer.train_step()
    trainer.train_step()
    before = _parameters(trainer)
    trainer.train_step()  # step 3: poisoned, dropped
    assert trainer.step == 3 and _equal(_parameters(trainer), before)
    trainer.train_step()
    assert not _equal(_parameters(trainer), before)
    assert poison.hits == [(0, 2 * STEP_BATCH)]
    trainer.logger.finish()
    skipped = _events(tmp_path, "skipped")
    assert [e["step"] for e in skipped] == [3] and "gradient norm is nan" in skipped[0]["reason"]


def test_skip_stops_after_max_skips_in_a_row(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=10", "train.nonfinite=skip", "train.max_skips=2")
    Poison(trainer, {(0, o * STEP_BATCH) for o in range(1, 10)})  # every batch from step 2 on
    trainer.train_step()
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(Diverged, match=r"step 4: .*the 3th step in a row without an update \(train.max_skips=2\)"):
        trainer.train_step()


def test_rollback_reloads_the_last_checkpoint_and_leaves_the_batch_out(tmp_path):
    """Step 5's batch is poisoned: the run goes back to step_4, never trains on that batch again, finishes, and logs
    each step once; the sampler state in later checkpoints carries the left-out batch, so a resume from them
    reproduces the rest bitwise."""
    run = tmp_path / "run"
    args = ("train.steps=8", "checkpoint.every=2", "train.nonfinite=rollback")
    trainer = _trainer(run, *args)
    bad = (0, 4 * STEP_BATCH)
    poison = Poison(trainer, {bad})
    trainer.fit()
    assert poison.hits == [bad]
    rollbacks = _events(run, "rollback")
    assert len(rollbacks) == 1 and rollbacks[0]["failed_step"] == 5 and rollbacks[0]["to"].endswith("step_4")
    assert rollbacks[0]["left_out"] == [list(bad)]
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, 9))  # the rolled-back step is not a row of its own
    state = json.loads((run / "checkpoints" / "step_6" / ckpt.TRAINER_STATE).read_text())
    assert state["sampler"]["left_out"] == [list(bad)]

    # Resuming from step_6 (which knows about the left-out batch) gives steps 7 and 8 bit for bit.
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(run / "checkpoints" / "step_6", again / "checkpoints" / "step_6")
    resumed = _trainer(again, *args)
    Poison(resumed, {bad})
    resumed.fit()
    want = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}
    got = {m["step"]: m["loss"] for m in read_metrics(again) if "loss" in m}
    assert sorted(got) == [7, 8] and all(got[s] == want[s] for s in got)


def test_rollback_without_a_checkpoint_stops(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=4", "train.nonfinite=rollback")
    Poison(trainer, {(0, STEP_BATCH)})
    trainer.train_step()
    with pytest.raises(Diverged, match="there is no checkpoint to roll back to"):
        trainer.train_step()


def test_a_loss_spike_feeds_the_same_policy(tmp_path):
    """With spike detection on, a finite but far-too-high loss is treated like a non-finite one."""
    trainer = _trainer(tmp_path, "train.steps=12", "train.nonfinite=skip", "train.spike_sigmas=4",
                       "train.spike_window=5", "optim.warmup_steps=1", "optim.lr=1e-4")
    Poison(trainer, {(0, 9 * STEP_BATCH)}, scale=1e3)  # step 10
    before = None
    for step in range(1, 11):
        if step == 10:
            before = _parameters(trainer)
        trainer.train_step()
    assert _equal(_parameters(trainer), before)
    trainer.logger.finish()
    skipped = _events(tmp_path, "skipped")
    assert [e["step"] for e in skipped] == [10] and "the loss spiked to" in skipped[0]["reason"]


def test_non_finite_parameters_are_never_saved(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=4", "checkpoint.every=1")
    trainer.train_step()
    trainer.save_checkpoint()
    with torch.no_grad():
        next(trainer.engine.parts[0].parameters()).view(-1)[0] = float("inf")
    with pytest.raises(Diverged, match="the parameters are not finite, so no checkpoint was written"):
        trainer.save_checkpoint()
    assert [s for s, _ in ckpt.committed_checkpoints(tmp_path / "checkpoints")] == [1]
    assert not (tmp_path / "checkpoints" / "step_1.tmp").exists()


def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The disk fills up while DCP writes a shard: DCP's CheckpointException (a BaseException) becomes one line, and
    the committed checkpoint before it stays the newest and intact."""
    from torch.distributed.checkpoint import FileSystemWriter

    trainer = _trainer(tmp_path, "train.steps=4", "checkpoint.every=1")
    trainer.train_step()
    trainer.save_checkpoint()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    trainer.train_step()
    with pytest.raises(CheckpointError, match=r"saving step_2 failed \(rank 0: OSError: \[Errno 28\] No space left on "
                                              r"device\): .*checkpoints already saved are untouched"):
        trainer.save_checkpoint()
    checkpoints = ckpt.committed_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in checkpoints] == [1] and ckpt.problem(checkpoints[0][1]) is None


def test_a_checkpoint_with_separate_gate_and_up_tensors_is_refused_in_one_line(tmp_path):
    """Checkpoints written before SwiGLU's gate and up projections became one tensor (w13) hold w1 and w3: the
    load names them and the way over, before any collective or any tensor is touched."""
    import torch.distributed.checkpoint as dcp

    trainer = _trainer(tmp_path / "run")
    before = _parameters(trainer)
    legacy: dict[str, torch.Tensor] = {}
    for name, param in trainer.engine.parts[0].state_dict().items():
        if name.endswith("w13.weight"):
            legacy[name.replace("w13", "w1")] = param[:, 0].clone()
            legacy[name.replace("w13", "w3")] = param[:, 1].clone()
        else:
            legacy[name] = param.clone()
    dcp.save({"model": legacy}, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"holds layers\.0\.feed_forward\.w1\.weight and w3: SwiGLU's gate and "
                                              r"up projections as two tensors.*checkpoint\.init_from_hf"):
        trainer.engine.load(tmp_path / "old")
    assert _equal(_parameters(trainer), before)
