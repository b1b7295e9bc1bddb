"""fp32 linear layers on CPU through oneDNN's matmul instead of torch.mm's BLAS (MKL in PyTorch's x86 wheels).

On this project's CPU (AMD EPYC, 2 cores) oneDNN's fp32 matmul runs the model's projection shapes at ~200 GFLOP/s
in isolation where torch.mm runs them at 125-175, and it keeps its rate when the shared host is busy while MKL's
falls further. In the trunk benchmark's model (bench/trunk.py) the projections ran at ~187 GFLOP/s against ~157
and the step took 18% less time (median of 10 alternated pairs in one process; pairs ranged 11-22%). The results
are fp32 (relative error against float64 ~1e-6, like MKL's), not a reduced-precision mode.

Forward (x w^T) and the input gradient (g w) run through oneDNN. The weight gradient (g^T x, whose inner dimension
is the token count) stays with torch.mm: oneDNN's linear over transposed views ran it 5-20% slower.
"""

from __future__ import annotations

import platform
from typing import Any, Callable, Optional

import torch


def _onednn_linear_op() -> Optional[object]:
    """oneDNN's linear (`x @ w.T`, optional post-op) where this PyTorch build has it, on x86-64 only: that is where
    it was measured; on Arm hosts (Kunpeng beside Ascend, Graviton) oneDNN calls other backends, not checked here."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear_op()
# Below this many multiply-adds (x.numel() * out_features) F.linear is faster: the op's fixed cost (~60 us per
# forward + backward, measured) outweighs oneDNN's better kernel. 2^24 is 4096 tokens x 64 x 64, or 256 x 256 x 256.
MIN_FORWARD_MACS = 2**24
# A DTensor parameter's type is DTensor, so these two are the unsharded cases (FSDP2 unshards to a plain Parameter).
_PLAIN_WEIGHT_TYPES = (torch.Tensor, torch.nn.Parameter)


def matmul_kernels(dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The CPU matmuls the model runs in `dtype`, as (a, b) -> a product with the FLOPs of a @ b for square
    operands: torch.mm, and for fp32 also oneDNN's (a @ b.T). A CPU's measured peak is the best of them."""
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch_mm": torch.mm}
    if ONEDNN_LINEAR is not None and dtype == torch.float32:
        kernels["onednn"] = _matmul_transposed
    return kernels


def onednn_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether `onednn_linear` should compute F.linear(x, weight, bias).

    Plain fp32 CPU tensors only, no bias (no layer here has one), and products big enough to gain: a DTensor keeps
    F.linear, which knows how to shard; under autocast F.linear drops to bf16 as the user asked. The test reads
    only types, devices, dtypes and shapes, so torch.compile evaluates it while tracing and then keeps the op in
    its graph as an external kernel.
    """
    if ONEDNN_LINEAR is None or bias is not None:
        return False
    if type(x) is not torch.Tensor or type(weight) not in _PLAIN_WEIGHT_TYPES:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype:
        return False
    if x.dim() < 2 or weight.dim() != 2 or x.numel() * weight.shape[0] < MIN_FORWARD_MACS:
        return False
    return not torch.is_autocast_enabled("cpu")


def _matmul_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ONEDNN_LINEAR(x, weight, None, "none", [], "")  # type: ignore[operator]


# The matmul is a registered op, so that torch.compile keeps it whole (an external kernel in Inductor's graph) and
# selective recompute sees one op whose output it keeps; autograd is an autograd.Function around it, which costs
# ~20 us a call in eager mode where torch.library.custom_op's Python autograd layer cost ~200.
_LIBRARY = torch.library.Library("supertrain", "DEF")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.impl("onednn_linear", _matmul_transposed, "CPU")


@torch.library.register_fake("supertrain::onednn_linear", lib=_LIBRARY)
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


LINEAR_OP = torch.ops.supertrain.onednn_linear.default  # the op as dispatch modes (selective recompute) see it


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return LINEAR_OP(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = LINEAR_OP(grad_out, weight.t())  # g @ w
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in_features) @ weight (out_features, in_features)^T, with gradients for both."""
    return _OneDnnLinear.apply(x, weight)
