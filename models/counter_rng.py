"""Random starting values that any rank can draw for just its own slice of a tensor, on its own device.

Element i (the linear index in the whole tensor, row-major) of a tensor with key k gets a value that is a pure
function of (k, i): integer hashing of the index, then an Irwin-Hall sum of twelve 17-bit uniforms, which is a
normal distribution to within its ±6 sigma bounds (mean 0, variance 1). Every step is integer arithmetic until one
exact conversion to float32, so the values are bitwise the same on every device and in any slicing: a tensor-
parallel shard, an FSDP shard or a pipeline stage draws exactly what a single device would have drawn for the same
elements, and no rank ever builds the whole tensor. (A sequential generator, such as torch.Generator's, cannot be
entered at an offset; torch's offset-based Philox for DTensor exists only on CUDA-like devices, and its values
depend on the device.)

The hash is the well-known 32-bit integer finaliser (xorshift-multiply, multiplier 0x45d9f3b), evaluated in int64
with operands below 2^32 and a multiplier below 2^27, so no product overflows on any device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B
# Uniforms per value (Irwin-Hall n = 12: variance 12 x 1/12 = 1) and bits per uniform.
_TERMS = 12
_BITS = 17
# Elements hashed at a time: the int64 temporaries (2 MB each) stay in the core's cache, which made the draw ~6x
# faster on CPU than chunks of 2M elements, and bounded whatever the tensor.
CHUNK_ELEMENTS = 1 << 18


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of each element (values in [0, 2^32)), in place."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_MULTIPLIER).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _mix_int(x: int) -> int:
    x = ((x >> 16) ^ x) * _MULTIPLIER & _M32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _M32
    return (x >> 16) ^ x


def stream_key(*parts: int) -> int:
    """One 32-bit key from integers (a seed, a name's CRC)."""
    key = 0
    for part in parts:
        key = _mix_int(key ^ (part & _M32) ^ _mix_int((part >> 32) & _M32))
    return key


def _normals_at(index: torch.Tensor, key: int) -> torch.Tensor:
    """Standard-normal float32 values for int64 linear indices."""
    base = _mix_(_mix_((index >> 32) ^ key).bitwise_xor_(index & _M32))
    total = torch.zeros_like(index)
    for term in range(_TERMS // 2):  # each hash gives two 16-bit uniforms
        bits = _mix_(base ^ _mix_int(key + term + 1))
        total += (bits & 0xFFFF) + (bits >> 16)
    # two odd 17-bit numbers 2 m + 1 per hash: twice the sum of the m, plus one per term
    total.mul_(2).add_(_TERMS)
    # sum of the uniforms u = (2 m + 1) / 2^17, minus their mean 6: an integer below 2^20 over 2^17, exact in float32
    centred = total - _TERMS * (1 << (_BITS - 1))
    return centred.to(torch.float32) * (2.0 ** -_BITS)


def fill_normal_(out: torch.Tensor, key: int, full_shape: Sequence[int], offset: Sequence[int]) -> torch.Tensor:
    """Fill `out`, the block of a tensor of `full_shape` that starts at `offset` (one start per dimension), with that
    tensor's standard-normal values, on `out`'s device, a bounded number of rows at a time."""
    full_shape, offset = list(full_shape), list(offset)
    if out.dim() == 0 or out.numel() == 0:
        if out.numel():
            out.copy_(_normals_at(torch.zeros((), dtype=torch.int64, device=out.device), key))
        return out
    strides = [math.prod(full_shape[d + 1:]) for d in range(len(full_shape))]
    # Linear index of every element of one row of the block (all dimensions after the first).
    row = torch.zeros((), dtype=torch.int64, device=out.device)
    for d in range(1, out.dim()):
        positions = torch.arange(offset[d], offset[d] + out.shape[d], device=out.device, dtype=torch.int64)
        row = row.unsqueeze(-1) + positions * strides[d]
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, row.numel()))
    for start in range(0, out.shape[0], rows_per_chunk):
        stop = min(out.shape[0], start + rows_per_chunk)
        first = torch.arange(offset[0] + start, offset[0] + stop, device=out.device, dtype=torch.int64)
        index = first.view(-1, *([1] * row.dim())) * strides[0] + row
        out[start:stop].copy_(_normals_at(index, key))
    return out
