"""Turn a config, a device and a mesh into a training engine, applying parallelism in one fixed order:

    build on meta (a pipeline rank builds only its stages) -> TP (+SP) -> EP -> activation checkpointing ->
    compile -> FSDP2 (experts over the ranks that hold the same experts, then the rest over all data ranks) ->
    materialize + seeded init -> DDP

DeepSpeed takes the materialized model and wraps it in its own engine instead of FSDP/DDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from launch.device import Device
from models.transformer import build_model, materialize
from parallel.data import apply_ddp, apply_fsdp, fsdp_mesh
from parallel.dims import LayoutError, ParallelDims
from parallel.engine import Engine, NativeEngine, PipelineEngine, token_cross_entropy
from parallel.expert import apply_expert_fsdp, apply_expert_parallel
from parallel.pipeline import PipelinePlan, build_schedule, build_stage, plan_pipeline
from parallel.recompute import apply_recompute
from parallel.tensor import apply_tensor_parallel
from train.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from parallel.dims import Meshes
    from train.config import Config


def training_dtype(cfg: "Config", device: Device) -> Optional[torch.dtype]:
    """bf16 when asked for and the device computes it natively; None means full fp32."""
    from train.config import Precision

    if cfg.train.mixed_precision == Precision.bf16 and device.supports_bf16():
        return torch.bfloat16
    return None


def check_supported(cfg: "Config", dims: ParallelDims) -> None:
    """Layouts the engines cannot run, refused before any process group work."""
    from train.config import DPEngine

    engine = cfg.parallel.dp_engine
    if engine == DPEngine.deepspeed:
        others = {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "ep": dims.ep, "dp_replicate": dims.dp_replicate}
        used = {k: v for k, v in others.items() if v > 1}
        if used:
            raise LayoutError(
                f"dp_engine=deepspeed runs data parallelism only, but {' '.join(f'{k}={v}' for k, v in used.items())}"
                f": use dp_engine=fsdp to combine it with tensor, pipeline, context or expert parallelism"
            )
        if cfg.parallel.zero_stage not in (1, 2, 3):
            raise LayoutError(f"dp_engine=deepspeed needs parallel.zero_stage=1, 2 or 3 (got {cfg.parallel.zero_stage})")
    if dims.tp > 1:
        from parallel.tensor import check_tensor_parallel

        check_tensor_parallel(cfg.model, dims.tp)
    if dims.ep > 1 and engine != DPEngine.fsdp:
        raise LayoutError(f"ep={dims.ep} needs dp_engine=fsdp: expert weights are sharded, which DDP cannot reduce")
    if dims.pp > 1:
        if engine == DPEngine.ddp and dims.dp > 1:
            raise LayoutError(f"pp={dims.pp} with dp_engine=ddp is not supported: use dp_engine=fsdp with pipelines")
        pipeline_plan(cfg, dims)
    if dims.cp > 1:
        raise LayoutError(
            f"parallel.cp={dims.cp}: context parallelism is not implemented in training yet (the planner models it): "
            f"use cp=1"
        )


def _uses_fsdp(cfg: "Config", dims: ParallelDims, mesh: Optional["Meshes"]) -> bool:
    from train.config import DPEngine

    return mesh is not None and cfg.parallel.dp_engine == DPEngine.fsdp and dims.dp * dims.cp > 1


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place, so parameter names (and checkpoints) do not change."""
    for block in model.layers.values():
        block.compile()


def parallelize(
    model: nn.Module, cfg: "Config", dims: ParallelDims, mesh: Optional["Meshes"], param_dtype: Optional[torch.dtype]
) -> nn.Module:
    """Apply every meta-device transformation, in the fixed order, to a freshly built model."""
    if dims.tp > 1:
        model = apply_tensor_parallel(model, cfg.model, mesh["tp"], cfg.parallel.sequence_parallel)
    if dims.ep > 1:
        model = apply_expert_parallel(model, mesh["ep"])
    model = apply_recompute(model, cfg.parallel.recompute.value)
    if cfg.parallel.compile:
        compile_blocks(model)
    if _uses_fsdp(cfg, dims, mesh):
        if dims.ep > 1:
            expert_mesh = mesh["dp_replicate", "efsdp"] if dims.dp_replicate > 1 else mesh["efsdp"]
            apply_expert_fsdp(model, expert_mesh, param_dtype, reshard=True)
        model = apply_fsdp(model, fsdp_mesh(mesh, dims.dp_replicate, dims.cp), param_dtype)
    return model


def pipeline_plan(cfg: "Config", dims: ParallelDims) -> PipelinePlan:
    p = cfg.parallel
    return plan_pipeline(cfg.model, dims.pp, dims.vpp, p.pp_schedule, list(p.pp_layers), dims.grad_accumulation(cfg.train))


def build_engine(
    cfg: "Config", device: Device, dims: ParallelDims, mesh: Optional["Meshes"], local_rank: int
) -> Engine:
    from train.config import DPEngine

    check_supported(cfg, dims)
    dtype = training_dtype(cfg, device)
    engine_kind = cfg.parallel.dp_engine
    torch_device = device.torch_device(local_rank)
    if engine_kind == DPEngine.deepspeed:
        return _deepspeed_engine(cfg, device, dims, dtype, torch_device)
    common = dict(
        optim_cfg=cfg.optim,
        total_steps=cfg.train.steps,
        device=device,
        # Under FSDP the mixed-precision policy already computes in bf16; autocast would only add casts.
        autocast_dtype=None if _uses_fsdp(cfg, dims, mesh) else dtype,
        vocab_parallel_loss=dims.tp > 1,
        expert_grad_divisor=dims.ep,
    )
    if dims.pp > 1:
        return _pipeline_engine(cfg, dims, mesh, dtype, torch_device, common)
    model = parallelize(build_model(cfg.model, device="meta"), cfg, dims, mesh, dtype)
    model = materialize(model, cfg.model, torch_device, cfg.train.seed)
    if mesh is not None and engine_kind == DPEngine.ddp and dims.dp > 1:
        model = apply_ddp(model, mesh["dp"])
    data_group = mesh["dp"].get_group() if mesh is not None and dims.dp > 1 else None
    return NativeEngine([model], loss_group=data_group, data_group=data_group, **common)


def _pipeline_engine(cfg: "Config", dims: ParallelDims, mesh: "Meshes", dtype: Optional[torch.dtype],
                     torch_device: torch.device, common: dict) -> Engine:
    plan = pipeline_plan(cfg, dims)
    stage_ids = plan.stages_of_rank(mesh["pp"].get_local_rank())
    stages = {}
    for stage in stage_ids:
        module = parallelize(build_stage(cfg.model, plan, stage), cfg, dims, mesh, dtype)
        stages[stage] = materialize(module, cfg.model, torch_device, cfg.train.seed)
    pp_group = mesh["pp"].get_group()
    schedule = build_schedule(plan, stages, torch_device, pp_group, dims.grad_accumulation(cfg.train),
                              token_cross_entropy)
    return PipelineEngine(
        stages, schedule, plan, mesh["pp"].get_local_rank(), pp_group, dims.dp,
        loss_group=mesh["pp_dp"].get_group(), stage_group=pp_group,
        data_group=mesh["dp"].get_group() if dims.dp > 1 else None, **common,
    )


def _deepspeed_engine(cfg: "Config", device: Device, dims: ParallelDims, dtype: Optional[torch.dtype],
                      torch_device: torch.device) -> Engine:
    from parallel.deepspeed import DeepSpeedEngine, deepspeed_config

    model = materialize(build_model(cfg.model, device="meta"), cfg.model, torch_device, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds_config = deepspeed_config(
        cfg.train.global_batch, cfg.train.micro_batch, dims.grad_accumulation(cfg.train), cfg.train.grad_clip,
        cfg.parallel.zero_stage, bf16=dtype == torch.bfloat16,
    )
    return DeepSpeedEngine(model, optimizer, scheduler, device, ds_config)
