"""What each rank runs in the multi-rank Hugging Face tests (module level, so spawned ranks can import it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EVAL_TOKENS = (4, 33)  # sequences x (positions + 1) of the one global batch every layout evaluates


def eval_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, EVAL_TOKENS, generator=torch.Generator().manual_seed(3))


def import_and_evaluate(configs: list[list[str]], exports: list[str] | None = None) -> list[dict[str, Any]]:
    """For each config: build the engine under its layout, import the Hugging Face folder, evaluate one global batch,
    and (where `exports` names a folder) export again under the same layout; returns the loss, the whole weights
    (rank 0, or every pipeline rank), and the bytes this rank read."""
    import torch.distributed as dist

    from launch.env import rank_info
    from parallel.apply import build_engine
    from train.__main__ import prepare
    from train.config import load_config
    from train.data import micro_batches, rank_slice
    from train.hf.export import export_hf
    from train.hf.load import load_hf_weights
    from train.optim import build_optimizer
    from pathlib import Path

    results = []
    for number, overrides in enumerate(configs):
        cfg = load_config(overrides)
        info = rank_info()
        device, dims = prepare(cfg, info)
        mesh = dims.build_mesh(device.kind) if info.distributed else None
        engine = build_engine(cfg.model, cfg.parallel, cfg.train, device, dims, mesh, info.local_rank,
                              lambda module: build_optimizer(module, cfg.optim))
        report = load_hf_weights(engine.parts, cfg.model, Path(cfg.checkpoint.init_from_hf))
        tokens = eval_tokens(cfg.model.vocab_size)
        dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        mine = rank_slice(np.arange(tokens.shape[0]), dp_rank, dims.dp)
        batches = [(tokens[mb, :-1], tokens[mb, 1:]) for mb in micro_batches(mine, cfg.train.micro_batch)]
        loss = engine.evaluate(batches)
        weights = {k: v.detach().cpu().clone() for k, v in engine.full_state_dict().items()}
        if exports is not None:
            export_hf(engine.parts, cfg.model, Path(exports[number]), "float32", shard_bytes=32 * 1024)
        rank = dist.get_rank() if dist.is_initialized() else 0
        results.append({"loss": loss, "bytes_read": report.bytes_read,
                        "weights": weights if rank == 0 or cfg.parallel.pp > 1 else None})
    return results
