"""Numerical building blocks shared by the model: linear layers, RMSNorm, SwiGLU, rotary embeddings, causal
attention, grouped matmul.

Kept as plain functions (and nn.Linear / nn.RMSNorm subclasses that call them) so a device can swap in a fused
kernel in one place without touching the model. On CPU in fp32 that is models/cpu_linear.py for projections and
models/cpu_native.py (C++) for RMSNorm, SwiGLU and attention.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import RopeScaling
from models import cpu_native
from models.cpu_attention import QUERY_BLOCK, blocked_attention_applies, blocked_causal_attention
from models.cpu_linear import onednn_linear, onednn_linear_applies, onednn_linear_group
from models.rope import inverse_frequencies, rotation_magnitude


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with fp32 on CPU through oneDNN's matmul (models/cpu_linear.py), faster there than torch.mm."""
    if onednn_linear_applies(x, weight, bias):
        return onednn_linear(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through `linear`. A subclass, so tensor parallelism's plans, FSDP and every
    isinstance check treat it as nn.Linear, and parameter names and checkpoints do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def project(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for layers that read the same input (attention's q, k and v).

    On the oneDNN CPU route (plain fp32 weights, no bias) one product against the stacked weights, whose outputs
    are column blocks of one tensor (models/cpu_linear.py). Otherwise each layer is called as a module, so that
    tensor parallelism's hooks on it (whose weights are DTensors, never on that route) still run.
    """
    if all(onednn_linear_applies(x, layer.weight, layer.bias) for layer in layers):
        return onednn_linear_group(x, [layer.weight for layer in layers])
    return [layer(x) for layer in layers]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: one fused pass each way for fp32 on CPU, else ATen's."""
    if cpu_native.native_applies(x, weight):
        return cpu_native.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose computation goes through `rms_norm` (a subclass: names, checkpoints and tensor-parallel
    plans are unchanged). Always built with a weight and an explicit eps, as every model here builds it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.eps is None:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one fused pass each way for fp32 on CPU, which also keeps one tensor fewer for backward."""
    if cpu_native.native_applies(gate, up):
        return cpu_native.swiglu(gate, up)
    return F.silu(gate) * up


def rope_tables(seq_len: int, dim: int, theta: float, device: torch.device,
                scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, dim // 2), in float32 whatever the compute dtype."""
    inv_freq = inverse_frequencies(dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    magnitude = rotation_magnitude(scaling)
    if magnitude != 1.0:
        return angles.cos() * magnitude, angles.sin() * magnitude
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dimension of x (batch, seq, heads, dim) by the position's angle.

    Eagerly, as one complex multiply: on CPU that is 6x faster forward + backward than the real form, whose
    stride-2 pairs defeat vectorisation. The real form is taken where complex is a poor fit: under torch.compile
    (Inductor generates no code for complex ops but fuses the real form into one kernel) and on NPU, whose
    complex support in torch_npu is partial (the place to plug torch_npu's fused rotary kernel).
    """
    if x.device.type == "npu" or torch.compiler.is_compiling():
        return rope_real(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos, sin)[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in real arithmetic: (even, odd) -> (even cos - odd sin, odd cos + even sin), as one multiply and
    one multiply-add over the pair-swapped input."""
    pairs = x.float().unflatten(-1, (-1, 2))
    signed_sin = torch.stack((-sin, sin), dim=-1)[None, :, None]
    rotated = torch.addcmul(pairs * cos[None, :, None, :, None], pairs.flip(-1), signed_sin)
    return rotated.flatten(-2).type_as(x)


def _expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        return k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
    return k, v


@torch.compiler.disable
def _blocked_attention_outside_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """A graph break under torch.compile, a plain call in eager mode. The C++ kernel rotates q and k and reads
    shared kv heads in place; the Python one needs them rotated and expanded."""
    if cpu_native.native_applies(q, k, v):
        return cpu_native.causal_attention(q, k, v, QUERY_BLOCK, rope)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return blocked_causal_attention(q, *_expand_kv_heads(q, k, v))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Causal attention on (batch, seq, heads, dim) tensors; k and v may have fewer heads (grouped-query). With
    `rope` = (cos, sin) from `rope_tables`, q and k are rotated first (`apply_rope`).

    The kv heads are expanded explicitly rather than through SDPA's enable_gqa, which not every backend
    (torch_npu in particular) implements. fp32 on CPU from 512 to 1024 positions runs the block-causal kernel, in
    C++ (models/cpu_native.py, which also rotates q and k inside its own copies) or else in Python
    (models/cpu_attention.py), faster there than ATen's CPU flash kernel; everything else goes to SDPA. Under
    torch.compile the kernel still runs, eagerly, between two compiled graphs: Inductor would otherwise trace it
    as plain ops or, before, the model fell back to SDPA's flash kernel, and either made compiled blocks slower
    than eager ones on CPU.
    """
    if blocked_attention_applies(q, k, v):
        return _blocked_attention_outside_graph(q, k, v, rope)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = _expand_kv_heads(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


# ---- grouped matmul (mixture-of-experts) --------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's backward rejects the stride-0
    gradients that `sum()` or `expand()` produce downstream."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def _native_grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands.

    It runs eagerly on CPU in fp32, bf16 and fp16 (checked on torch 2.13, forward and backward). Its meta kernel,
    which torch.compile traces through, accepts only bf16, and the GPU kernels are bf16 too, so elsewhere only bf16
    takes the native path. Ascend's torch_npu has no `_grouped_mm`: NPU uses the loop until the device layer swaps
    in its own grouped-matmul kernel here. Row strides must be multiples of 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device.type == "npu":
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.dtype == torch.bfloat16:
        return True
    on_cpu = x.device.type == "cpu"
    return on_cpu and x.dtype in (torch.float32, torch.float16) and not torch.compiler.is_compiling()


def _looped_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per group; reads the counts on the host, which stalls an accelerator's stream."""
    pieces = torch.split(x, counts.tolist())
    out = [piece @ w[group] for group, piece in enumerate(pieces)]
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (rows, k) holds consecutive blocks of counts[g] rows; block g is multiplied by w[g] (groups, k, n).

    Returns (rows, n). counts must sum to the number of rows. One kernel (torch._grouped_mm) where supported, else
    a loop over the groups (never over rows).
    """
    if _native_grouped_mm_supported(x, w):
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))
    return _looped_grouped_mm(x, w, counts)
