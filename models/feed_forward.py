"""The dense feed-forward block: SwiGLU (Llama) or GELU (GPT) MLP. Dense layers use it, and so do an MoE block's
shared experts (as one wide MLP)."""

from __future__ import annotations

import torch
from torch import nn

from configs.schema import Activation
from models.layers import GateUpProjection, Linear, UsesKernels


class FeedForward(UsesKernels, nn.Module):
    """SwiGLU, w2(silu(gate x) * (up x)) with the gate and up matrices stored as one weight `w13`
    (models/layers.py GateUpProjection), or GELU, w2(gelu(w1 x))."""

    def __init__(self, d_model: int, hidden: int, activation: Activation) -> None:
        super().__init__()
        self.activation = activation
        if activation == Activation.swiglu:
            self.w13 = GateUpProjection(d_model, hidden)
        else:
            self.w1 = Linear(d_model, hidden, bias=False)
        self.w2 = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == Activation.swiglu:
            return self.w2(self.kernels.swiglu(self.w13(x)))
        return self.w2(nn.functional.gelu(self.w1(x), approximate="tanh"))
