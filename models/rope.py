"""Rotary frequencies, with the context-extension scalings published checkpoints use (Llama 3.1's and YaRN).

Only the frequencies and two scalar factors change; the rotation itself (`models.ops.apply_rope`, consecutive pairs)
does not. The formulas follow the papers' definitions: Llama 3 (arXiv 2407.21783, and Meta's reference code) and
YaRN (arXiv 2309.00071, eq. 17-21, with DeepSeek-V3's `mscale_all_dim`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from configs.schema import RopeScaling, RopeScalingKind


def inverse_frequencies(dim: int, theta: float, scaling: Optional[RopeScaling], device: torch.device) -> torch.Tensor:
    """(dim // 2,) float32 angular frequency of each rotated pair."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None or scaling.kind == RopeScalingKind.none:
        return inv_freq
    if scaling.kind == RopeScalingKind.llama3:
        return _llama3(inv_freq, scaling)
    return _yarn(inv_freq, dim, theta, scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Wavelengths longer than original/low_freq_factor are stretched by `factor`, shorter than
    original/high_freq_factor kept, and the band between blends the two smoothly."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    stretched = torch.where(wavelength > s.original_max_seq_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    in_band = (wavelength >= s.original_max_seq_len / s.high_freq_factor) & \
        (wavelength <= s.original_max_seq_len / s.low_freq_factor)
    return torch.where(in_band, blended, stretched)


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """Pairs that turn fewer than beta_slow times over the original context are interpolated (divided by factor),
    those turning more than beta_fast times kept, with a linear ramp between (indices rounded outwards)."""
    def pair_index(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(s.beta_fast)), 0)
    high = min(math.ceil(pair_index(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(dim // 2, device=inv_freq.device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rotation_magnitude(scaling: Optional[RopeScaling]) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature, 1 otherwise."""
    if scaling is None or scaling.kind != RopeScalingKind.yarn:
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return _yarn_mscale(scaling.factor)


def softmax_scale_gain(scaling: Optional[RopeScaling]) -> float:
    """Extra factor on MLA's 1/sqrt(qk_head_dim) softmax scale: DeepSeek's mscale_all_dim squared, else 1."""
    if scaling is None or scaling.kind != RopeScalingKind.yarn or not scaling.mscale_all_dim:
        return 1.0
    return _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
