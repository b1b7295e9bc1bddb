"""Data parallelism for the native engine: DDP, FSDP2 (`fully_shard`) and HSDP (FSDP2 on a 2-D mesh).

FSDP2 is applied on the meta device, before materialization: each transformer block becomes one sharding unit
(one all-gather / reduce-scatter per block), the embedding, final norm and head share the root unit. DDP needs
real tensors (it broadcasts rank 0's weights at construction), so it is applied after materialization.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from parallel.dims import Meshes


def fsdp_mesh(mesh: "Meshes", dp_replicate: int, cp: int) -> "DeviceMesh":
    """The mesh FSDP shards over: (replicate, shard) for HSDP, else the shard dimension alone.

    Context-parallel ranks hold the same weights, so they join the shard group (dp_shard_cp).
    """
    shard = "dp_shard_cp" if cp > 1 else "dp_shard"
    if dp_replicate == 1:
        return mesh[shard]
    with warnings.catch_warnings():
        # A 2-D view over a flattened dimension: torch plans to make callers keep such views themselves.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        return mesh["dp_replicate", shard]


def apply_fsdp(
    model: nn.Module,
    mesh: "DeviceMesh",
    param_dtype: Optional[torch.dtype],
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard every transformer block, then the root (embedding, norm, head), with FSDP2.

    param_dtype: all-gather and compute in this dtype (bf16 mixed precision); gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block is needed again right away by backward: keeping it unsharded saves one all-gather.
        last = index == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, mesh: "DeviceMesh") -> nn.Module:
    """Replicate over the flattened data-parallel mesh (dp_replicate x dp_shard ranks all hold full copies)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        process_group=mesh.get_group(),
        # Buffers (MoE balancing biases) are kept identical by their own update, not by per-forward broadcasts.
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )
