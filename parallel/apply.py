"""Turn the configs, a device and a mesh into a training engine, applying parallelism in one fixed order:

    build on meta (a pipeline rank builds only its stages) -> TP (+SP) -> EP -> CP -> activation checkpointing ->
    compile -> FSDP2 (experts over the ranks that hold the same experts, then the rest over all data ranks) ->
    materialize + seeded init -> DDP

DeepSpeed takes the materialized model and wraps it in its own engine instead of FSDP/DDP. The layout has passed
parallel/rules.py already (`ParallelDims.from_config`); the optimizer comes from the trainer (`make_optimizer`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from configs.schema import DPEngine, ModelConfig, ParallelConfig, Precision, TrainConfig
from launch.device import Device
from models.kernels import ReferenceKernels, kernels_for
from models.transformer import build_model
from parallel.context import BatchSplit, apply_context_parallel
from parallel.data import apply_ddp, apply_fsdp, fsdp_mesh
from parallel.dims import Meshes, ParallelDims
from parallel.engine import Engine, NativeEngine, OptimizerFactory, PipelineEngine, token_cross_entropy
from parallel.expert import apply_expert_fsdp, apply_expert_parallel
from parallel.materialize import materialize
from parallel.pipeline import PipelinePlan, build_schedule, build_stage, plan_pipeline
from parallel.recompute import apply_recompute
from parallel.tensor import apply_tensor_parallel


def training_dtype(precision: Precision, device: Device) -> Optional[torch.dtype]:
    """bf16 when asked for and the device computes it natively; None means full fp32."""
    if precision == Precision.bf16 and device.supports_bf16():
        return torch.bfloat16
    return None


def _uses_fsdp(parallel: ParallelConfig, dims: ParallelDims, mesh: Optional[Meshes]) -> bool:
    return mesh is not None and parallel.dp_engine == DPEngine.fsdp and dims.dp * dims.cp > 1


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place, so parameter names (and checkpoints) do not change."""
    for block in model.layers.values():
        block.compile()


def parallelize(model: nn.Module, model_cfg: ModelConfig, parallel: ParallelConfig, dims: ParallelDims,
                mesh: Optional[Meshes], param_dtype: Optional[torch.dtype]) -> nn.Module:
    """Apply every meta-device transformation, in the fixed order, to a freshly built model."""
    if dims.tp > 1:
        model = apply_tensor_parallel(model, model_cfg, mesh["tp"], parallel.sequence_parallel)
    if dims.ep > 1:
        model = apply_expert_parallel(model, mesh["ep"])
    if dims.cp > 1:
        model = apply_context_parallel(model, mesh["cp"], parallel.cp_impl.value)
    model = apply_recompute(model, parallel.recompute.value)
    if parallel.compile:
        compile_blocks(model)
    if _uses_fsdp(parallel, dims, mesh):
        if dims.ep > 1:
            # The context-parallel ranks beside efsdp hold the same experts too, but a mesh of efsdp and cp would
            # straddle ep, which DTensor cannot flatten for the gradient norm: the engine adds their expert
            # gradients over cp itself (expert_grad_group).
            expert_mesh = mesh["dp_replicate", "efsdp"] if dims.dp_replicate > 1 else mesh["efsdp"]
            apply_expert_fsdp(model, expert_mesh, param_dtype, reshard=True)
        model = apply_fsdp(model, fsdp_mesh(mesh, dims.dp_replicate, dims.cp), param_dtype)
    return model


def pipeline_plan(model_cfg: ModelConfig, parallel: ParallelConfig, dims: ParallelDims) -> PipelinePlan:
    return plan_pipeline(model_cfg, dims.pp, dims.vpp, parallel.pp_schedule, list(parallel.pp_layers))


def build_engine(
    model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig, device: Device, dims: ParallelDims,
    mesh: Optional[Meshes], local_rank: int, make_optimizer: OptimizerFactory,
    kernels: Optional[ReferenceKernels] = None, document_end: Optional[int] = None,
) -> Engine:
    """The engine for this rank; the model's layers run `kernels` (the device's backend when not given).
    `document_end`: the end-of-document token at which positions and attention restart (None: they do not)."""
    kernels = kernels if kernels is not None else kernels_for(device.kind)
    dtype = training_dtype(train.mixed_precision, device)
    torch_device = device.torch_device(local_rank)
    micro_batches = dims.grad_accumulation(train)
    if parallel.dp_engine == DPEngine.deepspeed:
        return _deepspeed_engine(model_cfg, parallel, train, device, dims, dtype, torch_device, make_optimizer,
                                 kernels, document_end)
    cp_rank = mesh["cp"].get_local_rank() if mesh is not None and dims.cp > 1 else 0
    # The ranks whose tokens differ (data and context parallel): their losses and MoE token counts add up.
    data_mesh = "dp_cp" if dims.cp > 1 else "dp"
    data_group = mesh[data_mesh].get_group() if mesh is not None and dims.dp * dims.cp > 1 else None
    common = dict(
        split=BatchSplit(dims.cp, cp_rank, document_end),
        make_optimizer=make_optimizer,
        device=device,
        # Under FSDP the mixed-precision policy already computes in bf16; autocast would only add casts.
        autocast_dtype=None if _uses_fsdp(parallel, dims, mesh) else dtype,
        vocab_parallel_loss=dims.tp > 1,
        expert_grad_divisor=dims.ep * (dims.cp if dims.ep > 1 else 1),
        expert_grad_group=mesh["cp"].get_group() if mesh is not None and dims.ep > 1 and dims.cp > 1 else None,
    )
    if dims.pp > 1:
        plan = pipeline_plan(model_cfg, parallel, dims)
        stages = {}
        for stage in plan.stages_of_rank(mesh["pp"].get_local_rank()):
            module = parallelize(build_stage(model_cfg, plan, stage, kernels), model_cfg, parallel, dims, mesh,
                                 dtype)
            stages[stage] = materialize(module, model_cfg, torch_device, train.seed)
        pp_group = mesh["pp"].get_group()
        schedule = build_schedule(plan, stages, torch_device, pp_group, micro_batches, token_cross_entropy)
        return PipelineEngine(
            stages, schedule, plan, mesh["pp"].get_local_rank(), pp_group, dims.dp * dims.cp,
            loss_group=mesh["pp_dp_cp" if dims.cp > 1 else "pp_dp"].get_group(), stage_group=pp_group,
            data_group=data_group, **common,
        )
    # The native engine divides each micro-batch's loss by their count before backward (parallel/engine.py).
    model = build_model(model_cfg, device="meta", aux_loss_scale=1.0 / micro_batches, kernels=kernels)
    model = parallelize(model, model_cfg, parallel, dims, mesh, dtype)
    model = materialize(model, model_cfg, torch_device, train.seed)
    if mesh is not None and parallel.dp_engine == DPEngine.ddp and dims.dp * dims.cp > 1:
        model = apply_ddp(model, mesh[data_mesh])
    return NativeEngine([model], loss_group=data_group, data_group=data_group, **common)


def _deepspeed_engine(model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig, device: Device,
                      dims: ParallelDims, dtype: Optional[torch.dtype], torch_device: torch.device,
                      make_optimizer: OptimizerFactory, kernels: ReferenceKernels,
                      document_end: Optional[int]) -> Engine:
    from parallel.deepspeed import DeepSpeedEngine, deepspeed_config

    micro_batches = dims.grad_accumulation(train)
    # DeepSpeed divides each micro-batch's loss by the accumulation steps before backward.
    model = build_model(model_cfg, device="meta", aux_loss_scale=1.0 / micro_batches, kernels=kernels)
    model = materialize(model, model_cfg, torch_device, train.seed)
    ds_config = deepspeed_config(train.global_batch, train.micro_batch, micro_batches, train.grad_clip,
                                 parallel.zero_stage, bf16=dtype == torch.bfloat16)
    return DeepSpeedEngine(model, make_optimizer(model), device, ds_config, split=BatchSplit(eos_id=document_end))
