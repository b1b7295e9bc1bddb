"""Shared helpers: run `python -m train` (or torchrun) as a real process with a hard timeout, read its outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

from bench import quick_run

# One thread in the test process: the machine has two cores, and an in-process reference run with two OpenMP
# threads slows to a crawl whenever rank processes or other jobs hold the cores.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# DeepSpeed is an optional extra (`make` installs it): without it, its engine's tests skip and the rest run.
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="the deepspeed extra is not installed")

FAST = quick_run.FAST  # a short, deterministic CPU run (bench/quick_run.py), shared with the fault benchmarks



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit -> unit, tests/dist -> dist, tests/e2e -> e2e, tests/accel -> accel,
    tests/hf -> hf, tests/kernels -> kernels, its backend folders (tests/kernels/cpu) included (pyproject.toml)."""
    for item in items:
        folder = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if folder in ("unit", "dist", "e2e", "accel", "hf", "kernels"):
            item.add_marker(getattr(pytest.mark, folder))


def clean_env(**extra: str) -> dict[str, str]:
    # As a user's shell would start it: none of the launcher's variables, nor the autoload switch that importing
    # train.__main__ in this process sets (launch/autoload.py).
    prefixes = ("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "TORCH_DEVICE_BACKEND_AUTOLOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    # C++ extensions already built (models/kernels/cpu/native.py, DeepSpeed's) stay found when a test points HOME elsewhere.
    env.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
    env.update(extra)
    return env


def run_train(args: list[str], timeout: float = 300, env: dict[str, str] | None = None, nproc: int = 1,
              cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m train ARGS`, or `torchrun --standalone --nproc_per_node=nproc -m train ARGS`, run in `cwd`."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train", *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout}s (hang?)\nstdout:\n{error.stdout}\nstderr:\n{error.stderr}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last loss logged for each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Hugging Face folder per architecture we import (tests/hf/tiny_models.py), written once."""
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    sys.path.insert(0, str(REPO / "tests" / "hf"))
    from tiny_models import SPECS, save_hf_model

    base = tmp_path_factory.mktemp("hf")
    for kind in SPECS:
        save_hf_model(kind, base / kind)
    return {kind: base / kind for kind in SPECS}
