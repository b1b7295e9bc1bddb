"""Allocate a meta-device model, already parallelized, on its device and give every parameter its starting value.

Each parameter gets the value `models.transformer.initial_value` names for it, whatever wrappers (activation
checkpointing, torch.compile, DDP, FSDP) and shards parallelism added: names are stripped of wrapper prefixes
(`canonical_name`) and a sharded rank keeps only its slice of the whole value. So tp=4, pp=2 or fsdp start from
exactly the single-device weights.
"""

from __future__ import annotations

import torch
from torch import nn

from configs.schema import ModelConfig
from models.transformer import Transformer, initial_value

# Wrappers added by activation checkpointing, torch.compile and DDP; stripped so names (and so initial values) do
# not depend on which of them were applied.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter's name as in the plain model: wrapper prefixes (and DDP's leading `module.`) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name[len("module."):] if name.startswith("module.") else name


def _local_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of `full` that this rank holds when `param` is a sharded DTensor; all of it otherwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


@torch.no_grad()
def initialize_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Every parameter to its layout-independent starting value; buffers (MoE balancing state) to zero."""
    for name, param in model.named_parameters():
        full = initial_value(canonical_name(name), param.shape, cfg, seed)
        local = param.to_local() if hasattr(param, "to_local") else param
        local.copy_(_local_slice(full, param))
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
