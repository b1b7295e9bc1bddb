"""Functions the multi-rank tests run on every rank (module level, so spawned ranks can import them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

# A small fp32 model and a short deterministic run, shared by the parity tests.
SMALL = [
    "device=cpu",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=192",
    "train.mixed_precision=fp32",
    "train.seq_len=32",
    "train.global_batch=8",
    "train.micro_batch=2",
    "train.steps=10",
    "train.eval_every=0",
    "data.max_bytes=300000",
    "optim.warmup_steps=2",
    "logging.mode=disabled",
    "logging.every=1",
    "checkpoint.every=0",
]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {loss, grad_norm}, the last record of each step (a resumed run logs its steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: {"loss": r["loss"], "grad_norm": r["grad_norm"]} for r in records if "loss" in r}
    for record in records:
        if "val_loss" in record:
            steps[record["step"]]["val_loss"] = record["val_loss"]
    return steps


def train_run(overrides: list[str]) -> dict[str, Any]:
    """Train one config on this rank (process group already up, or a single process) and describe the result."""
    import torch.distributed as dist

    from launch.env import rank_info
    from train.__main__ import prepare, train_with
    from train.config import load_config

    cfg = load_config(overrides)
    info = rank_info()
    device, dims = prepare(cfg, info)
    trainer = train_with(cfg, info, device, dims)
    weights = {k: v.detach().cpu().clone() for k, v in trainer.engine.full_state_dict().items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: dict[str, Any] = {"digest": weights_digest(weights)}
    if rank == 0:
        result["steps"] = read_steps(trainer.run_dir)
        result["weights"] = weights
    return result


def train_runs(configs: list[list[str]]) -> list[dict[str, Any]]:
    return [train_run(overrides) for overrides in configs]


def expect_error(overrides: list[str]) -> str:
    """Run a config that must fail with a ConfigError; return its message."""
    from configs.errors import ConfigError

    try:
        train_run(overrides)
    except ConfigError as error:
        return str(error)
    raise AssertionError(f"{overrides} trained without the expected error")
