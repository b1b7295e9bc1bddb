"""The model's layers that run a kernel: each holds the kernel backend chosen when the model was built
(`models/kernels/`, set by `use_kernels`), the reference backend until then.

Linear and RMSNorm are nn.Linear / nn.RMSNorm subclasses, so tensor parallelism's plans, FSDP and every isinstance
check treat them as the torch modules, and parameter names and checkpoints do not change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.kernels.reference import REFERENCE, ReferenceKernels


class UsesKernels:
    """A module whose forward calls its `kernels` backend (a stateless object shared by all modules of a model)."""

    kernels: ReferenceKernels = REFERENCE


class Linear(UsesKernels, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.bias)


class RMSNorm(UsesKernels, nn.RMSNorm):
    """Always built with a weight and an explicit eps, as every model here builds it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.eps is None:
            return super().forward(x)
        return self.kernels.rms_norm(x, self.weight, self.eps)


def use_kernels(model: nn.Module, kernels: Any) -> nn.Module:
    """Have every layer of `model` run `kernels` (before parallelizing: the wrappers keep the attribute)."""
    for module in model.modules():
        if isinstance(module, UsesKernels):
            module.kernels = kernels
    return model
