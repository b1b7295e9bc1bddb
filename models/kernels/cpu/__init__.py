"""The CPU backend: fused C++ kernels (native.py, csrc/) for RMSNorm, SwiGLU and block-causal attention, fp32
projections through oneDNN (linear.py), the Python block-causal attention where the C++ build is absent
(attention.py), and torch._grouped_mm for the experts. Each kernel still checks its operands per call (plain fp32
tensors, no autocast, not under torch.compile's tracing, no DTensor), since those vary within one CPU run; none
checks the device kind, which chose this backend once."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import torch
from torch import nn

from configs.errors import ConfigError
from launch.device import CPU
from models import ops
from models.kernels.cpu import linear as cpu_linear
from models.kernels.cpu import native as cpu_native
from models.kernels.cpu.attention import (QUERY_BLOCK, blocked_attention_applies, blocked_causal_attention,
                                          covers_sequence, saved_probabilities_per_query)
from models.kernels.cpu.linear import LINEAR_OP, onednn_linear, onednn_linear_applies, onednn_linear_group
from models.kernels.reference import (AttentionMemory, MatmulKernel, ReferenceKernels, grouped_mm_takes,
                                      native_grouped_mm)


def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """The C++ kernel rotates q and k and reads shared kv heads in place; the Python one needs them rotated and
    expanded."""
    if cpu_native.native_applies(q, k, v):
        return cpu_native.causal_attention(q, k, v, QUERY_BLOCK, rope)
    if rope is not None:
        q, k = ops.apply_rope(q, *rope), ops.apply_rope(k, *rope)
    return blocked_causal_attention(q, *ops.expand_kv_heads(q, k, v))


@functools.cache
def _outside_graph() -> Any:
    """`_blocked_attention` as a graph break under torch.compile. Made on first use under compilation: wrapping it
    when this module loads would import TorchDynamo (about 2 s) into every process that merely names the backend,
    the planner's included."""
    return torch.compiler.disable(_blocked_attention)


class CpuKernels(ReferenceKernels):
    name = CPU

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 through oneDNN's matmul, faster here than torch.mm (linear.py)."""
        if onednn_linear_applies(x, weight, bias):
            return onednn_linear(x, weight)
        return ops.linear(x, weight, bias)

    def project(self, x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
        """On the oneDNN route (plain fp32 weights, no bias) one product against the stacked weights, whose outputs
        are column blocks of one tensor. Otherwise each layer is called as a module, so that tensor parallelism's
        hooks on it (whose weights are DTensors, never on that route) still run."""
        if all(onednn_linear_applies(x, layer.weight, layer.bias) for layer in layers):
            return onednn_linear_group(x, [layer.weight for layer in layers])
        return [layer(x) for layer in layers]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if cpu_native.native_applies(x, weight):
            return cpu_native.rms_norm(x, weight, eps)
        return ops.rms_norm(x, weight, eps)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """One fused pass each way, which also keeps one tensor fewer for backward; compiled graphs keep it too."""
        if cpu_native.native_applies(gate_up, traced=True):
            return cpu_native.swiglu(gate_up)
        return ops.swiglu(gate_up)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """fp32 from 512 to 1024 positions runs the block-causal kernel, in C++ or else in Python (attention.py),
        faster there than ATen's CPU flash kernel; under torch.compile it still runs, eagerly, between two compiled
        graphs. Everything else goes to SDPA."""
        if blocked_attention_applies(q, k, v):
            if torch.compiler.is_compiling():
                return _outside_graph()(q, k, v, rope)
            return _blocked_attention(q, k, v, rope)
        return super().causal_attention(q, k, v, rope)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """torch._grouped_mm runs eagerly on CPU in fp32, bf16 and fp16 (checked on torch 2.13, forward and
        backward)."""
        if grouped_mm_takes(x, w, (torch.float32, torch.bfloat16, torch.float16)):
            return native_grouped_mm(x, w, counts)
        return ops.grouped_mm(x, w, counts)

    def saved_ops(self) -> set:
        return {LINEAR_OP}  # fp32 projections through oneDNN

    def attention_memory(self, seq_len: int, dtype: torch.dtype) -> Optional[AttentionMemory]:
        if "attention" not in self.enabled or dtype != torch.float32 or not covers_sequence(seq_len):
            return None
        return AttentionMemory(probabilities=saved_probabilities_per_query(seq_len), logsumexp=False)

    def matmul_kernels(self, dtype: torch.dtype) -> list[MatmulKernel]:
        return list(cpu_linear.matmul_kernels(dtype).values())

    @property
    def native(self) -> bool:
        """Whether fp32 work goes to the C++ kernels on this machine (before they are built)."""
        return cpu_native.NATIVE_EXPECTED

    def prepare(self) -> None:
        """Check the routes the environment asks for and build (once per machine) or load the C++ kernels, so that a
        bad route or a failed build stops the run at start-up; under `auto` a failed build logs one warning and
        ATen's ops run instead."""
        for route_error in (cpu_linear.LINEAR_ROUTE_ERROR, cpu_native.ROUTE_ERROR):
            if route_error is not None:
                raise ConfigError(route_error)
        try:
            cpu_native.load()
        except cpu_native.NativeKernelError as error:
            raise ConfigError(str(error)) from None

    def describe(self) -> str:
        return f"fp32 ops: {cpu_native.description()}"
