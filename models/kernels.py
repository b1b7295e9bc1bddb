"""The set-up the model's kernels need in a process, before a model is built: on CPU, check the kernel routes the
environment asks for and build (once per machine) or load the fused C++ kernels, so that a bad route or a failed
build stops the run at start-up with one line, not in the first step.

Other device kinds need nothing here yet. This is the one entry the trainer and the benchmark call; the kernels
themselves are models/cpu_native.py (C++) and models/cpu_linear.py (oneDNN projections).
"""

from __future__ import annotations

from typing import Callable

import torch

from configs.errors import ConfigError
from models import cpu_linear, cpu_native

MatmulKernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_kernels(device_kind: str) -> None:
    """Raise ConfigError (one line) for a bad kernel route, or a failed build that SUPERTRAIN_CPU_KERNELS=native
    required; under `auto` a failed build logs one warning and ATen's ops run instead."""
    if device_kind != "cpu":
        return
    for route_error in (cpu_linear.LINEAR_ROUTE_ERROR, cpu_native.ROUTE_ERROR):
        if route_error is not None:
            raise ConfigError(route_error)
    try:
        cpu_native.load()
    except cpu_native.NativeKernelError as error:
        raise ConfigError(str(error)) from None


def describe_kernels(device_kind: str) -> str:
    """What the model's fp32 work runs on, for the start-up line."""
    if device_kind != "cpu":
        return "PyTorch's ops"
    return f"fp32 ops: {cpu_native.description()}"


def matmul_kernels(dtype: torch.dtype) -> list[MatmulKernel]:
    """The matmuls the model runs on CPU in `dtype`; a CPU's measured peak is the best of them."""
    return list(cpu_linear.matmul_kernels(dtype).values())
