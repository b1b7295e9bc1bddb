"""torch_npu's fused ops as a CPU stand-in, defined with the exact schemas of Ascend's op-plugin
(op_plugin/config/op_plugin_functions.yaml, commit 517f2e7d of github.com/Ascend/op-plugin) so that every call the
NPU backend makes is bound against the real signature, and computed by CPU references of each op's documented
formula (op-plugin docs/zh/custom_APIs/torch_npu/*.md). Defined as CompositeImplicitAutograd, so backward comes from
the references (torch_npu registers its own backward kernels; their numerics are not modelled here).

Importing this module registers the ops under torch.ops.npu once per process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCHEMAS = {
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_rotary_mul": "npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', "
                      "Tensor? rotate=None) -> Tensor",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
    "npu_fusion_attention": (
        "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
        "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float keep_prob=1., "
        "int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]? prefix=None, "
        "int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool gen_mask_parallel=True, "
        "bool sync=False, str softmax_layout=\"\", Tensor? sink=None, Tensor? dropout_mask=None, int seed=0, "
        "int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)"),
}
CALLS: list[str] = []  # op names, in the order the backend called them


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS.append("npu_rms_norm")
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + epsilon)  # shape: self's without the normed dimension
    return (x.float() * rstd[..., None] * gamma.float()).to(x.dtype), rstd


def _rotary_mul(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                rotate: torch.Tensor | None = None) -> torch.Tensor:
    CALLS.append("npu_rotary_mul")
    if rotary_mode == "half":
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    elif rotary_mode == "interleave":
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    else:
        raise RuntimeError(f"npu_rotary_mul: rotary_mode {rotary_mode!r} is not half or interleave")
    return x * r1 + rotated * r2


def _swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    CALLS.append("npu_swiglu")
    if not x.is_contiguous():
        raise RuntimeError("npu_swiglu: the input must be contiguous")
    a, b = x.chunk(2, dim=dim)  # swish of the first half times the second
    return F.silu(a) * b


def _fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                      scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                      prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                      gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                      offset=0):
    CALLS.append("npu_fusion_attention")
    if input_layout != "BSND" or query.shape[2] != head_num or head_num % key.shape[2]:
        raise RuntimeError(f"npu_fusion_attention: layout {input_layout} with head_num {head_num} does not match "
                           f"query {tuple(query.shape)} and key {tuple(key.shape)}")
    if query.shape[-1] != key.shape[-1] or key.shape[-1] < value.shape[-1]:
        raise RuntimeError("npu_fusion_attention needs Dq = Dk >= Dv")
    if sparse_mode == 2:  # leftUpCausal: a compressed 2048 x 2048 upper-triangular mask
        if atten_mask is None or tuple(atten_mask.shape) != (2048, 2048) or atten_mask.dtype != torch.bool:
            raise RuntimeError("npu_fusion_attention: sparse_mode=2 needs the 2048 x 2048 bool atten_mask")
    q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
    groups = head_num // key.shape[2]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    seq_q, seq_k = scores.shape[-2:]
    if sparse_mode == 2:
        scores = scores.masked_fill(torch.ones(seq_q, seq_k, dtype=torch.bool).triu(1), float("-inf"))
    elif atten_mask is not None:
        scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
    softmax_max = scores.amax(-1, keepdim=True)
    softmax_sum = (scores - softmax_max).exp().sum(-1, keepdim=True)
    out = (scores.softmax(-1) @ v).transpose(1, 2).to(query.dtype)
    return out, softmax_max, softmax_sum, torch.empty(0), seed, offset, 0


_IMPLEMENTATIONS = {"npu_rms_norm": _rms_norm, "npu_rotary_mul": _rotary_mul, "npu_swiglu": _swiglu,
                    "npu_fusion_attention": _fusion_attention}


def install() -> None:
    """Define the ops under torch.ops.npu (once per process)."""
    if hasattr(torch.ops.npu, "npu_rms_norm"):
        return
    library = torch.library.Library("npu", "DEF")
    for name, schema in SCHEMAS.items():
        library.define(schema)
        library.impl(name, _IMPLEMENTATIONS[name], "CompositeImplicitAutograd")
    _LIBRARIES.append(library)  # a Library unregisters its ops when collected


_LIBRARIES: list = []
