"""The reference ops: plain PyTorch, correct on every device, and what every kernel backend is tested against.

A kernel backend (models/kernels/) replaces some of them with fused kernels for its device; the model calls them
through its backend (`module.kernels`), never these directly, except where a backend has nothing better.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from configs.schema import RopeScaling
from models.rope import inverse_frequencies, rotation_magnitude


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for the gate and up projections paired along the last dimension, [g0 u0 g1 u1 ...], as one
    product against a `GateUpProjection`'s weight (or the experts' w13) gives them."""
    return F.silu(gate_up[..., 0::2]) * gate_up[..., 1::2]


def rope_tables(seq_len: int, dim: int, theta: float, device: torch.device,
                scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (seq_len, dim // 2), in float32 whatever the compute dtype."""
    inv_freq = inverse_frequencies(dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    magnitude = rotation_magnitude(scaling)
    if magnitude != 1.0:
        return angles.cos() * magnitude, angles.sin() * magnitude
    return angles.cos(), angles.sin()


def rope_tables_at(positions: torch.Tensor, dim: int, theta: float,
                   scaling: Optional[RopeScaling] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at given positions (..., seq) int64: (..., seq, dim // 2) float32, as `rope_tables` would give
    at those rows."""
    inv_freq = inverse_frequencies(dim, theta, scaling, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    magnitude = rotation_magnitude(scaling)
    if magnitude != 1.0:
        return angles.cos() * magnitude, angles.sin() * magnitude
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dimension of x (batch, seq, heads, dim) by the position's angle; cos and
    sin are (seq, dim // 2), or (batch, seq, dim // 2) when positions differ between sequences (documents).

    Eagerly, as one complex multiply: on CPU that is 6x faster forward + backward than the real form, whose
    stride-2 pairs defeat vectorisation. Under torch.compile the real form (`rope_real`), which Inductor fuses into
    one kernel (it generates no code for complex ops).
    """
    if torch.compiler.is_compiling():
        return rope_real(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos, sin).unsqueeze(-2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in real arithmetic: (even, odd) -> (even cos - odd sin, odd cos + even sin), as one multiply and
    one multiply-add over the pair-swapped input."""
    pairs = x.float().unflatten(-1, (-1, 2))
    signed_sin = torch.stack((-sin, sin), dim=-1).unsqueeze(-3)
    rotated = torch.addcmul(pairs * cos.unsqueeze(-2).unsqueeze(-1), pairs.flip(-1), signed_sin)
    return rotated.flatten(-2).type_as(x)


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v repeated to q's head count (grouped-query attention), as copies."""
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        return k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
    return k, v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Causal attention on (batch, seq, heads, dim) tensors; k and v may have fewer heads (grouped-query), v may be
    narrower (MLA). With `rope` = (cos, sin) from `rope_tables`, q and k are rotated first. Scores are scaled by
    1/sqrt(q's head width). The kv heads are expanded explicitly, which every SDPA implementation accepts."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = expand_kv_heads(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention on (batch, seq, heads, dim) tensors (already rotated) where `mask` (batch, 1, queries, keys) bool
    says which keys each query sees (models/visibility.py); grouped kv heads and a narrower v as in
    `causal_attention`."""
    k, v = expand_kv_heads(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (rows, k) holds consecutive blocks of counts[g] rows; block g is multiplied by w[g] (groups, k, n).
    One matmul per group; reads the counts on the host, which stalls an accelerator's stream."""
    pieces = torch.split(x, counts.tolist())
    out = [piece @ w[group] for group, piece in enumerate(pieces)]
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])
