"""Expert parallelism: each rank of an `ep` group holds n_routed_experts / ep experts; tokens travel to their
experts and back with all-to-all.

Applied from outside to the one submodule `MoE.experts` (models/moe.py), whose forward takes tokens sorted by
global expert and the count per expert:

    dispatch  counts  -> all-to-all -> how many tokens each peer sends to each of my experts
              tokens  -> all-to-all (uneven splits) -> regroup by my local expert
    compute   the local experts' grouped matmul
    combine   undo the regrouping -> all-to-all back -> the caller's original order

Expert weights become DTensors sharded on dim 0 over the ep mesh. Their gradients arrive summed over the ep group
(the all-to-all backward brings every token's contribution home), so the data-parallel reduction for experts runs
only over the ranks holding the same experts (dp_replicate x efsdp, `apply_expert_fsdp`), and the engine divides
expert gradients by ep afterwards (`expert_parameters`), which makes them the global-batch mean like every other
gradient. (FSDP's own gradient_divide_factor would do it in one go, but needs PREMUL_SUM, which gloo lacks.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from models.moe import MoE

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class _Route:
    """What dispatch learned and combine needs to undo it (one per forward call)."""

    def __init__(self, send_splits: list[int], recv_splits: list[int], regroup: torch.Tensor) -> None:
        self.send_splits = send_splits
        self.recv_splits = recv_splits
        self.regroup = regroup


class ExpertParallel(ParallelStyle):
    """Shard GroupedExperts over a 1-D ep mesh and wrap its forward in all-to-all dispatch and combine."""

    def __init__(self) -> None:
        super().__init__()
        self._routes: list[_Route] = []  # a stack: activation checkpointing may re-enter forward

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh: "DeviceMesh") -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    def _dispatch(self, module: nn.Module, inputs: tuple, mesh: "DeviceMesh") -> tuple:
        tokens, counts = inputs
        ep = mesh.size()
        group = mesh.get_group()
        local_experts = counts.shape[0] // ep
        # received[s, e]: tokens peer s sends to my local expert e (no gradient: counts are integers).
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=group)
        received = received.view(ep, local_experts)
        send_splits = counts.view(ep, local_experts).sum(dim=1).tolist()
        recv_splits = received.sum(dim=1).tolist()
        arrived = all_to_all_single_autograd(tokens, recv_splits, send_splits, group)
        # Arrived rows are ordered (peer, expert); the experts want them ordered (expert, peer).
        block_sizes = received.flatten()
        block_starts = _exclusive_cumsum(block_sizes)
        by_expert = block_starts.view(ep, local_experts).t().flatten()
        sizes_by_expert = block_sizes.view(ep, local_experts).t().flatten()
        regroup = torch.repeat_interleave(by_expert - _exclusive_cumsum(sizes_by_expert), sizes_by_expert)
        regroup = regroup + torch.arange(regroup.shape[0], device=regroup.device)
        self._routes.append(_Route(send_splits, recv_splits, regroup))
        return arrived[regroup], received.sum(dim=0)

    def _combine(self, module: nn.Module, outputs: torch.Tensor, mesh: "DeviceMesh") -> torch.Tensor:
        route = self._routes.pop()
        arrived_order = torch.empty_like(outputs).index_copy(0, route.regroup, outputs)
        return all_to_all_single_autograd(arrived_order, route.send_splits, route.recv_splits, mesh.get_group())

    def _apply(self, module: nn.Module, device_mesh: "DeviceMesh") -> nn.Module:
        return distribute_module(
            module, device_mesh, self._partition,
            lambda mod, inputs, mesh: self._dispatch(mod, inputs, mesh),
            lambda mod, outputs, mesh: self._combine(mod, outputs, mesh),
        )


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def apply_expert_parallel(model: nn.Module, ep_mesh: "DeviceMesh") -> nn.Module:
    """Shard the routed experts of every MoE layer over ep_mesh (in place)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for block in model.layers.values():
        moe = getattr(block, "feed_forward", None)
        if isinstance(moe, MoE):
            parallelize_module(moe.experts, ep_mesh, ExpertParallel())
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' weights: under expert parallelism their gradients need dividing by ep (module doc)."""
    return [p for block in model.layers.values() if isinstance(getattr(block, "feed_forward", None), MoE)
            for p in block.feed_forward.experts.parameters()]


def apply_expert_fsdp(
    model: nn.Module, expert_dp_mesh: "DeviceMesh", param_dtype: Optional[torch.dtype], reshard: bool
) -> None:
    """FSDP for the routed experts over the ranks that hold the same experts (not over the whole dp group)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        moe = getattr(block, "feed_forward", None)
        if isinstance(moe, MoE):
            fully_shard(moe.experts, mesh=expert_dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
