"""Kernel backends: the model's numerical ops as each device runs them best, chosen once when the model is built.

    reference.py   plain PyTorch (models/ops.py): every device, and the ground truth of the tests
    cpu/           fused C++ kernels, oneDNN projections, block-causal attention, torch._grouped_mm
    cuda.py        SDPA with grouped kv heads, torch._grouped_mm in bf16
    npu.py         Ascend through torch_npu

`device.kernels=auto` picks the device's backend, `reference` the plain ops; `device.fused.<kernel>=false` keeps one
kernel on the reference op (`grouped_mm` names the routed experts' kernels: the grouped matmul and the token
permutation around it). The planner and selective recompute ask the chosen backend what it keeps
(`saved_ops`, `attention_memory`); nothing outside this package imports a backend module.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

from configs.errors import ConfigError
from launch.device import CPU, CUDA, NPU
from models.kernels.reference import KERNELS, REFERENCE, AttentionMemory, MatmulKernel, ReferenceKernels

__all__ = ["KERNELS", "REFERENCE", "AttentionMemory", "MatmulKernel", "ReferenceKernels", "kernels_for"]

CHOICES = ("auto", "reference")


def kernels_for(device_kind: str, choice: str = "auto", enabled: Optional[Iterable[str]] = None) -> ReferenceKernels:
    """The backend for a device kind (cpu, cuda, npu, or meta for a model that is never run). One instance per
    process and settings: start-up asks twice (the process set-up, then the trainer), and a backend's checks, with
    their logged fallbacks, run once."""
    if choice not in CHOICES:
        raise ConfigError(f"device.kernels={choice!r} is not one of {', '.join(CHOICES)}")
    switches = tuple(sorted(set(KERNELS if enabled is None else enabled)))
    return _backend(device_kind, choice, switches)


@functools.lru_cache(maxsize=None)
def _backend(device_kind: str, choice: str, switches: tuple[str, ...]) -> ReferenceKernels:
    if choice == "reference" or device_kind == "meta":
        return ReferenceKernels(switches)
    if device_kind == CPU:
        from models.kernels.cpu import CpuKernels

        return CpuKernels(switches)
    if device_kind == CUDA:
        from models.kernels.cuda import CudaKernels

        return CudaKernels(switches)
    if device_kind == NPU:
        from models.kernels.npu import NpuKernels

        return NpuKernels(switches)
    return ReferenceKernels(switches)
