"""The CUDA backend: SDPA reads grouped kv heads in place (`enable_gqa`, no repeat_interleave copies, causal or
masked) and the routed experts run as one torch._grouped_mm in bf16 (its GPU kernels are bf16)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from launch.device import CUDA
from models import ops
from models.kernels.reference import ReferenceKernels, grouped_mm_takes, native_grouped_mm
from models.visibility import Visibility


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on (batch, seq, heads, dim) with k and v at their own (fewer) head count."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def gqa_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
    """SDPA on (batch, seq, heads, dim) with `visible`'s mask, k and v at their own (fewer) head count."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=visible.mask(), enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class CudaKernels(ReferenceKernels):
    name = CUDA

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return gqa_attention(q, k, v)

    def masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
        return gqa_masked_attention(q, k, v, visible)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if grouped_mm_takes(x, w, (torch.bfloat16,)):
            return native_grouped_mm(x, w, counts)
        return ops.grouped_mm(x, w, counts)

    def describe(self) -> str:
        return "PyTorch's CUDA ops (SDPA with grouped kv heads, torch._grouped_mm for bf16 experts)"
