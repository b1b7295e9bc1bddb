"""The Ascend NPU backend: torch_npu's fused kernels where the installed torch_npu has them.

    rms_norm          npu_rms_norm(x, gamma, epsilon) -> (y, rstd)
    rope              npu_rotary_mul(x, r1, r2, rotary_mode='interleave'): our rotation turns consecutive pairs;
                      'interleave' is that mode (torch_npu builds without rotary_mode have 'half' only)
    swiglu            npu_swiglu(cat(gate, up), dim=-1): swish of the first half times the second
    attention         npu_fusion_attention in BSND with the kv heads as they are (grouped-query read in place),
                      causal through sparse_mode=2 and its 2048 x 2048 upper-triangular mask, query/key width
                      above the value's (MLA) allowed
Signatures as Ascend's op-plugin defines them (op_plugin/config/op_plugin_functions.yaml). An op the installed
torch_npu lacks, or lacks an argument of, falls back to the reference op with one logged line at start-up. torch_npu
registers its ops under torch.ops.npu when it is imported (the device layer imports it), and their backward kernels.

Not plugged in yet: npu_grouped_matmul for the routed experts (they loop over experts, with a host sync per
projection) and npu_moe_token_permute / unpermute. Nothing here has run on an NPU: tests/kernels checks every call
against the op-plugin schemas on CPU stand-ins.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from launch.device import NPU
from models import ops
from models.kernels.cuda import gqa_attention
from models.kernels.reference import KERNELS, ReferenceKernels

log = logging.getLogger("supertrain")

# kernel -> (torch_npu op, arguments it must take)
FUSED_OPS = {
    "rms_norm": ("npu_rms_norm", ("self", "gamma", "epsilon")),
    "rope": ("npu_rotary_mul", ("self", "r1", "r2", "rotary_mode")),
    "swiglu": ("npu_swiglu", ("self", "dim")),
    "attention": ("npu_fusion_attention", ("query", "key", "value", "head_num", "input_layout", "atten_mask", "scale",
                                           "sparse_mode")),
}
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
        usable = set(enabled)
        for kernel, (op_name, arguments) in FUSED_OPS.items():
            if kernel not in usable:
                continue
            op, why = torch_npu_op(op_name, arguments)
            if op is None:
                log.warning("%s: the %s kernel runs the reference ops instead", why, kernel)
                usable.discard(kernel)
            else:
                self._ops[kernel] = op
        self._masks: dict[torch.device, torch.Tensor] = {}
        super().__init__(tuple(usable))
        # Without their fused kernels, rotation and attention still avoid what NPUs run poorly: complex arithmetic
        # (torch_npu's support is partial) and copies of the kv heads.
        if "rope" not in usable:
            self.apply_rope = ops.rope_real  # type: ignore[method-assign]
        if "attention" not in usable:
            self.causal_attention = self._sdpa_attention  # type: ignore[method-assign]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._ops["rms_norm"](x, weight, eps)[0]

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """One kernel over the two projections side by side (it takes them as one tensor, halves along dim)."""
        return self._ops["swiglu"](torch.cat((gate, up), dim=-1), -1)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, heads, dim): cos and sin per pair, repeated over the pair's two elements, as (1, S, 1, D).
        The op documents r1 and r2 in [-1, 1]: YaRN's attention factor is 1 for DeepSeek-V3 (mscale = mscale_all_dim)."""
        r1 = cos.repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
        r2 = sin.repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
        return self._ops["rope"](x, r1, r2, "interleave")

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

    def _sdpa_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """SDPA with grouped kv heads read in place (torch_npu routes SDPA to its fused attention on A2/A3)."""
        if rope is not None:
            q, k = self.apply_rope(q, *rope), self.apply_rope(k, *rope)
        return gqa_attention(q, k, v)

    def describe(self) -> str:
        fused = ", ".join(FUSED_OPS[kernel][0] for kernel in sorted(self._ops)) or "none available"
        return f"torch_npu's ops; fused: {fused}"

