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


def local_block(weight: torch.Tensor) -> torch.Tensor:
    """This rank's block of a parameter that parallelism split along a dimension the module's product does not
    reduce over (experts over ep, the gate/up weight's hidden units over tp): the DTensor's local tensor; the
    tensor itself when unsplit."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


class GateUpProjection(UsesKernels, nn.Module):
    """SwiGLU's gate and up projections stored as one weight (out_features, 2, in_features): weight[i, 0] is hidden
    unit i's gate row, weight[i, 1] its up row. forward(x) is one product, (..., 2 * out_features) with each unit's
    gate and up outputs paired ([g0 u0 g1 u1 ...]), which the backends' SwiGLU takes as it is: no copy of the
    weights or outputs into one tensor, one product for the input's gradient.

    Hidden units lead, so tensor parallelism (parallel/tensor.py) and FSDP split dim 0 as for any projection,
    unevenly too, and every rank's block pairs the gate and up rows of its own units.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, 2, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = local_block(self.weight)
        return self.kernels.linear(x, weight.reshape(-1, weight.shape[-1]))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} x (gate, up), bias=False"


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
