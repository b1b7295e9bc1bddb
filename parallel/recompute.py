"""Activation checkpointing per transformer block: `none`, `full` (keep only each block's input, recompute the rest
in backward) or `selective` (op-level: keep the outputs of matmuls and attention, recompute the cheap elementwise
work: norms, rotary embeddings, activation functions, residual adds)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from models.kernels import ReferenceKernels

# Ops whose outputs selective recompute keeps: the expensive ones, so backward repeats only memory-bound work. By
# (namespace, op): ops a device's backend adds exist only once it is loaded (torch_npu registers torch.ops.npu.*),
# so the set is resolved when recompute is applied, keeping those present.
_SAVED = (
    ("aten", "mm"), ("aten", "bmm"), ("aten", "addmm"),
    ("aten", "_grouped_mm"),  # routed experts
    # Fused attention: CPU flash, CUDA flash / memory-efficient / cuDNN, and the entry for other accelerators.
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("aten", "_scaled_dot_product_flash_attention"),
    ("aten", "_scaled_dot_product_efficient_attention"),
    ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_scaled_dot_product_fused_attention_overrideable"),
    # torch_npu's fused attention: SDPA on Atlas A2/A3 runs npu_fusion_attention_v3 (op-plugin
    # ScaledDotProductAttentionKernelNpuOpApi.cpp); npu_fusion_attention is the documented direct call.
    ("npu", "npu_fusion_attention"), ("npu", "npu_fusion_attention_v3"),
    # Collectives in a block's forward (sequence parallelism's reduce-scatter, expert parallelism's all-to-all):
    # recomputing them would repeat the communication in backward.
    ("_c10d_functional", "reduce_scatter_tensor"), ("_c10d_functional", "all_to_all_single"),
)


def saved_ops(kernels: ReferenceKernels) -> set:
    """The op overloads whose outputs selective recompute keeps, of those this process has, and those the model's
    kernel backend names (its own matmul ops, such as the CPU's oneDNN projections)."""
    found = set(kernels.saved_ops())
    for namespace, name in _SAVED:
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None:
            found.add(packet.default)
    return found


def _keep(saved: set, ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block of `model.layers` in place; names gain `_checkpoint_wrapped_module.` (DCP strips it)."""
    if mode == "none":
        return model
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            policy = partial(_keep, saved_ops(model.kernels))
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=partial(create_selective_checkpoint_contexts, policy)
            )
        model.layers[name] = wrapped
    return model
