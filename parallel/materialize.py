"""Allocate a meta-device model, already parallelized, on its device and give every parameter its starting value.

Each rank draws only the block of each parameter it holds, on its own device (`models.transformer.initialize_block_`),
whatever wrappers (activation checkpointing, torch.compile, DDP, FSDP) and shards parallelism added: names are
stripped of wrapper prefixes (`canonical_name`) and a sharded parameter's block is found from its placements. So
tp=4, pp=2 or fsdp start from exactly the single-device weights, and the work and memory of initialisation shrink
with the number of ranks (no rank builds a whole tensor it shards).
"""

from __future__ import annotations

import torch
from torch import nn

from configs.schema import ModelConfig
from models.transformer import Transformer, initialize_block_

# Wrappers added by activation checkpointing, torch.compile and DDP; stripped so names (and so initial values) do
# not depend on which of them were applied.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter's name as in the plain model: wrapper prefixes (and DDP's leading `module.`) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name[len("module."):] if name.startswith("module.") else name


def local_block(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(whole shape, offset of this rank's block) of a parameter: a sharded DTensor's block is a contiguous range of
    each dimension (tensor-, expert- and FSDP-sharding all cut whole rows or columns), a plain tensor is all of it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return tuple(param.shape), (0,) * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(param.shape), tuple(offset)


@torch.no_grad()
def initialize_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Every parameter to its layout-independent starting value; buffers (MoE balancing state) to zero."""
    for name, param in model.named_parameters():
        full_shape, offset = local_block(param)
        local = param.to_local() if hasattr(param, "to_local") else param
        initialize_block_(local, canonical_name(name), full_shape, offset, cfg, seed)
    for buffer in model.buffers():
        local = buffer.to_local() if hasattr(buffer, "to_local") else buffer
        local.zero_()


def materialize(model: Transformer, cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """Allocate a meta-device (possibly already parallelized) model on `device` and initialize it."""
    model.to_empty(device=device)
    if cfg.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight
    initialize_weights(model, cfg, seed)
    return model
