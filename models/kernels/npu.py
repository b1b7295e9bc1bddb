"""The Ascend NPU backend: torch_npu's fused kernels where the installed torch_npu has them.

    rms_norm          npu_rms_norm(x, gamma, epsilon) -> (y, rstd)
    rope              npu_rotary_mul(x, r1, r2, rotary_mode='interleave'): our rotation turns consecutive pairs;
                      'interleave' is that mode (torch_npu builds without rotary_mode have 'half' only)
    swiglu            npu_swiglu(x, dim=-1): swish of the first half times the second; x is the one product
                      against the stored gate/up weight (models/layers.py GateUpProjection; the experts' w13), its
                      (gate, up) pairs reordered into halves (one copy, as the concatenation of two products was)
    attention         npu_fusion_attention in BSND with the kv heads as they are (grouped-query read in place),
                      causal through sparse_mode=2 and its 2048 x 2048 upper-triangular mask, query/key width
                      above the value's (MLA) allowed; masked attention (packed documents, context-parallel
                      chunks) with sparse_mode=0 and a (batch, 1, Sq, Skv) bool mask, True = hidden
    grouped_mm        npu_grouped_matmul([x], [w], group_list=cumsum(counts), group_type=0, split_item=3) for the
                      routed experts, in an autograd wrapper (torch_npu registers no backward for it): grad_x is the
                      same m-axis product against w transposed, grad_w one k-axis product (group_type=2). The
                      group sizes stay on the device: no host sync forward or backward. Selective recompute keeps
                      its outputs, as it keeps torch._grouped_mm's on the other devices.
    (grouped_mm)      npu_moe_token_permute / npu_moe_token_unpermute sort the tokens by expert and bring them back
                      weighted (backward registered by torch_npu), switched with grouped_mm; with a capacity limit
                      (model.moe.capacity_factor > 0) the reference sort runs instead, since the op's num_out_tokens
                      cuts the sorted list's tail rather than each expert's lowest-weighted assignments.
Signatures as Ascend's op-plugin defines them (op_plugin/config/op_plugin_functions.yaml; op-plugin lists all these
ops for every torch_npu branch it builds, v2.1 to the newest, and states no release that introduced them). An op the
installed torch_npu lacks, or lacks an argument of, falls back to the reference op with one logged line at start-up
(once per process: models/kernels/__init__.py keeps one backend per settings). torch_npu registers its ops under
torch.ops.npu when it is imported (the device layer imports it).

Nothing here has run on an NPU: tests/kernels checks every call against the op-plugin schemas on CPU stand-ins
(fake_npu_ops.py). Unchecked until hardware runs it: the k-axis grouped_matmul's limits (group count, an empty
group's zero gradient), the dtype rules of npu_moe_token_unpermute's probs (passed in the rows' dtype), and speed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from launch.device import NPU
from models import ops
from models.kernels.cuda import gqa_attention, gqa_masked_attention
from models.kernels.reference import KERNELS, ReferenceKernels
from models.visibility import Visibility

log = logging.getLogger("supertrain")

# kernel -> (torch_npu op, arguments it must take)
FUSED_OPS = {
    "rms_norm": ("npu_rms_norm", ("self", "gamma", "epsilon")),
    "rope": ("npu_rotary_mul", ("self", "r1", "r2", "rotary_mode")),
    "swiglu": ("npu_swiglu", ("self", "dim")),
    "attention": ("npu_fusion_attention", ("query", "key", "value", "head_num", "input_layout", "atten_mask", "scale",
                                           "sparse_mode")),
    "grouped_mm": ("npu_grouped_matmul", ("x", "weight", "group_list", "split_item", "group_type", "group_list_type")),
    "token_permute": ("npu_moe_token_permute", ("tokens", "indices")),
    "token_unpermute": ("npu_moe_token_unpermute", ("permuted_tokens", "sorted_indices", "probs")),
}
# The device.fused switch that turns an entry off, where it is not the entry's own name: the token permutation
# belongs to the routed experts' kernels.
_SWITCH = {"token_permute": "grouped_mm", "token_unpermute": "grouped_mm"}
_CAUSAL_MASK_SIDE = 2048  # sparse_mode 2 takes this compressed mask whatever the sequence length


def torch_npu_op(name: str, arguments: Sequence[str], namespace: str = "npu") -> tuple[Optional[Any], str]:
    """(the op, "") when torch.ops.<namespace> (torch_npu's: npu) has it with every argument named; (None, why)."""
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None, f"torch_npu has no {name}"
    names = {argument.name for argument in packet.default._schema.arguments}
    missing = [argument for argument in arguments if argument not in names]
    if missing:
        return None, f"torch_npu's {name} takes no {', '.join(missing)} (a newer torch_npu has it)"
    return packet.default, ""


class NpuKernels(ReferenceKernels):
    name = NPU

    def __init__(self, enabled: Sequence[str] = KERNELS) -> None:
        self._ops: dict[str, Any] = {}
        switched_on = set(enabled)
        usable = set(enabled)
        for kernel, (op_name, arguments) in FUSED_OPS.items():
            if _SWITCH.get(kernel, kernel) not in switched_on:
                continue
            op, why = torch_npu_op(op_name, arguments)
            if op is None:
                log.warning("%s: the %s kernel runs the reference ops instead", why, kernel)
                usable.discard(kernel)
            else:
                self._ops[kernel] = op
        # Permute and unpermute share one mapping format (the op's sorted_indices): one without the other is no use.
        pair = ("token_permute", "token_unpermute")
        if (pair[0] in self._ops) != (pair[1] in self._ops):
            present, absent = pair if pair[0] in self._ops else pair[::-1]
            log.warning("torch_npu has %s without %s: the token permutation runs the reference ops instead",
                        FUSED_OPS[present][0], FUSED_OPS[absent][0])
            del self._ops[present]
        self._masks: dict[torch.device, torch.Tensor] = {}
        super().__init__(tuple(usable))
        # Without their fused kernels, rotation and attention still avoid what NPUs run poorly: complex arithmetic
        # (torch_npu's support is partial) and copies of the kv heads.
        if "rope" not in usable:
            self.apply_rope = ops.rope_real  # type: ignore[method-assign]
        if "attention" not in usable:
            self.causal_attention = self._sdpa_attention  # type: ignore[method-assign]
            self.masked_attention = gqa_masked_attention  # type: ignore[method-assign]
        # The token permutation has its own ops: bound by whether they are here, whatever became of the matmul.
        routing = NpuKernels if "token_permute" in self._ops else ReferenceKernels
        self.permute_tokens = routing.permute_tokens.__get__(self)  # type: ignore[method-assign]
        self.unpermute_tokens = routing.unpermute_tokens.__get__(self)  # type: ignore[method-assign]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._ops["rms_norm"](x, weight, eps)[0]

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The (gate, up) pairs one product gave, reordered into the halves the op takes (one copy; splitting a
        length-2 dimension would hand the kernel one-element rows), then one kernel. The op takes no empty
        tensor (an expert-parallel rank may receive no tokens): that one runs the reference op."""
        if gate_up.numel() == 0:
            return ops.swiglu(gate_up)
        halves = gate_up.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)  # [g0 u0 g1 u1 ...] -> [g.. | u..]
        return self._ops["swiglu"](halves, -1)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, heads, dim): cos and sin per pair, repeated over the pair's two elements, as (1, S, 1, D).
        The op documents r1 and r2 in [-1, 1]: YaRN's attention factor is 1 for DeepSeek-V3 (mscale = mscale_all_dim).
        Per-sequence tables (packed documents: positions differ between sequences) would be BS1D, which its
        interleave mode does not take: those rotate in plain ops."""
        if cos.dim() == 3:
            return ops.rope_real(x, cos, sin)
        r1 = cos.repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
        r2 = sin.repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
        return self._ops["rope"](x, r1, r2, "interleave")

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One npu_grouped_matmul per product, forward and backward, with the group sizes read on the device (no
        host sync): m-axis groups with cumulative counts as the group list, one output tensor (split_item=3)."""
        if x.shape[0] == 0:
            # An expert-parallel rank that received no tokens: a broadcast matmul of no rows gives the empty output
            # and zero weight gradients, without handing the kernel an empty operand.
            return torch.matmul(x, w).sum(dim=0)
        offsets = torch.cumsum(counts, dim=0).to(torch.int64)
        return _GroupedMatmul.apply(x.contiguous(), w, offsets, self._ops["grouped_mm"])

    def permute_tokens(self, tokens: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                       capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """npu_moe_token_permute (a stable sort by expert and the gather, backward registered by torch_npu) when no
        assignment is dropped. With a capacity the reference sort runs: the op's num_out_tokens keeps the first
        rows of the whole sorted list, not each expert's highest-weighted ones."""
        if capacity is not None:
            return ReferenceKernels.permute_tokens(self, tokens, chosen, weights, counts, capacity)
        rows, sorted_indices = self._ops["token_permute"](tokens, chosen)
        return rows, counts, sorted_indices

    def unpermute_tokens(self, rows: torch.Tensor, mapping: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """npu_moe_token_unpermute (gather and weighted sum over the k slots; backward for rows and weights registered
        by torch_npu) on the mapping npu_moe_token_permute returned (int32; a dropping sort's int64 order is the
        reference's). The weights go in the rows' dtype, as op-plugin's tests call it: under bf16 they are rounded
        to bf16 before the sum, where the reference sums in fp32."""
        if mapping.dtype != torch.int32:
            return ReferenceKernels.unpermute_tokens(self, rows, mapping, weights)
        return self._ops["token_unpermute"](rows, mapping, probs=weights.to(rows.dtype))

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            side = _CAUSAL_MASK_SIDE
            self._masks[device] = torch.ones(side, side, dtype=torch.bool, device=device).triu(1)
        return self._masks[device]

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        out = self._ops["attention"](q.contiguous(), k.contiguous(), v.contiguous(), q.shape[2], "BSND",
                                     atten_mask=self._causal_mask(q.device), scale=q.shape[-1] ** -0.5,
                                     sparse_mode=2)
        return out[0]

    def masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
        """npu_fusion_attention with an explicit mask (packed documents, context-parallel chunks): sparse_mode 0,
        atten_mask (batch, 1, Sq, Skv) True where a key is hidden, as the op documents; every query sees at least
        itself, so no row is fully masked (which the op does not take)."""
        out = self._ops["attention"](q.contiguous(), k.contiguous(), v.contiguous(), q.shape[2], "BSND",
                                     atten_mask=~visible.mask(), scale=q.shape[-1] ** -0.5, sparse_mode=0)
        return out[0]

    def _sdpa_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """SDPA with grouped kv heads read in place (torch_npu routes SDPA to its fused attention on A2/A3)."""
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return gqa_attention(q, k, v)

    def saved_ops(self) -> set:
        """The routed experts' grouped matmul, whose outputs selective recompute keeps as it keeps torch._grouped_mm's
        elsewhere (the fused attention ops are parallel/recompute.py's own entries)."""
        return {self._ops["grouped_mm"]} if "grouped_mm" in self._ops else set()

    def describe(self) -> str:
        fused = ", ".join(FUSED_OPS[kernel][0] for kernel in sorted(self._ops)) or "none available"
        return f"torch_npu's ops; fused: {fused}"



class _GroupedMatmul(torch.autograd.Function):
    """y[rows of group g] = x[rows of group g] @ w[g] through npu_grouped_matmul, which torch_npu gives no backward.
    Backward: grad_x the same m-axis grouped product against w transposed (the op reads a transposed weight in
    place), grad_w one k-axis grouped product (group_type=2: x's rows are the reduced axis, split by the same
    offsets, x passed transposed as op-plugin's own K-split test passes it), giving the (groups, k, n) stack."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,  # type: ignore[override]
                op: Any) -> torch.Tensor:
        ctx.op = op
        ctx.save_for_backward(x, w, offsets)
        return op([x], [w], group_list=offsets, split_item=3, group_type=0, group_list_type=0)[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, w, offsets = ctx.saved_tensors
        # The op takes no transposed or broadcast x; sum() and expand() downstream hand stride-0 gradients.
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.op([grad], [w.transpose(-1, -2)], group_list=offsets, split_item=3, group_type=0,
                            group_list_type=0)[0]
        if ctx.needs_input_grad[1]:
            grad_w = ctx.op([x.t()], [grad], group_list=offsets, split_item=3, group_type=2, group_list_type=0)[0]
        return grad_x, grad_w, None, None
