"""Activation checkpointing per transformer block: `none`, `full` (keep only each block's input, recompute the rest
in backward) or `selective` (op-level: keep the outputs of matmuls and attention, recompute the cheap elementwise
work: norms, rotary embeddings, activation functions, residual adds)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from models.cpu_linear import LINEAR_OP

# Ops whose outputs selective recompute keeps: the expensive ones, so backward repeats only memory-bound work.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._grouped_mm.default,  # routed experts
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    LINEAR_OP,  # fp32 projections on CPU through oneDNN (models/cpu_linear.py)
}


def _keep_expensive(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block of `model.layers` in place; names gain `_checkpoint_wrapped_module.` (DCP strips it)."""
    if mode == "none":
        return model
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=partial(create_selective_checkpoint_contexts, _keep_expensive)
            )
        model.layers[name] = wrapped
    return model
