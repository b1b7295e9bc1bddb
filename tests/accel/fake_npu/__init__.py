"""A fake Ascend NPU for CPU-only CI: `install()` makes "npu" a real PyTorch device backed by host memory.

What `install(num_devices)` sets up, once per process (renaming PrivateUse1 cannot be undone, so tests that use it
run in a fresh interpreter):

* the C++ extension beside this file (fake_npu.cpp; built with torch.utils.cpp_extension on first use, cached in
  TORCH_EXTENSIONS_DIR or torch's default build root): allocator, device guard, hooks, native kernels for
  allocation/views/copies, and a fallback that runs every other op with ATen's CPU kernel on the same memory;
* PrivateUse1 renamed "npu", with Tensor.npu(), Module.npu(), is_npu ... generated;
* `torch.npu`: the device module torch_npu would provide, as far as PyTorch, DDP, FSDP2, DTensor and pipelining
  ask of one (streams and events exist and do nothing: the device is synchronous);
* a process-group backend "hccl" for device npu only (fake_npu.hccl): a strict checker that runs each collective
  with gloo and raises, as HCCL does, when a tensor is not on an npu.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_HERE = Path(__file__).resolve().parent
SOURCES = [_HERE / "fake_npu.cpp"]
EXTENSION_NAME = "supertrain_fake_npu"
DEFAULT_SOC = "Ascend910B2"

_lock = threading.Lock()
_ext: Optional[ModuleType] = None
_installed_devices: Optional[int] = None


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (once per machine and source version) and load the C++ extension; loading registers the device."""
    global _ext
    if _ext is None:
        from models.kernels.cpu.native import quiet_cpp_extension  # no "no CUDA runtime" line in one-line errors

        load = quiet_cpp_extension().load

        _ext = load(name=EXTENSION_NAME, sources=[str(s) for s in SOURCES], extra_cflags=["-O2"], verbose=verbose)
    return _ext


def install(num_devices: int = 1) -> None:
    """Make "npu" a device with `num_devices` devices, `torch.npu` its module and "hccl" its process-group backend.

    Idempotent; a second call must ask for the same number of devices.
    """
    global _installed_devices
    with _lock:
        if _installed_devices is not None:
            if num_devices != _installed_devices:
                raise RuntimeError(f"fake npu already installed with {_installed_devices} devices, not {num_devices}")
            return
        if not 1 <= num_devices <= 8:
            raise ValueError(f"fake npu: 1 to 8 devices, not {num_devices}")
        ext = load_extension()
        ext.set_device_count(num_devices)
        torch.utils.rename_privateuse1_backend("npu")
        from . import device_module

        torch._register_device_module("npu", device_module.build(ext))
        torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)
        if torch.distributed.is_available():
            from . import hccl

            hccl.register()
        _installed_devices = num_devices


def installed() -> bool:
    return _installed_devices is not None


def soc_name() -> str:
    return os.environ.get("FAKE_NPU_SOC", DEFAULT_SOC)
