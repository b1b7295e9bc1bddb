"""The dense feed-forward block: SwiGLU (Llama) or GELU (GPT) MLP. Dense layers use it, and so do an MoE block's
shared experts (as one wide MLP)."""

from __future__ import annotations

import torch
from torch import nn

from configs.schema import Activation
from models.layers import Linear, UsesKernels


class FeedForward(UsesKernels, nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x)) or GELU (w2(gelu(w1 x))) MLP."""

    def __init__(self, d_model: int, hidden: int, activation: Activation) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = Linear(d_model, hidden, bias=False)
        self.w2 = Linear(hidden, d_model, bias=False)
        self.w3 = Linear(d_model, hidden, bias=False) if activation == Activation.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(nn.functional.gelu(self.w1(x), approximate="tanh"))
        return self.w2(self.kernels.swiglu(self.w1(x), self.w3(x)))
