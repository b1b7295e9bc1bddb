"""The reliability parts one by one: failure lines and their de-duplication through the job's store, the stalled-rank
watch, the run-folder lock, checkpoint verification and durability, preemption signals, metrics rewinding."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from configs.errors import CheckpointError, ConfigError
from conftest import REPO, clean_env
from launch.heartbeat import Heartbeat
from train import checkpoint as ckpt
from train.failures import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERNAL, EXIT_PEER, EXIT_PREEMPTED, Diverged,
                            PeerFailure, Preempted, error_line, first_failure, looks_collective, report)
from train.metrics import JsonlLogger
from train.preempt import PreemptionNotice
from train.rundir import RunDirError, claim, release, write_config

# ---- failure lines ---------------------------------------------------------------------------------------------


def test_exit_codes_and_lines():
    assert report(ConfigError("x"), 0, False) == EXIT_BAD_INPUT
    assert report(Diverged("x"), 0, False) == EXIT_DIVERGED
    assert report(PeerFailure("x"), 0, False) == EXIT_PEER
    assert report(Preempted("x"), 0, False) == EXIT_PREEMPTED
    assert report(ValueError("boom\nmore"), 0, False) == EXIT_INTERNAL
    assert error_line(ConfigError("bad value"), None) == "supertrain: error: bad value"
    assert error_line(ConfigError("bad value"), 3) == "supertrain: error: rank 3: bad value"
    assert error_line(Preempted("saved"), 0) == "supertrain: stopped: rank 0: saved"
    assert error_line(ValueError("boom\nmore"), None).startswith("supertrain: error: ValueError: boom (an unexpected")


def test_a_failure_every_rank_shares_is_printed_once(capsys):
    store = dist.HashStore()
    for rank in range(4):
        report(ConfigError("train.steps=3 is not beyond step 4"), rank, True, store)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["supertrain: error: rank 0: train.steps=3 is not beyond step 4"]
    assert first_failure(store) == "rank 0: train.steps=3 is not beyond step 4"


def test_a_different_failure_is_news_but_a_peer_failure_is_not(capsys):
    store = dist.HashStore()
    report(ConfigError("shard_00001.bin holds token id 70000"), 2, True, store)
    report(PeerFailure("a collective failed"), 0, True, store)  # the echo of rank 2's exit
    report(Diverged("step 5: the gradient norm is nan"), 1, True, store)  # a cause of its own
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["supertrain: error: rank 2: shard_00001.bin holds token id 70000",
                     "supertrain: error: rank 1: step 5: the gradient norm is nan"]


def test_config_errors_are_printed_by_rank_zero_alone(capsys):
    for rank in range(3):
        report(ConfigError("model.foo: Key 'foo' not in 'ModelConfig'"), rank, True, None, everyone=False)
    assert capsys.readouterr().err.count("supertrain: error") == 1


def test_collective_errors_are_recognised():
    assert looks_collective(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert looks_collective(RuntimeError("Timed out waiting 20000ms for recv operation to complete"))
    assert looks_collective(dist.DistBackendError("NCCL error"))
    assert not looks_collective(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not looks_collective(ValueError("gloo"))


# ---- the stalled-rank watch ------------------------------------------------------------------------------------


def test_watch_names_the_rank_that_went_quiet():
    store = dist.HashStore()
    stalled: list[str] = []
    quiet = Heartbeat(store, 1, 3, lambda phase: 0, stalled.append, period_s=0.05)
    quiet.progress(7, "train step")
    quiet.start()
    quiet.stop()  # rank 1 stops beating at step 7 ...
    late = Heartbeat(store, 2, 3, lambda phase: 0, stalled.append, period_s=0.05)
    late.progress(6, "evaluation")
    late.start()  # ... rank 2 keeps beating, one step behind
    watch = Heartbeat(store, 0, 3, lambda phase: 0.3 if phase == "train step" else 0, stalled.append,
                      period_s=0.05)
    watch.progress(8, "train step")
    watch.start()
    deadline = time.monotonic() + 10
    while not stalled and time.monotonic() < deadline:
        time.sleep(0.05)
    late.stop()
    assert len(stalled) == 1
    message = stalled[0]
    assert message.startswith("no progress for ") and "in step 8 (train step)" in message
    assert "rank 1 (at step 7, train step, last heard" in message
    assert "rank 2 (at step 6, evaluation" in message
    assert "parallel.stall_timeout_s" in message


def test_watch_names_a_rank_that_never_reported():
    store = dist.HashStore()
    watch = Heartbeat(store, 0, 2, lambda phase: 0, lambda message: None)
    watch.progress(1, "first step")
    watch._beat()
    assert watch.laggards() == ["rank 1 (never reported)"]


def test_watch_stays_silent_while_progress_is_made():
    store = dist.HashStore()
    stalled: list[str] = []
    watch = Heartbeat(store, 0, 1, lambda phase: 0.5, stalled.append, period_s=0.05).start()
    for step in range(20):
        watch.progress(step, "train step")
        time.sleep(0.05)
    watch.stop()
    assert stalled == []


# ---- the run folder --------------------------------------------------------------------------------------------

_HOLD = "import sys, time; from pathlib import Path; from train.rundir import claim; claim(Path(sys.argv[1])); " \
        "print('held', flush=True); time.sleep(60)"


def test_a_second_job_on_a_run_folder_is_refused_and_a_restart_is_not(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=REPO, env=clean_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"run.dir={tmp_path} is in use by another run \(host .*, pid "
                                              rf"{holder.pid}, since .*\): wait for it"):
            claim(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    claim(tmp_path)  # the holder is gone (as a restarted job's old processes are): the lock is free
    claim(tmp_path)  # a second run in this same process keeps it
    release(tmp_path)


@pytest.mark.parametrize("where", ["/proc/supertrain-run", "/tmp/" + "x" * 300])
def test_an_unusable_run_folder_is_one_line(where):
    with pytest.raises(RunDirError, match=rf"run.dir={where} cannot be used: .*: choose a writable folder"):
        claim(Path(where))


def test_config_of_an_earlier_start_is_kept_and_changes_are_named(tmp_path, caplog):
    write_config(tmp_path, {"optim": {"lr": 0.003}, "train": {"steps": 10}})
    write_config(tmp_path, {"optim": {"lr": 0.003}, "train": {"steps": 10}})  # the same: nothing new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    with caplog.at_level(logging.WARNING, logger="supertrain"):
        write_config(tmp_path, {"optim": {"lr": 0.001}, "train": {"steps": 10}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.1.yaml", "config.yaml"]
    assert "lr: 0.003" in (tmp_path / "config.1.yaml").read_text()
    assert "optim.lr 0.003 -> 0.001" in caplog.text


# ---- checkpoints -----------------------------------------------------------------------------------------------


def _save(root: Path, step: int, keep_last: int = 0) -> Path:
    manager = ckpt.CheckpointManager(root, 0, lambda: None, keep_last)

    def write(folder: Path) -> None:
        dcp.save({"weight": torch.full((4096,), float(step)), "bias": torch.zeros(16)}, checkpoint_id=str(folder))
        ckpt.write_trainer_state(folder, {"step": step})

    return manager.save(step, write, {"engine": "native"})


def _shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: _shard(p).write_bytes(_shard(p).read_bytes()[:100]), r"__0_0.distcp is truncated \(100 of \d+ bytes\)"),
    (lambda p: _shard(p).unlink(), "__0_0.distcp is missing"),
    (lambda p: (p / ".metadata").unlink(), "its DCP .metadata is missing"),
    (lambda p: (p / ".metadata").write_bytes(b"not a pickle"), r"its DCP .metadata cannot be read"),
    (lambda p: (p / ckpt.TRAINER_STATE).write_text("{"), "trainer_state.json does not parse"),
], ids=["truncated shard", "missing shard", "missing metadata", "corrupt metadata", "corrupt trainer state"])
def test_damaged_checkpoints_are_found(tmp_path, damage, reason):
    path = _save(tmp_path, 1)
    assert ckpt.problem(path) is None
    damage(path)
    assert ckpt.problem(path) is not None and __import__("re").search(reason, ckpt.problem(path))
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=.* is damaged \(.*\): pick another"):
        ckpt.resolve_resume(tmp_path, str(path))


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "step_3" / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger="supertrain"):
        assert ckpt.resolve_resume(tmp_path, "auto") == tmp_path / "step_2"
    warnings = [r.getMessage() for r in caplog.records if r.name == "supertrain"]
    assert warnings == ["checkpoint step_3 is damaged (its DCP .metadata is missing): resuming from step_2 instead"]
    for step in (1, 2):
        _shard(tmp_path / f"step_{step}").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: the newest, step_3, is damaged"):
        ckpt.resolve_resume(tmp_path, "auto")


def test_keep_last_never_counts_a_damaged_checkpoint(tmp_path):
    _save(tmp_path, 1, keep_last=1)
    _save(tmp_path, 2, keep_last=1)
    assert [s for s, _ in ckpt.committed_checkpoints(tmp_path)] == [2]
    (tmp_path / "step_2" / ".metadata").unlink()  # the disk ate it
    _save(tmp_path, 3, keep_last=1)
    (tmp_path / "step_3" / ".metadata").unlink()
    _save(tmp_path, 4, keep_last=1)
    # step_4 is the newest intact one; the damaged ones newer than the kept one stay for a look, older ones go.
    assert [s for s, _ in ckpt.committed_checkpoints(tmp_path)] == [4]
    (tmp_path / "step_4" / ".metadata").unlink()
    _save(tmp_path, 5, keep_last=2)
    assert [s for s, _ in ckpt.committed_checkpoints(tmp_path)] == [4, 5]  # 4 is damaged: 5 alone counts, 4 stays


def test_everything_is_on_disk_before_the_marker(tmp_path, monkeypatch):
    """The marker is written only after every file and folder of the checkpoint was fsynced, and the parent folder
    is synced after the rename that publishes it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = _save(tmp_path, 7)
    staging = str(tmp_path / "step_7.tmp")
    marker = synced.index(f"{staging}/{ckpt.COMMIT_MARKER}")
    before = set(synced[:marker])
    for file in path.rglob("*"):
        if file.name != ckpt.COMMIT_MARKER:
            assert f"{staging}/{file.relative_to(path)}" in before, file
    assert staging in before
    assert synced[-1] == str(tmp_path)


# ---- preemption ------------------------------------------------------------------------------------------------


def test_both_signals_ask_for_a_stop(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        notice = PreemptionNotice(grace_s=30).install()
        try:
            assert not notice.requested()
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert notice.requested() and notice.received[0] == sig.name
            notice.saved()
        finally:
            notice.uninstall()


def test_a_save_that_outlives_the_grace_period_exits_75(tmp_path):
    script = ("import os, signal, time; from train.preempt import PreemptionNotice; "
              "PreemptionNotice(grace_s=1).install(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == EXIT_PREEMPTED
    assert result.stderr.strip() == ("supertrain: error: SIGTERM arrived 1 s ago and the checkpoint it asked for has "
                                     "not finished: stopping without it (the previous checkpoint is intact; raise "
                                     "checkpoint.preempt_grace_s)")


# ---- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_rewind_keeps_each_step_once(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step)
    logger.rewind(3)
    for step in (4, 5):
        logger.log({"loss": step + 0.5}, step)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5)]
