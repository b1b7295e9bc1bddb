"""Turn a config, a device and a mesh into a training engine, applying parallelism in one fixed order:

    build on meta -> TP -> activation checkpointing -> compile -> FSDP2 -> materialize + seeded init -> DDP

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
from parallel.engine import Engine, NativeEngine
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
    pending = {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "ep": dims.ep}
    for name, degree in pending.items():
        if degree > 1 and name not in SUPPORTED_DEGREES:
            raise LayoutError(f"parallel.{name}={degree} is not implemented yet: use {name}=1")


# Kinds of model parallelism this build can apply (grows as they land).
SUPPORTED_DEGREES: frozenset[str] = frozenset()


def parallelize(
    model: nn.Module, cfg: "Config", dims: ParallelDims, mesh: Optional["Meshes"], param_dtype: Optional[torch.dtype]
) -> nn.Module:
    """Apply every meta-device transformation, in the fixed order, to a freshly built model."""
    from train.config import DPEngine

    if mesh is not None and cfg.parallel.dp_engine == DPEngine.fsdp and dims.dp_replicate * dims.dp_shard * dims.cp > 1:
        model = apply_fsdp(model, fsdp_mesh(mesh, dims.dp_replicate, dims.cp), param_dtype)
    return model


def build_engine(
    cfg: "Config", device: Device, dims: ParallelDims, mesh: Optional["Meshes"], local_rank: int
) -> Engine:
    from train.config import DPEngine

    check_supported(cfg, dims)
    dtype = training_dtype(cfg, device)
    engine_kind = cfg.parallel.dp_engine
    sharded = mesh is not None and engine_kind == DPEngine.fsdp and dims.dp * dims.cp > 1
    model = parallelize(build_model(cfg.model, device="meta"), cfg, dims, mesh, dtype)
    model = materialize(model, cfg.model, device.torch_device(local_rank), cfg.train.seed)
    if engine_kind == DPEngine.deepspeed:
        from parallel.deepspeed import DeepSpeedEngine, deepspeed_config

        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        ds_config = deepspeed_config(
            cfg.train.global_batch, cfg.train.micro_batch, dims.grad_accumulation(cfg.train), cfg.train.grad_clip,
            cfg.parallel.zero_stage, bf16=dtype == torch.bfloat16,
        )
        return DeepSpeedEngine(model, optimizer, scheduler, device, ds_config)
    if mesh is not None and engine_kind == DPEngine.ddp and dims.dp > 1:
        model = apply_ddp(model, mesh["dp"])
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    # Under FSDP the mixed-precision policy already computes in bf16; autocast would only add casts.
    autocast_dtype = None if sharded else dtype
    loss_group = mesh["dp"].get_group() if mesh is not None and dims.dp > 1 else None
    return NativeEngine(model, optimizer, scheduler, device, autocast_dtype, loss_group)
