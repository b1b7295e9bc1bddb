"""`python -m train` as users run it: outputs, resume equality, crash safety and one-line errors."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, REPO, clean_env, losses_by_step, read_metrics, run_train
from models.kernels.cpu import native as cpu_native
from train.checkpoint import COMMIT_MARKER, committed_checkpoints

SECRET = "sentinel" + "0123456789abcdef" * 2


def test_training_writes_metrics_checkpoints_and_offline_wandb(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "train.steps=8", "checkpoint.every=4", "logging.mode=offline", "train.eval_every=4", f"run.dir={run_dir}"]
    result = run_train(args, env=clean_env(WANDB_API_KEY=SECRET))
    assert result.returncode == 0, result.stderr

    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for m in metrics:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_bytes"} <= m.keys()
        assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["memory_bytes"] > 2**20
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
    assert {m["step"] for m in read_metrics(run_dir) if "val_loss" in m} == {4, 8}

    assert [step for step, _ in committed_checkpoints(run_dir / "checkpoints")] == [4, 8]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank_0.log").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0

    # The API key from the environment never lands in anything the run wrote, nor in its output.
    assert SECRET not in result.stdout + result.stderr
    for file in run_dir.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_resumed_run_reproduces_the_uninterrupted_one_bitwise(tmp_path):
    args = [*FAST, "train.steps=6", "checkpoint.every=3"]
    full = tmp_path / "full"
    assert run_train([*args, f"run.dir={full}"]).returncode == 0
    # Stop at step 3: a fresh run folder that holds only the step-3 checkpoint, then resume=auto.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    result = run_train([*args, f"run.dir={resumed}"])
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr

    want, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]  # bitwise, not approximately
    norms = {m["step"]: m["grad_norm"] for m in read_metrics(full) if "loss" in m}
    assert [m["grad_norm"] for m in read_metrics(resumed) if "loss" in m] == [norms[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL a run while it writes step_2; the step-1 checkpoint stays good and the run resumes from it."""
    run_dir = tmp_path / "run"
    # A model large enough (about 25M parameters, 300 MB with Adam state) that a save takes a while to write.
    args = [*FAST, "model.d_model=512", "model.n_layers=8", "model.ffn_hidden=1536", "train.steps=4",
            "checkpoint.every=1", f"run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = run_dir / "checkpoints" / "step_2.tmp"
    deadline = time.time() + 120
    try:
        while not staging.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert staging.exists(), "never saw the step-2 save in progress"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    assert not (staging / COMMIT_MARKER).exists()
    assert [step for step, _ in committed_checkpoints(run_dir / "checkpoints")] == [1]

    # Naming the half-written folder explicitly is refused with one line ...
    bad = run_train([*args, f"checkpoint.resume={staging}"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "COMMITTED marker" in bad.stderr or "does not exist" in bad.stderr
    # ... and resume=auto continues from step 1, then saves step 2 over the debris.
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "step_1" in result.stderr
    assert [step for step, _ in committed_checkpoints(run_dir / "checkpoints")] == [1, 2, 3, 4]
    assert not staging.exists()


def _one_line_error(args, env=None):
    result = run_train(args, env=env, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_config_error_exits_with_one_line():
    line = _one_line_error(["model.foo=1"])
    assert line == "supertrain: error: model.foo: Key 'foo' not in 'ModelConfig' (see every key with: python -m train --cfg)"


def test_missing_torch_npu_exits_with_one_line(tmp_path):
    line = _one_line_error(["device=npu", f"run.dir={tmp_path}"])
    assert "torch_npu" in line and "supertrain[npu]" in line


def test_bad_cpu_linear_route_exits_with_one_line(tmp_path):
    line = _one_line_error([f"run.dir={tmp_path}"], env=clean_env(SUPERTRAIN_CPU_LINEAR="blas"))
    assert line == "supertrain: error: SUPERTRAIN_CPU_LINEAR='blas' is not a route: use one of auto, onednn, aten"


def test_bad_cpu_kernel_route_exits_with_one_line(tmp_path):
    line = _one_line_error([f"run.dir={tmp_path}"], env=clean_env(SUPERTRAIN_CPU_KERNELS="fast"))
    assert line == "supertrain: error: SUPERTRAIN_CPU_KERNELS='fast' is not a route: use one of auto, native, aten"


def test_start_up_line_names_the_cpu_kernels(tmp_path):
    result = run_train([*FAST, "train.steps=1", f"run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    expected = "fused " if cpu_native.NATIVE_EXPECTED else "ATen ops"
    assert "Device(cpu, backend=gloo" in result.stderr and f"fp32 ops: {expected}" in result.stderr


def test_online_wandb_without_key_exits_with_one_line(tmp_path):
    env = clean_env(HOME=str(tmp_path))  # no ~/.netrc, no WANDB_API_KEY
    line = _one_line_error([*FAST, "logging.mode=online", "train.steps=1", f"run.dir={tmp_path / 'run'}"], env=env)
    assert "logging.mode=online needs a wandb API key" in line


def test_vocab_smaller_than_tokenizer_exits_with_one_line(tmp_path):
    line = _one_line_error([*FAST, "model.vocab_size=200", f"run.dir={tmp_path}"])
    assert "model.vocab_size=200 is smaller than the tokenizer's 257 ids" in line


def test_print_config_and_help():
    result = subprocess.run([sys.executable, "-m", "train", "--cfg", "model=llama3_8b"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "n_layers: 32" in result.stdout and "dp_engine: fsdp" in result.stdout
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "llama3_405b" in result.stdout


def test_a_resumed_run_follows_its_new_learning_rate_and_says_so(tmp_path):
    """The learning rate is a function of the step and the config: a resume with a new optim.lr uses it from the
    resumed step on, keeps the earlier config.yaml as config.1.yaml and names the changed key."""
    args = [*FAST, "optim.schedule=constant", "checkpoint.every=2", f"run.dir={tmp_path}"]
    assert run_train([*args, "train.steps=2", "optim.lr=0.002"]).returncode == 0
    result = run_train([*args, "train.steps=4", "optim.lr=0.001"])
    assert result.returncode == 0, result.stderr
    assert "optim.lr 0.002 -> 0.001" in result.stderr and "train.steps 2 -> 4" in result.stderr
    rates = {m["step"]: m["lr"] for m in read_metrics(tmp_path) if "lr" in m}
    assert rates == {1: pytest.approx(0.001), 2: pytest.approx(0.002), 3: pytest.approx(0.001),
                     4: pytest.approx(0.001)}
    assert "lr: 0.002" in (tmp_path / "config.1.yaml").read_text()
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text()
