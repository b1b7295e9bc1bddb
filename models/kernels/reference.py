"""The reference backend: models/ops.py's plain PyTorch ops on any device (`device.kernels=reference`), and the base
every device's backend overrides kernel by kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from models import ops
from models.visibility import Visibility

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

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the (gate, up) pairs along the last dimension (`ops.swiglu`)."""
        return ops.swiglu(gate_up)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops.apply_rope(x, cos, sin)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return ops.causal_attention(q, k, v)

    def masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
        """Attention where `visible` says which keys each query sees (documents, context-parallel chunks); q and k
        already rotated."""
        return ops.masked_attention(q, k, v, visible.mask())

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return ops.grouped_mm(x, w, counts)

    def permute_tokens(self, tokens: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                       capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A mixture-of-experts block's tokens (tokens, d_model) as rows sorted by expert, for grouped_mm.

        chosen (tokens, k): the experts of each token's k slots (assignment a = token * k + slot); weights (tokens, k)
        their combine weights; counts: assignments per expert. With a `capacity`, each expert keeps only its
        `capacity` highest-weighted assignments (ties: the earlier token) and the rest are dropped. Returns (rows,
        kept count per expert, the mapping unpermute_tokens takes back); within an expert, rows keep token order.
        """
        flat = chosen.flatten()
        if capacity is None:
            order, kept = torch.argsort(flat, stable=True), counts
        else:
            order, kept = sort_with_capacity(flat, weights.flatten(), counts, capacity)
        return tokens[order // chosen.shape[-1]], kept, order

    def unpermute_tokens(self, rows: torch.Tensor, mapping: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """permute_tokens undone: each token's weighted sum of its k slots' rows (tokens, d_model); a dropped slot
        contributes nothing. In the promoted dtype of rows and weights (fp32 routing weights: fp32)."""
        top_k, width = weights.shape[-1], rows.shape[-1]
        per_slot = rows.new_zeros(weights.numel(), width).index_put((mapping,), rows)
        return (per_slot.view(-1, top_k, width) * weights.unsqueeze(-1)).sum(dim=1)

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
    "attention": ("causal_attention", "masked_attention"), "grouped_mm": ("grouped_mm", "permute_tokens", "unpermute_tokens"),
}

REFERENCE = ReferenceKernels()


def sort_with_capacity(flat_expert: torch.Tensor, flat_weight: torch.Tensor, counts: torch.Tensor,
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments sorted by expert, each expert keeping only its `capacity` highest-weighted ones (ties: the earlier
    token), plus the kept count per expert. The kept total is a dynamic shape (read on the host)."""
    by_weight = torch.argsort(-flat_weight.detach(), stable=True)
    order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.shape[0], device=order.device) - first_of_expert[flat_expert[order]]
    return order[rank_in_expert < capacity], counts.clamp(max=capacity)


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
