"""Tensor parallelism (Megatron-style) and sequence parallelism, applied to the plain model with DTensor.

Per transformer block:
    attention  wq, wk, wv (and MLA's wq_b, wkv_b) column-parallel: each rank computes n_heads / tp heads;
               wo row-parallel: partial sums reduced (all-reduce, or reduce-scatter over the sequence under SP)
    MLP        SwiGLU's gate/up weight w13 (hidden, 2, d) split along hidden (`GateUpColwise`), GELU's w1
               column-parallel; w2 row-parallel
    norms      replicated; under sequence parallelism they run on a sequence shard (SequenceParallel)
Model ends:
    embedding  vocab-parallel (rows split; each rank looks up the ids it owns)
    output     column-parallel over the vocabulary, kept sharded: the loss runs under `loss_parallel`, so the full
               (batch, seq, vocab) logits are never gathered

Qwen3's per-head query/key norms run on the local heads, their weight replicated with its gradient summed over tp ranks.
Grouped-query attention with fewer kv heads than tp ranks: the k/v projections stay whole on every rank and each
rank keeps the one kv head its query heads read (`ReplicatedSharedHeads`); their gradients are summed over tp ranks.
MLA: wq / wq_b and wkv_b column-parallel, wo row-parallel, the latent projections replicated, and the rotary key
all heads share replicated with its gradient summed over tp ranks (`ReplicatedSharedHeads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from configs.schema import Activation, AttentionKind, ModelConfig
from parallel.dims import LayoutError
from parallel.rules import tensor_parallel_problem

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class ReplicatedSharedHeads(ParallelStyle):
    """A projection whose output every rank's heads share: whole weight on every rank, each rank using its part.

    Each rank's gradient then covers only its own heads' use, so the output gradient is declared Partial and summed
    over the tp group (for the weight, and for the input through the replicated-input conversion).
    - GQA k or v when n_kv_heads < tp (`head_dim` given): rank r's query heads [r h/tp, (r+1) h/tp) all read kv head
      r // (tp / n_kv_heads), so the output is narrowed to that head and attention sees one local kv head.
    - MLA's rotary key (`head_dim` None): one key for all heads, kept whole.
    """

    def __init__(self, head_dim: Optional[int] = None, n_kv_heads: int = 1, tp: int = 1) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.ranks_per_kv_head = tp // n_kv_heads

    def _partition(self, name: str, module: nn.Module, mesh: "DeviceMesh") -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Replicate()])))

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: "DeviceMesh") -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x, *inputs[1:])

    def _select_head(self, module: nn.Module, output: DTensor, mesh: "DeviceMesh") -> torch.Tensor:
        local = output.to_local(grad_placements=[Partial()])
        if self.head_dim is None:
            return local
        head = mesh.get_local_rank() // self.ranks_per_kv_head
        return local[..., head * self.head_dim : (head + 1) * self.head_dim]

    def _apply(self, module: nn.Module, device_mesh: "DeviceMesh") -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            self._partition,
            lambda mod, inputs, mesh: self._prepare_input(mod, inputs, mesh),
            lambda mod, outputs, mesh: self._select_head(mod, outputs, mesh),
        )


class GateUpColwise(ParallelStyle):
    """Column parallelism for a `GateUpProjection` (not an nn.Linear, which ColwiseParallel requires): its
    (hidden, 2, d) weight split along hidden, so rank r holds the gate and up rows of hidden units
    [r hidden/tp, (r+1) hidden/tp) and its product gives those units' (gate, up) pairs.

    The input arrives replicated (a local tensor, or a Replicate DTensor under sequence parallelism); the module
    computes on local tensors, and the input's gradient, one part per rank, is summed over the tp group, as
    ColwiseParallel's is. The output is the local block, which w2's RowwiseParallel takes as its Shard(-1) input.
    """

    def _partition(self, name: str, module: nn.Module, mesh: "DeviceMesh") -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: "DeviceMesh") -> tuple:
        x = inputs[0]
        if isinstance(x, DTensor):
            x = x.redistribute(mesh, [Replicate()])
        else:
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        # Forward: the same tensor. Backward: each rank's gradient declared a partial sum, which the conversion
        # back to a replicated input adds over the group.
        return (x.to_local(grad_placements=[Partial()]), *inputs[1:])

    def _apply(self, module: nn.Module, device_mesh: "DeviceMesh") -> nn.Module:
        return distribute_module(module, device_mesh, self._partition,
                                 lambda mod, inputs, mesh: self._prepare_input(mod, inputs, mesh))


def _attention_plan(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    row_out = Shard(1) if sequence_parallel else Replicate()
    if cfg.attention == AttentionKind.mla:
        plan: dict[str, ParallelStyle] = {
            "attention.wkv_b": ColwiseParallel(),
            "attention.wk_rope": ReplicatedSharedHeads(),
            "attention.wo": RowwiseParallel(output_layouts=row_out),
        }
        plan["attention.wq_b" if cfg.q_lora_rank else "attention.wq"] = ColwiseParallel()
        return plan
    if cfg.n_kv_heads < tp:
        kv_plan: dict[str, ParallelStyle] = {
            "attention.wk": ReplicatedSharedHeads(cfg.head_dim, cfg.n_kv_heads, tp),
            "attention.wv": ReplicatedSharedHeads(cfg.head_dim, cfg.n_kv_heads, tp),
        }
    else:
        kv_plan = {"attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel()}
    if cfg.qk_norm:
        # Per-head norms (Qwen3) see only this rank's heads (dim 2 of (batch, seq, heads, head_dim)): declared a
        # shard along the heads, the shared weight's gradient is summed over the tp ranks, as one model's would be.
        kv_plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        kv_plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return {"attention.wq": ColwiseParallel(), **kv_plan, "attention.wo": RowwiseParallel(output_layouts=row_out)}


def _mlp_plan(prefix: str, gated: bool, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    row_out = Shard(1) if sequence_parallel else Replicate()
    first: dict[str, ParallelStyle] = ({f"{prefix}.w13": GateUpColwise()} if gated
                                       else {f"{prefix}.w1": ColwiseParallel()})
    return {**first, f"{prefix}.w2": RowwiseParallel(output_layouts=row_out)}


def block_plan(cfg: ModelConfig, layer_id: int, tp: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    plan = _attention_plan(cfg, tp, sequence_parallel)
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan.update({
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            "attention": gather,
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    if cfg.is_moe_layer(layer_id):
        # Experts are not split by TP (expert parallelism shards them); under TP every rank of the group runs the
        # MoE block on the whole sequence, so their gradients agree without a reduction.
        if sequence_parallel:
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
            )
    else:
        plan.update(_mlp_plan("feed_forward", cfg.activation == Activation.swiglu, sequence_parallel))
    return plan


def apply_tensor_parallel(model: nn.Module, cfg: ModelConfig, mesh: "DeviceMesh", sequence_parallel: bool) -> nn.Module:
    """Parallelize the (meta-device) model over the 1-D tp mesh; stages without embedding or head skip those parts."""
    tp = mesh.size()
    problem = tensor_parallel_problem(cfg, tp)
    if problem is not None:
        raise LayoutError(str(problem))
    ends: dict[str, Any] = {}
    if model.tok_embeddings is not None:
        ends["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sequence_parallel else Replicate()
        )
    if model.norm is not None and sequence_parallel:
        ends["norm"] = SequenceParallel()
    if model.output is not None:
        ends["output"] = ColwiseParallel(
            input_layouts=Shard(1) if sequence_parallel else Replicate(), output_layouts=Shard(-1), use_local_output=False
        )
    if ends:
        parallelize_module(model, mesh, ends)
    for layer_id, block in model.layers.items():
        parallelize_module(block, mesh, block_plan(cfg, int(layer_id), tp, sequence_parallel))
    return model
