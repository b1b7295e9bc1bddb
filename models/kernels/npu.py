"""The Ascend NPU backend (through torch_npu).

Today: rotary embeddings in real arithmetic (torch_npu's complex support is partial) and SDPA reading grouped kv
heads in place; the routed experts loop over experts (torch_npu has no torch._grouped_mm). torch_npu's fused kernels
(npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_grouped_matmul) are the next step of this
backend: see the README's "Not tested on hardware".
"""

from __future__ import annotations

from typing import Optional

import torch

from launch.device import NPU
from models import ops
from models.kernels.cuda import gqa_attention
from models.kernels.reference import ReferenceKernels


class NpuKernels(ReferenceKernels):
    name = NPU

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops.rope_real(x, cos, sin)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """SDPA with grouped kv heads read in place; torch_npu routes it to its fused attention on Atlas A2/A3."""
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return gqa_attention(q, k, v)

    def describe(self) -> str:
        return "torch_npu's ATen ops (no fused Ascend kernels plugged in yet)"
