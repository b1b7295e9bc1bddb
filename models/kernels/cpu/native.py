"""Fused fp32 CPU kernels (models/kernels/cpu/csrc/cpu_kernels.cpp): RMSNorm, SwiGLU, block-causal attention, and the linear
weight gradient that models/kernels/cpu/linear.py takes from here.

PyTorch runs RMSNorm as five passes over memory and SwiGLU as two, forward and again backward; the C++ kernels make
each one pass. Attention moves the block-causal scheme of models/kernels/cpu/attention.py into one call that works head by
head, so that each head's scores stay in cache between its products, and multiplies with its own register-tiled
matmul, which has no per-call set-up: at these small shapes faster than oneDNN, itself 2-2.5x faster than ATen's BLAS
on AMD CPUs, where PyTorch's mm and bmm go to MKL at AVX2 speed (measured on the benchmark's shapes,
docs/design_decisions.md). In fp32 the results match ATen's to rounding.

The extension is built with torch.utils.cpp_extension the first time a process on a machine needs it (about 25 s on
2 cores; then cached under ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR), for the vector width ATen itself
chose on this CPU (AVX2 or AVX-512). It is used where that build exists: x86-64 hosts with AVX2 or AVX-512. Where
oneDNN's matmul refuses the CPU (it needs AVX-512 or AVX-NE-CONVERT), the weight gradient multiplies with ATen's
mm. `SUPERTRAIN_CPU_KERNELS` chooses: `auto` (default: native where it builds,
else ATen with one warning), `native` (stop at start-up if it cannot be built), `aten` (never build).

Taken only for plain fp32 CPU tensors outside autocast and outside torch.compile's tracing (Inductor fuses these
ops itself; the linear weight gradient alone is kept whole inside compiled graphs); DTensors keep ATen's ops, which
know how to shard.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

ROUTE_VARIABLE = "SUPERTRAIN_CPU_KERNELS"
_ROUTES = ("auto", "native", "aten")
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
# One build per vector width, so that a cache folder shared by different CPUs never hands one the other's build.
EXTENSION_NAME = f"supertrain_cpu_kernels_{_CAPABILITY.lower()}"
# Compiler flags per ATen CPU capability: the kernels use ATen's vector type at the width ATen dispatches to here.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

log = logging.getLogger("supertrain")


class NativeKernelError(RuntimeError):
    """SUPERTRAIN_CPU_KERNELS=native, and the kernels cannot be built or loaded here."""


def native_expected_for(route: str, machine: str, capability: str) -> bool:
    """Whether fp32 CPU work goes to the native kernels, given the route asked for, the machine and ATen's CPU
    capability; raises ValueError (one line) for a bad route or `native` where no build exists."""
    if route not in _ROUTES:
        raise ValueError(f"{ROUTE_VARIABLE}={route!r} is not a route: use one of {', '.join(_ROUTES)}")
    buildable = machine in ("x86_64", "amd64") and capability in _CAPABILITY_FLAGS
    if route == "native" and not buildable:
        raise ValueError(f"{ROUTE_VARIABLE}=native, but there is no build of the kernels for this CPU "
                         f"({machine}, {capability}): unset it or use aten")
    return route != "aten" and buildable


# A bad value is kept as a message rather than raised here, so that importing the model never fails;
# launch.device.resolve_device stops the run with it at start-up.
try:
    NATIVE_EXPECTED = native_expected_for(os.environ.get(ROUTE_VARIABLE, "auto"), platform.machine().lower(),
                                          _CAPABILITY)
    ROUTE_ERROR: Optional[str] = None
except ValueError as error:
    NATIVE_EXPECTED, ROUTE_ERROR = False, str(error)


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Build (once per machine) and load the kernels; True when they are registered as torch.ops.supertrain_cpu.

    Under `auto` a failed build logs one warning and the run continues on ATen's ops; under `native` it raises.
    """
    Loaded.kernels = _build_and_load()
    if Loaded.kernels:
        _register_fake_weight_gradient()
        _register_fake_swiglu()
    Loaded.onednn_matmul = Loaded.kernels and bool(torch.ops.supertrain_cpu.onednn_matmul_available())
    return Loaded.kernels


class Loaded:
    """What `load` found in this process, as plain attributes: code that torch.compile traces reads them here,
    since it must neither build nor call through `load`'s cache."""

    kernels = False
    onednn_matmul = False


def kernels_loaded() -> bool:
    """Whether the kernels are registered: `load()`, or under torch.compile's tracing what it found before (tracing
    must not build, and Dynamo would trace through `load`'s cache into the build)."""
    return Loaded.kernels if torch.compiler.is_compiling() else load()


@functools.lru_cache(maxsize=None)  # once per process: a second registration is an error
def _register_fake_weight_gradient() -> None:
    """The weight gradient's output for tracing, so that torch.compile keeps the op in its graphs as an external
    kernel (without it, compiled blocks multiplied over transposed views that oneDNN's linear first copied: ~50 ms of
    copies in the benchmark's step)."""

    @torch.library.register_fake("supertrain_cpu::linear_weight_grad")
    def _(grad_out: torch.Tensor, x: torch.Tensor, onednn: bool) -> torch.Tensor:
        return grad_out.new_empty(grad_out.shape[-1], x.shape[-1])


@functools.lru_cache(maxsize=None)
def _register_fake_swiglu() -> None:
    """SwiGLU's outputs for tracing, so compiled blocks keep the kernel (an external call in Inductor's graph): over
    (gate, up) pairs, Inductor's own loops read and write with a stride of two, which cost the benchmark's compiled
    step ~15% in its feed-forward layers (the C++ kernel de-interleaves in registers)."""

    @torch.library.register_fake("supertrain_cpu::swiglu")
    def _(gate_up: torch.Tensor) -> torch.Tensor:
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake("supertrain_cpu::swiglu_backward")
    def _(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(gate_up)


def quiet_cpp_extension() -> Any:
    """torch.utils.cpp_extension, imported without its warning that no CUDA runtime is found: a CUDA build of torch
    on a host without a GPU prints it, true and irrelevant to a CPU extension, and it would break one-line errors."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def _build_and_load() -> bool:
    if not NATIVE_EXPECTED:
        return False
    cpp_extension = quiet_cpp_extension()

    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *_CAPABILITY_FLAGS[_CAPABILITY]],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler or ninja, missing headers, a failed link: all end the same way
        reason = _first_error_line(str(error))
        if os.environ.get(ROUTE_VARIABLE) == "native":
            raise NativeKernelError(f"{ROUTE_VARIABLE}=native, but building {SOURCE.name} failed: {reason}") from None
        log.warning("fused CPU kernels unavailable, using ATen's ops (set %s=aten to skip the build): %s",
                    ROUTE_VARIABLE, reason)
        return False
    return True


def _first_error_line(message: str) -> str:
    """The compiler's first error out of a build log (torch puts the whole ninja output in the exception)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line or ": fatal error:" in line]
    return (errors or lines or [message])[0][:300]


def onednn_matmul() -> bool:
    """Whether the weight gradient multiplies through oneDNN (it refuses CPUs without AVX-512 or AVX-NE-CONVERT;
    tried once on a small product), else through ATen's mm."""
    return load() and Loaded.onednn_matmul


def description() -> str:
    """What fp32 CPU work runs on, for the start-up log line; never starts a build itself."""
    if NATIVE_EXPECTED and load.cache_info().currsize == 0:
        return "C++ kernels not loaded yet"
    if not load():
        return "ATen ops"
    return f"fused {_CAPABILITY} kernels (weight gradients on {'oneDNN' if onednn_matmul() else 'ATen mm'})"


def matmul_ops() -> tuple[Any, ...]:
    """The ops whose work is mostly matmuls, where the kernels are loaded (for the benchmark's replay): the weight
    gradient, and the attention forward and backward (whose matmuls run inside them)."""
    if not load():
        return ()
    ops = torch.ops.supertrain_cpu
    return (ops.linear_weight_grad.default, ops.causal_attention.default, ops.causal_attention_backward.default)


def native_applies(*tensors: torch.Tensor, traced: bool = False) -> bool:
    """Whether these operands take the native kernels: plain fp32 CPU tensors, no autocast, not being traced by
    torch.compile (unless `traced`: a kernel with a fake registered, which compiled graphs keep, and then only when
    the kernels were loaded before tracing), and the kernels built. Reads only types, devices and dtypes, so it
    costs nothing per call."""
    if not NATIVE_EXPECTED or (torch.compiler.is_compiling() and not traced):
        return False
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    return not torch.is_autocast_enabled("cpu") and kernels_loaded()


# ---- autograd around the ops ---------------------------------------------------------------------------------


def _ops() -> Any:
    """torch.ops.supertrain_cpu, built and loaded; callers check `native_applies` first."""
    if not kernels_loaded():
        raise NativeKernelError(f"the fused CPU kernels are not available here ({ROUTE_VARIABLE}, CPU or build)")
    return torch.ops.supertrain_cpu


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        y, rstd = _ops().rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _ops().rms_norm_backward(grad, x, weight, rstd)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, one pass each way; keeps x and 1/rms for backward."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate_up)
        return _ops().swiglu(gate_up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ops().swiglu_backward(grad, *ctx.saved_tensors)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the (gate, up) pairs along the last dimension, one pass each way; keeps only its input
    for backward (ATen also keeps silu(gate)) and returns the input's gradient as one tensor, paired alike."""
    return _SwiGLU.apply(gate_up)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,  # type: ignore[override]
                cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        out, (q_heads, k_heads, v_heads, probabilities) = _ops().causal_attention(q, k, v, cos, sin, block)
        ctx.save_for_backward(q_heads, k_heads, v_heads, out, probabilities)
        ctx.kv_heads, ctx.qk_dim, ctx.block, ctx.rope = k.shape[2], q.shape[3], block, (cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        grads = _ops().causal_attention_backward(grad, list(ctx.saved_tensors), *ctx.rope, ctx.kv_heads, ctx.qk_dim,
                                                 ctx.block)
        return (*grads, None, None, None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                     rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Block-causal softmax(q k^T / sqrt(qk_dim)) v on (batch, seq, heads, dim) tensors, queries in blocks of `block`.

    k and v may have fewer heads than q (grouped-query attention: q head h reads kv head h // (heads / kv_heads)),
    and v may be narrower than q and k. With `rope` = (cos, sin) tables (seq, qk_dim / 2), q and k are rotated first
    (models.ops.apply_rope's convention) inside the copies the kernel makes anyway. Keeps per head the scaled q and
    the probabilities against the keys each query block sees (as the Python kernel does), k and v per kv head (a
    query head reads its kv head in place; the Python kernel keeps them expanded), q, k and v laid out as
    backward's products read them, and the output it returns, which the output projection keeps too. The gradients
    of q, k and v come back side by side in one tensor (see models.kernels.cpu.linear.onednn_linear_group, which takes them
    so).
    """
    cos, sin = rope if rope is not None else (None, None)
    return _CausalAttention.apply(q, k, v, block, cos, sin)
