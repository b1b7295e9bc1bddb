"""fp32 linear layers on CPU through oneDNN's matmul instead of torch.mm's BLAS (MKL in PyTorch's x86 wheels).

oneDNN generates its kernels for the CPU it runs on (AVX-512 where there is one). On the AMD CPUs with AVX-512
measured, MKL does not use AVX-512 and oneDNN's fp32 matmul sustained 1.1-2.8x torch.mm's rate. The results are fp32
(relative error against float64 ~1e-6, like MKL's), not a reduced-precision mode.

All three products of a layer run through oneDNN: forward (x w^T), input gradient (g w) and weight gradient
(g^T x, inner dimension = tokens), the last through the C++ kernels' oriented matmul where they are built
(`_weight_gradient`).

Where it is taken: on an AMD CPU with AVX2 only, both libraries ran squares at the same rate and oneDNN's linear lost
in backward (it copies a transposed input before multiplying, which torch.mm's BLAS avoids with its transpose flags;
the benchmark step ~8% longer). So oneDNN is taken where the CPU has AVX-512 (ATen's CPU capability reports it) and
is not Intel's: MKL is Intel's library and is expected to use AVX-512 on Intel CPUs, which is not measured.
`SUPERTRAIN_CPU_LINEAR=onednn|aten` overrides. The measurements host by host: docs/design_decisions.md.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Callable, Optional, Sequence

import torch

from models.kernels.cpu import native as cpu_native


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
LINEAR_ROUTE_VARIABLE = "SUPERTRAIN_CPU_LINEAR"
_ROUTES = ("auto", "onednn", "aten")


def _cpu_vendor() -> str:
    """The CPU's vendor string on Linux (GenuineIntel, AuthenticAMD, ...), "unknown" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def onednn_preferred_for(route: str, capability: str, vendor: str) -> bool:
    """Whether fp32 projections take oneDNN, given the route asked for (`SUPERTRAIN_CPU_LINEAR`), ATen's CPU
    capability and the CPU vendor. `auto`: where it was measured faster (see the module docstring)."""
    if route not in _ROUTES:
        raise ValueError(f"{LINEAR_ROUTE_VARIABLE}={route!r} is not a route: use one of {', '.join(_ROUTES)}")
    if route != "auto":
        if route == "onednn" and ONEDNN_LINEAR is None:
            raise ValueError(f"{LINEAR_ROUTE_VARIABLE}=onednn, but this PyTorch build has no oneDNN linear on this "
                             "CPU: unset it or use aten")
        return route == "onednn"
    return ONEDNN_LINEAR is not None and capability == "AVX512" and vendor != "GenuineIntel"


# A bad value is kept as a message rather than raised here, so that importing the model never fails;
# launch.device.resolve_device stops the run with it at start-up.
try:
    ONEDNN_PREFERRED = onednn_preferred_for(
        os.environ.get(LINEAR_ROUTE_VARIABLE, "auto"), torch.backends.cpu.get_cpu_capability(), _cpu_vendor()
    )
    LINEAR_ROUTE_ERROR: Optional[str] = None
except ValueError as error:
    ONEDNN_PREFERRED, LINEAR_ROUTE_ERROR = False, str(error)

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

    Only on hosts where oneDNN is preferred (`ONEDNN_PREFERRED`), and there only for plain fp32 CPU tensors, no
    bias (no layer here has one) and products big enough to gain: a DTensor keeps F.linear, which knows how to
    shard; under autocast F.linear drops to bf16 as the user asked. The test reads only types, devices, dtypes and
    shapes, so torch.compile evaluates it while tracing and then keeps the op in its graph as an external kernel.
    """
    if not ONEDNN_PREFERRED or bias is not None:
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
            grad_w = _weight_gradient(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


def _weight_gradient(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T x for g (tokens, out) and x (tokens, in), with the weight's layout.

    Through the C++ kernels where they are built (models/kernels/cpu/native.py): oneDNN's batched-matmul entry takes the
    transposed views without copies and, oriented with the shorter feature dimension as rows, ran 15-25% faster
    than this op's matmul over the same views, and than oneDNN's inner-product weight-gradient primitive, whose
    inputs need copies into oneDNN's layout. In code that torch.compile traces too, where
    the kernels are already loaded (the op is kept whole in the graph); elsewhere this op over transposed views.
    """
    if cpu_native.kernels_loaded():
        return torch.ops.supertrain_cpu.linear_weight_grad(grad_out, x, cpu_native.Loaded.onednn_matmul)
    return LINEAR_OP(grad_out.t(), x.t())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in_features) @ weight (out_features, in_features)^T, with gradients for both."""
    return _OneDnnLinear.apply(x, weight)


class _OneDnnLinearGroup(torch.autograd.Function):
    """Several weights applied to one input as one product against the weights stacked by rows; the outputs are
    its column blocks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, *weights: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return LINEAR_OP(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        grad_out = _side_by_side(grads)
        if grad_out is None:
            grad_out = torch.cat(grads, dim=-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # Stacked again rather than kept from forward: a copy of the weights, not worth their memory.
            grad_x = LINEAR_OP(grad_out, torch.cat(weights).t())
        if not any(ctx.needs_input_grad[1:]):
            return (grad_x, *(None for _ in weights))
        grad_stacked = _weight_gradient(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]))
        return (grad_x, *grad_stacked.split([w.shape[0] for w in weights]))


def _side_by_side(parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor `parts` are consecutive column blocks of, as a view, when they lie so in memory (the C++
    attention returns the q, k, v gradients that way); None otherwise."""
    first = parts[0]
    width = sum(p.shape[-1] for p in parts)
    offset = first.storage_offset()
    for part in parts:
        if (part.shape[:-1] != first.shape[:-1] or part.stride() != first.stride() or part.stride(-1) != 1
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or part.storage_offset() != offset):
            return None
        offset += part.shape[-1]
    if first.dim() < 2 or first.stride(-2) != width:
        return None
    return first.as_strided((*first.shape[:-1], width), first.stride())


def onednn_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ w^T for w in weights] as one product: the outputs are column blocks of one tensor, so x is read once,
    and backward runs one input-gradient product (inner dimension: all outputs together) instead of one per weight
    and the additions of their results. For the q, k and v projections that took 5-10% less time forward and
    backward than three products; for SwiGLU's two it took longer, so it is not used
    there."""
    return list(_OneDnnLinearGroup.apply(x, *weights))
