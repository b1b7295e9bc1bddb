"""The one place that knows about accelerator kinds: cpu (gloo), cuda (nccl) and npu (hccl, through torch_npu).

Everything else asks a `Device` for the torch device, the process-group backend, memory figures, the autocast dtype
and the peak FLOPS that MFU is measured against. The literal accelerator names live only in this file (a test checks
that), so adding a device means adding one entry here.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import resource
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Optional

import torch

from configs.errors import ConfigError

log = logging.getLogger("supertrain")

CPU, CUDA, NPU = "cpu", "cuda", "npu"
DEVICE_KINDS = ("auto", CPU, CUDA, NPU)


class DeviceError(ConfigError):
    """The requested device cannot be used here. One line naming the device and the fix."""


@dataclass(frozen=True)
class PeakFlops:
    """Dense BF16 peak of one device (the unit a rank drives) and where the figure comes from; `flops` is None where
    no figure is known (MFU is then not reported, and the start-up line says how to give one)."""

    flops: Optional[float]
    source: str


# Ascend SoCs by the name torch_npu reports (torch.npu.get_device_name(): CANN's aclrtGetSocName(), one per die; on
# A3 each 910C package shows as two devices). The figure is the cube units' dense BF16 rate per die, the matmul
# engines training FLOPs run on (cores x 16^3 MACs x 2 x clock), which is torchtitan-npu's convention, so MFU figures
# compare; the vector units add a few percent to the "total" figures vendors quote. Sources: torchtitan-npu
# torchtitan_npu/patches/tools/metrics.py (per-SoC values, with the totals in its comments); 910C package figure:
# arXiv 2506.12708. No per-bin figure is published for the other 910C SoCs, so they have none here.
_NO_910C_BIN_FIGURE = "no published peak for this 910C bin (only Ascend910_9392's is)"
ASCEND_PEAKS: dict[str, PeakFlops] = {
    "Ascend910B1": PeakFlops(373.88e12, "Ascend 910B1 cube units, per die (total 400 TFLOPS): torchtitan-npu"),
    "Ascend910B2": PeakFlops(353.8944e12, "Ascend 910B2 cube units, 24 cores at 1.8 GHz (total 376 TFLOPS): "
                                          "torchtitan-npu"),
    "Ascend910B2C": PeakFlops(353.8944e12, "Ascend 910B2C as 910B2 (torchtitan-npu matches it as B2)"),
    "Ascend910B3": PeakFlops(294.912e12, "Ascend 910B3 cube units, 20 cores at 1.8 GHz (total 313 TFLOPS): "
                                         "torchtitan-npu"),
    "Ascend910B4": PeakFlops(245.76e12, "Ascend 910B4 cube units, 20 cores at 1.5 GHz (total 280 TFLOPS): "
                                        "torchtitan-npu"),
    "Ascend910B4-1": PeakFlops(245.76e12, "Ascend 910B4-1 as 910B4 (torchtitan-npu matches it as B4)"),
    "Ascend910_9392": PeakFlops(353.8944e12, "Ascend 910C die, cube units (total 376 TFLOPS, 752 per package, "
                                             "arXiv 2506.12708): torchtitan-npu"),
    **{f"Ascend910_93{bin_}": PeakFlops(None, _NO_910C_BIN_FIGURE) for bin_ in ("91", "81", "82", "72", "62", "63")},
}

# Other accelerators: matched as substrings of the name the runtime reports, most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, PeakFlops], ...] = (
    ("B200", PeakFlops(2.25e15, "NVIDIA HGX B200 datasheet, dense BF16")),
    ("H800", PeakFlops(989e12, "H800 SXM: H100 compute, DeepSeek-V3 report s3.2.2")),
    ("H100 PCIe", PeakFlops(756e12, "NVIDIA H100 PCIe datasheet, dense BF16")),
    ("H100 NVL", PeakFlops(835e12, "NVIDIA H100 NVL datasheet, dense BF16")),
    ("H100", PeakFlops(989e12, "NVIDIA H100 SXM datasheet, dense BF16")),
    ("H200", PeakFlops(989e12, "NVIDIA H200 datasheet, dense BF16")),
    ("A100", PeakFlops(312e12, "NVIDIA A100 datasheet, dense BF16")),
)


def lookup_peak_flops(device_name: str) -> Optional[PeakFlops]:
    """The peak for the name a runtime reports: an Ascend SoC by its exact name, other devices by substring. None for
    a device this table does not know."""
    if device_name in ASCEND_PEAKS:
        return ASCEND_PEAKS[device_name]
    for key, peak in PEAK_BF16_FLOPS:
        if key in device_name:
            return peak
    return None


def ascend_generation(soc: str) -> str:
    """"A2" (Atlas A2, 910B1-B4), "A3" (Atlas A3, the 910C dies) or "910A" (the first 910 family, whose SoC names
    include a bare "Ascend910B"), from the SoC name torch_npu reports; "unknown" otherwise (a newer chip)."""
    if soc.startswith("Ascend910_93"):
        return "A3"
    if soc.startswith("Ascend910B") and soc != "Ascend910B":
        return "A2"
    if soc in ("Ascend910A", "Ascend910ProA", "Ascend910PremiumA", "Ascend910ProB", "Ascend910B"):
        return "910A"
    return "unknown"


MatmulKernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def measure_matmul_flops(kernels: Iterable[MatmulKernel] = (torch.mm,), dtype: torch.dtype = torch.float32,
                         size: int = 1024, repeats: int = 10) -> float:
    """Best observed rate of a square matmul on this CPU with the current thread count (FLOP/s), over `kernels`
    (each (a, b) -> a product with the FLOPs of a @ b; the model's own: the kernel backend's matmul_kernels)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for kernel in kernels:
        for _ in range(2):  # warm-up: the first calls pay for allocation and kernel selection (oneDNN's JIT)
            kernel(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(a, b)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Device:
    """What one rank needs to know about its accelerator kind."""

    def __init__(self, kind: str, module: Optional[ModuleType] = None) -> None:
        self.kind = kind
        self.module = module  # torch.cuda / torch.npu; None on CPU
        self.huge_pages = False  # whether prepare_process got large CPU blocks advised onto huge pages

    # ---- identity -------------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """torch.distributed backend for this device kind."""
        return {CPU: "gloo", CUDA: "nccl", NPU: "hccl"}[self.kind]

    @property
    def visible_devices_env(self) -> Optional[str]:
        """Environment variable that restricts which devices a process sees."""
        return {CPU: None, CUDA: "CUDA_VISIBLE_DEVICES", NPU: "ASCEND_RT_VISIBLE_DEVICES"}[self.kind]

    def name(self) -> str:
        if self.module is None:
            return "cpu"
        return str(self.module.get_device_name())

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device(CPU) if self.module is None else torch.device(self.kind, local_rank)

    def device_count(self) -> int:
        return 1 if self.module is None else int(self.module.device_count())

    # ---- runtime --------------------------------------------------------------------------------------------

    def set_device(self, local_rank: int) -> None:
        if self.module is not None:
            self.module.set_device(local_rank)

    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize()

    def max_memory_bytes(self) -> int:
        """Peak memory of this rank: allocator peak on an accelerator, peak resident set size on CPU."""
        if self.module is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return int(self.module.max_memory_allocated())

    def rng_state(self) -> Optional[torch.Tensor]:
        return None if self.module is None else self.module.get_rng_state()

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if self.module is not None and state is not None:
            self.module.set_rng_state(state)

    # ---- precision and speed --------------------------------------------------------------------------------

    def supports_bf16(self) -> bool:
        if self.kind == CPU:
            # oneDNN runs bf16 natively only on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated and slow.
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        # torch.cuda's, and torch_npu's (False on 910A, True from 910B1 on: its SoC enum, NpuVariables.cpp).
        return bool(self.module.is_bf16_supported())

    def supports_compile(self) -> bool:
        """Whether parallel.compile=true may run here: torch_npu's graph backends (torchair, its Inductor route) have
        not run under this harness, so NPU runs are refused rather than compiled by an untested path."""
        return self.kind != NPU

    def autocast(self, dtype: Optional[torch.dtype]) -> Any:
        """Autocast context for the forward pass; a no-op context when dtype is None (full fp32)."""
        return torch.autocast(device_type=self.kind, dtype=dtype, enabled=dtype is not None)

    def peak_flops(self, dtype: torch.dtype = torch.bfloat16, cpu_matmuls: Iterable[MatmulKernel] = (torch.mm,),
                   override_tflops: Optional[float] = None) -> PeakFlops:
        """Peak that MFU divides by: `override_tflops` (device.peak_tflops) when given; on an accelerator the dense
        BF16 figure of the tables above; on CPU the best measured rate of `cpu_matmuls` in the training dtype, since
        no datasheet number is meaningful for an arbitrary CPU and thread count."""
        if override_tflops is not None:
            return PeakFlops(override_tflops * 1e12, "device.peak_tflops")
        if self.module is None:
            rate = measure_matmul_flops(cpu_matmuls, dtype)
            return PeakFlops(rate, f"measured {dtype} 1024^3 matmul on this CPU (best library), "
                                   f"{torch.get_num_threads()} threads")
        name = self.name()
        peak = lookup_peak_flops(name)
        if peak is None:
            return PeakFlops(None, f"no peak known for '{name}': give it with device.peak_tflops=<dense BF16 TFLOPS>")
        if peak.flops is None:
            return PeakFlops(None, f"{peak.source}: give '{name}' one with device.peak_tflops=<dense BF16 TFLOPS>")
        return peak

    # ---- process set-up -------------------------------------------------------------------------------------

    def prepare_process(self) -> None:
        """Process-wide set-up before any tensor exists. On CPU: keep freed heap memory for reuse and put large
        blocks on huge pages, as an accelerator's caching allocator would."""
        if self.module is not None:
            return
        keep_freed_heap()
        self.huge_pages = advise_huge_pages()

    def __repr__(self) -> str:
        pages = ", blocks of 2 MB and more on huge pages" if self.huge_pages else ""
        return f"Device({self.kind}, backend={self.backend}{pages})"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_heap() -> bool:
    """Tell glibc's malloc to keep freed memory up to 32 MB blocks in the heap, as accelerator caching allocators
    do, instead of returning it to the OS.

    By default glibc serves blocks above a moving threshold with fresh mmap pages and trims the heap's free top
    once it exceeds twice that threshold, so a CPU training step that frees and reallocates its activations faults
    many of their pages in again, how many depending on the heap's layout: on the trunk benchmark's model 14k-106k
    minor page faults and 0.05-0.16 s of system time in a 1.1 s step, about none with these settings (the step
    2-3% shorter). Blocks over 32 MB (glibc's cap for the threshold) still map and unmap. The process keeps its
    peak heap, as a caching allocator does. Left alone where the user tuned malloc through its environment, and
    where the C library is not glibc. Returns whether it applied.
    """
    if any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))


# PyTorch's CPU allocator advises MADV_HUGEPAGE on blocks of at least 2 MB when this is set (c10/core/impl/alloc_cpu).
_THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_HUGE_PAGE_BYTES = 2 * 1024 * 1024


def advise_huge_pages() -> bool:
    """Have PyTorch's CPU allocator put blocks of 2 MB and more on transparent huge pages (2 MB) where the kernel
    offers them on request (its THP mode `madvise` or `always`).

    A CPU training step streams activations and gradients of 8-50 MB each; on 4 KB pages each such operand spans
    thousands of TLB entries. In the trunk benchmark's step (two processes, one with this, stepping in turn, 30-40
    rounds) it took 0.979 and 0.984 of the time at head width 128 and 0.996 at 64, on a host whose THP mode is
    `madvise`; the square matmuls that the step is measured against ran as fast either way.
    PyTorch reads its switch once, at the process's first CPU allocation, so this has effect only when called before
    any tensor exists (`python -m train` calls it before it builds anything); the user's own THP_MEM_ALLOC_ENABLE
    is left as it is. Returns whether a 2 MB block allocated now is advised, read back from the kernel's view of
    its mapping.
    """
    if _THP_VARIABLE not in os.environ and _kernel_offers_huge_pages():
        os.environ[_THP_VARIABLE] = "1"
    return _advised_onto_huge_pages(torch.empty(_HUGE_PAGE_BYTES, dtype=torch.uint8))


def _kernel_offers_huge_pages() -> bool:
    try:
        with open(_THP_MODE_FILE, encoding="ascii") as mode_file:
            mode = mode_file.read()  # e.g. "always [madvise] never": the bracketed one is in force
    except OSError:  # not Linux, or a kernel built without THP
        return False
    return "[always]" in mode or "[madvise]" in mode


def _advised_onto_huge_pages(block: torch.Tensor) -> bool:
    """Whether the mapping that holds `block` carries MADV_HUGEPAGE ("hg" among its VmFlags in /proc/self/smaps)."""
    address, mapping = block.data_ptr(), None
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):  # "start-end perms ..." opens a mapping's entry
                    start, end = (int(bound, 16) for bound in head.split("-"))
                    mapping = start <= address < end
                elif mapping and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except (OSError, ValueError):
        return False
    return False


def _import_torch_npu() -> ModuleType:
    """torch_npu registers torch.npu when imported; import it only when the NPU is asked for."""
    try:
        importlib.import_module("torch_npu")
    except Exception as error:  # ImportError, or OSError when CANN's libraries are missing
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DeviceError(
            f"device=npu needs torch_npu and Ascend CANN: install CANN, then pip install 'supertrain[npu]' "
            f"(import torch_npu failed: {reason})"
        ) from None
    return torch.npu  # type: ignore[attr-defined]


def _npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def resolve_device(kind: str = "auto") -> Device:
    """Device for `kind`; `auto` prefers npu, then cuda, then cpu."""
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"device.type={kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        if _npu_installed():
            try:
                if _import_torch_npu().is_available():
                    return Device(NPU, torch.npu)  # type: ignore[attr-defined]
            except DeviceError as error:
                log.warning("device=auto: torch_npu is installed but unusable, so not taken (%s)", error)
        if torch.cuda.is_available():
            return Device(CUDA, torch.cuda)
        return Device(CPU)
    if kind == CPU:
        return Device(CPU)
    if kind == CUDA:
        if not torch.cuda.is_available():
            raise DeviceError(
                "device=cuda but torch sees no CUDA GPU: install a CUDA build of torch on a GPU machine, "
                "or use device=cpu"
            )
        return Device(CUDA, torch.cuda)
    module = _import_torch_npu()
    if not module.is_available():
        raise DeviceError("device=npu but torch_npu sees no NPU: check the driver, CANN and ASCEND_RT_VISIBLE_DEVICES")
    return Device(NPU, module)
