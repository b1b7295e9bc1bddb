"""The reference backend: models/ops.py's plain PyTorch ops on any device (`device.kernels=reference`), and the base
every device's backend overrides kernel by kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from models import ops

MatmulKernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KERNELS = ("linear", "rms_norm", "swiglu", "rope", "attention", "grouped_mm")


@dataclass(frozen=True)
class AttentionMemory:
    """What a backend's attention keeps for backward beyond q, k, v and the output, per query position and head: a
    log-sum-exp (flash-style kernels) or `probabilities` scores (a kernel that keeps them)."""

    probabilities: float = 0.0
    logsumexp: bool = True


class ReferenceKernels:
    """Plain PyTorch. A backend subclasses it and overrides what its device runs better; `enabled` names the kernels
    the backend's own versions are used for (the rest stay reference), from `device.fused`."""

    name = "reference"
    # Whether the CPU's fused C++ kernels (which keep less for backward) run on this machine: the CPU backend's.
    native = False

    def __init__(self, enabled: Sequence[str] = KERNELS) -> None:
        self.enabled = frozenset(enabled)
        base = ReferenceKernels
        # Switched-off kernels are the reference's, bound once here: no test per call.
        for kernel, methods in _METHODS.items():
            if kernel not in self.enabled:
                for method in methods:
                    setattr(self, method, getattr(base, method).__get__(self))

    # ---- the model's ops ------------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.linear(x, weight, bias)

    def project(self, x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
        """`[layer(x) for layer in layers]` for layers that read the same input (attention's q, k and v)."""
        return [layer(x) for layer in layers]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return ops.rms_norm(x, weight, eps)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(gate, up)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops.apply_rope(x, cos, sin)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return ops.causal_attention(q, k, v)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return ops.grouped_mm(x, w, counts)

    # ---- what the planner and selective recompute ask ------------------------------------------------------

    def saved_ops(self) -> set:
        """Op overloads of this backend whose outputs selective recompute keeps (besides ATen's matmuls and
        attention, which parallel/recompute.py lists)."""
        return set()

    def attention_memory(self, seq_len: int, dtype: torch.dtype) -> Optional[AttentionMemory]:
        """What attention keeps at this length and dtype when the backend runs its own kernel; None: SDPA's."""
        return None

    def matmul_kernels(self, dtype: torch.dtype) -> list[MatmulKernel]:
        """The matmuls the model's projections run on; a CPU's measured peak is the best of them."""
        return [torch.mm]

    # ---- process set-up -------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Build or check what the kernels need in this process; ConfigError (one line) when they cannot run."""

    def describe(self) -> str:
        return "PyTorch's ops (reference kernels)"


# Which methods each switch of `device.fused` turns back to the reference.
_METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("linear", "project"), "rms_norm": ("rms_norm",), "swiglu": ("swiglu",), "rope": ("apply_rope",),
    "attention": ("causal_attention",), "grouped_mm": ("grouped_mm",),
}

REFERENCE = ReferenceKernels()


def contiguous_grad(x: torch.Tensor) -> Any:
    return _ContiguousGrad.apply(x)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's backward rejects the stride-0
    gradients that `sum()` or `expand()` produce downstream."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def native_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm (one kernel for all groups); the caller has checked that it takes these operands."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return contiguous_grad(torch._grouped_mm(x, w, offs=offsets))


def grouped_mm_takes(x: torch.Tensor, w: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether torch._grouped_mm takes these operands in one of `dtypes`: row strides must be multiples of 16 bytes,
    and its meta kernel (what torch.compile traces) accepts only bf16."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in dtypes:
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
