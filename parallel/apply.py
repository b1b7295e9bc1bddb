"""Turn a config, a device and a mesh into a training engine, applying parallelism in one fixed order:

    build on meta -> TP -> activation checkpointing -> compile -> FSDP2 -> materialize + seeded init -> DDP

DeepSpeed takes the materialized model and wraps it in its own engine instead of FSDP/DDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from launch.device import Device
from models.transformer import build_model, materialize
from parallel.dims import ParallelDims
from parallel.engine import Engine, NativeEngine
from train.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from train.config import Config


def training_dtype(cfg: "Config", device: Device) -> Optional[torch.dtype]:
    """bf16 when asked for and the device computes it natively; None means full fp32."""
    from train.config import Precision

    if cfg.train.mixed_precision == Precision.bf16 and device.supports_bf16():
        return torch.bfloat16
    return None


def build_engine(
    cfg: "Config", device: Device, dims: ParallelDims, mesh: Optional["DeviceMesh"], local_rank: int
) -> Engine:
    dtype = training_dtype(cfg, device)
    model = build_model(cfg.model, device="meta")
    model = materialize(model, cfg.model, device.torch_device(local_rank), cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    return NativeEngine(model, optimizer, scheduler, device, dtype)
