"""torch_npu's fused ops as a CPU stand-in, defined with the exact schemas of Ascend's op-plugin
(op_plugin/config/op_plugin_functions.yaml, commit 517f2e7d of github.com/Ascend/op-plugin) so that every call the
NPU backend makes is bound against the real signature, and computed by CPU references of each op's documented
formula (op-plugin docs/zh/custom_APIs/torch_npu/*.md), or of op-plugin's own tests where no doc page is mirrored.
Ops torch_npu gives a backward (op_plugin/config/derivatives.yaml, or an AutogradPrivateUse1 kernel) are defined as
CompositeImplicitAutograd, so backward comes from the references (torch_npu's backward kernels' numerics are not
modelled); npu_grouped_matmul, which has none, is a CPU kernel without autograd, as on the NPU: the backend's own
autograd wrapper is what differentiates it, and selective recompute sees it as one op.

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
    "npu_grouped_matmul": (
        "npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
        "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
        "Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, "
        "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
        "int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, "
        "int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, "
        "int? per_token_scale_dtype=None) -> Tensor[]"),
    "npu_moe_token_permute": ("npu_moe_token_permute(Tensor tokens, Tensor indices, int? num_out_tokens=None, "
                              "bool padded_mode=False) -> (Tensor, Tensor)"),
    "npu_moe_token_unpermute": ("npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, "
                                "Tensor? probs=None, bool padded_mode=False, int[]? restore_shape=None) -> Tensor"),
}
CALLS: list[str] = []  # op names, in the order the backend called them
NO_BACKWARD = {"npu_grouped_matmul"}  # absent from op-plugin's derivatives.yaml


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
        # BSND input: the op's interleave mode takes r1 and r2 as 1S1D only.
        if r1.dim() != 4 or r1.shape[0] != 1 or r1.shape[2] != 1 or r1.shape[1] != x.shape[1]:
            raise RuntimeError(f"npu_rotary_mul: interleave takes 1S1D r1/r2, got {tuple(r1.shape)}")
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    else:
        raise RuntimeError(f"npu_rotary_mul: rotary_mode {rotary_mode!r} is not half or interleave")
    return x * r1 + rotated * r2


def _swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    CALLS.append("npu_swiglu")
    # op-plugin's doc: contiguous, not empty, 1-8 dims, the split dimension even; fp32, fp16 or bf16.
    if not x.is_contiguous():
        raise RuntimeError("npu_swiglu: the input must be contiguous")
    if x.numel() == 0 or not 1 <= x.dim() <= 8 or x.shape[dim] % 2:
        raise RuntimeError(f"npu_swiglu: shape {tuple(x.shape)} with dim={dim} is not supported")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"npu_swiglu: dtype {x.dtype} is not supported")
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
        # The op takes BNSS, B1SS, 11SS or SS masks of bool or uint8 (1 = hidden), and no row hidden wholly.
        batch, heads = query.shape[0], head_num
        shapes = {(batch, heads, seq_q, seq_k), (batch, 1, seq_q, seq_k), (1, 1, seq_q, seq_k), (seq_q, seq_k)}
        if tuple(atten_mask.shape) not in shapes or atten_mask.dtype not in (torch.bool, torch.uint8):
            raise RuntimeError(f"npu_fusion_attention: atten_mask {tuple(atten_mask.shape)} {atten_mask.dtype} is not "
                               f"a BNSS/B1SS/11SS/SS bool or uint8 mask for Sq={seq_q}, Skv={seq_k}")
        if atten_mask.bool().all(-1).any():
            raise RuntimeError("npu_fusion_attention: atten_mask hides every key of a row")
        scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
    softmax_max = scores.amax(-1, keepdim=True)
    softmax_sum = (scores - softmax_max).exp().sum(-1, keepdim=True)
    out = (scores.softmax(-1) @ v).transpose(1, 2).to(query.dtype)
    return out, softmax_max, softmax_sum, torch.empty(0), seed, offset, 0


def _grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                    per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                    activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                    tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                    per_token_scale_dtype=None):
    """The unquantized single-tensor cases of docs/zh/custom_APIs/torch_npu/torch_npu-npu_grouped_matmul.md with a
    Tensor group_list: group_type 0 (m-axis groups: x [M, K], weight [g, K, N], y [M, N]) and 2 (k-axis groups: x
    [M, K] passed transposed, weight [K, N], y [g, M, N], as op-plugin's test_npu_grouped_matmul_6 calls it)."""
    CALLS.append("npu_grouped_matmul")
    if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3):
        raise RuntimeError("npu_grouped_matmul: one x, one weight and split_item 2 or 3 (one output tensor) expected")
    if group_list is None or group_list.dim() != 1 or group_list.dtype != torch.int64 or group_list_type != 0:
        raise RuntimeError("npu_grouped_matmul: a 1-D int64 group_list of cumulative sizes (group_list_type 0) "
                           "expected")
    if any(arg is not None for arg in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale)):
        raise RuntimeError("npu_grouped_matmul: only the unquantized op without bias is modelled")
    (a,), (b,) = x, weight
    if a.dim() != 2 or a.dtype != b.dtype:
        raise RuntimeError(f"npu_grouped_matmul: x {tuple(a.shape)} {a.dtype} against weight {b.dtype}")
    ends = group_list.tolist()
    if any(later < earlier for earlier, later in zip([0] + ends, ends)):
        raise RuntimeError("npu_grouped_matmul: group_list must be non-decreasing")
    starts = [0] + ends[:-1]
    if group_type == 0:
        if b.dim() != 3 or b.shape[0] != len(ends) or ends[-1] != a.shape[0] or b.shape[1] != a.shape[1]:
            raise RuntimeError(f"npu_grouped_matmul: m-axis groups need weight [g, K, N] with g = len(group_list) "
                               f"and group_list[-1] = x rows; got x {tuple(a.shape)}, weight {tuple(b.shape)}, "
                               f"group_list {ends}")
        if not a.is_contiguous():
            raise RuntimeError("npu_grouped_matmul: x is not supported transposed")
        if not (b.is_contiguous() or b.transpose(-1, -2).is_contiguous()):
            raise RuntimeError("npu_grouped_matmul: weight must be contiguous or transposed")
        return [torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))])]
    if group_type == 2:
        if b.dim() != 2 or ends[-1] != a.shape[1] or b.shape[0] != a.shape[1]:
            raise RuntimeError(f"npu_grouped_matmul: k-axis groups need x [M, K], weight [K, N] and group_list[-1] "
                               f"= K; got x {tuple(a.shape)}, weight {tuple(b.shape)}, group_list {ends}")
        if not a.t().is_contiguous() or not b.is_contiguous():
            raise RuntimeError("npu_grouped_matmul: k-axis groups take x transposed and weight contiguous")
        return [torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)])]
    raise RuntimeError(f"npu_grouped_matmul: group_type {group_type} is not modelled (0 or 2)")


def _moe_token_permute(tokens: torch.Tensor, indices: torch.Tensor, num_out_tokens: int | None = None,
                       padded_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """op-plugin's test_npu_moe_token_permute_and_unpermute.py: rows sorted stably by expert; sorted_indices (int32)
    is, per assignment, the row it went to (the inverse of the sort order)."""
    CALLS.append("npu_moe_token_permute")
    if padded_mode:
        raise RuntimeError("npu_moe_token_permute: padded_mode is not modelled")
    top_k = 1 if indices.dim() == 1 else indices.shape[1]
    order = torch.argsort(indices.flatten(), stable=True)
    wanted = num_out_tokens or 0
    kept = min(wanted, order.numel()) if wanted > 0 else wanted + order.numel()
    return tokens.index_select(0, order[:kept] // top_k), torch.argsort(order).to(torch.int32)


def _moe_token_unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor,
                         probs: torch.Tensor | None = None, padded_mode: bool = False,
                         restore_shape: list[int] | None = None) -> torch.Tensor:
    """Each token's rows (sorted_indices[token * k + slot]) summed, weighted by probs (tokens, k) when given."""
    CALLS.append("npu_moe_token_unpermute")
    if padded_mode:
        raise RuntimeError("npu_moe_token_unpermute: padded_mode is not modelled")
    if sorted_indices.dtype != torch.int32 or sorted_indices.numel() != permuted_tokens.shape[0]:
        raise RuntimeError("npu_moe_token_unpermute: sorted_indices must be npu_moe_token_permute's int32 mapping, "
                           "one per permuted row")
    top_k = 1 if probs is None else probs.shape[1]
    rows = permuted_tokens.index_select(0, sorted_indices.long()).view(-1, top_k, permuted_tokens.shape[-1])
    if probs is not None:
        rows = rows * probs.unsqueeze(-1)
    return rows.sum(dim=1).to(permuted_tokens.dtype)  # the op's output dtype is the permuted tokens' (its tests)


_IMPLEMENTATIONS = {"npu_rms_norm": _rms_norm, "npu_rotary_mul": _rotary_mul, "npu_swiglu": _swiglu,
                    "npu_fusion_attention": _fusion_attention, "npu_grouped_matmul": _grouped_matmul,
                    "npu_moe_token_permute": _moe_token_permute, "npu_moe_token_unpermute": _moe_token_unpermute}


def install() -> None:
    """Define the ops under torch.ops.npu (once per process)."""
    if hasattr(torch.ops.npu, "npu_rms_norm"):
        return
    library = torch.library.Library("npu", "DEF")
    for name, schema in SCHEMAS.items():
        library.define(schema)
        library.impl(name, _IMPLEMENTATIONS[name], "CPU" if name in NO_BACKWARD else "CompositeImplicitAutograd")
    _LIBRARIES.append(library)  # a Library unregisters its ops when collected


_LIBRARIES: list = []
