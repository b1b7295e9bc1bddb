"""`torch.npu` for the fake NPU: what PyTorch, DDP, FSDP2, DTensor and pipelining ask of a device module.

The device is synchronous, so streams and events are PyTorch's generic ones (torch.Stream/torch.Event over the C++
guard, whose events are always complete) and synchronize() has nothing to wait for. Random numbers come from the
CPU generator (the C++ hooks say so), so the RNG functions act on it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Union

import torch

from . import soc_name

DeviceLike = Union[torch.device, str, int, None]
_PRIVATEUSE1 = 20  # c10::DeviceType::PrivateUse1, as torch.Stream(device_type=...) takes it


def _index(device: DeviceLike, ext: ModuleType) -> int:
    if device is None:
        return ext.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "npu":
        raise ValueError(f"expected an npu device, got {device}")
    return ext.current_device() if device.index is None else device.index


def build(ext: ModuleType) -> ModuleType:
    """The module registered as torch.npu; `ext` is the loaded C++ extension."""
    module = ModuleType("torch.npu", __doc__)

    def is_available() -> bool:
        return True

    def is_initialized() -> bool:
        return True

    def _lazy_init() -> None:
        pass

    def _is_in_bad_fork() -> bool:
        return False

    def device_count() -> int:
        return ext.device_count()

    def current_device() -> int:
        return ext.current_device()

    def set_device(device: DeviceLike) -> None:
        ext.set_device(_index(device, ext))

    class device:  # noqa: N801 - named like torch.cuda.device
        """Context manager that makes `idx` the current npu device."""

        def __init__(self, idx: DeviceLike) -> None:
            self.idx = -1 if idx is None else _index(idx, ext)
            self.prev = -1

        def __enter__(self) -> None:
            self.prev = ext.current_device()
            if self.idx >= 0:
                ext.set_device(self.idx)

        def __exit__(self, *exc: Any) -> None:
            ext.set_device(self.prev)

    def synchronize(device: DeviceLike = None) -> None:
        pass

    class Stream(torch.Stream):
        """A stream of the fake device (generic torch.Stream; work on it is done when enqueued)."""

        def __new__(cls, device: DeviceLike = None, priority: int = 0, **kwargs: Any) -> "Stream":
            return super().__new__(cls, device=torch.device("npu", _index(device, ext)), priority=priority)

    class Event(torch.Event):
        """An event of the fake device: always complete once recorded."""

        def __new__(cls, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> "Event":
            return super().__new__(cls, device=torch.device("npu", ext.current_device()),
                                   enable_timing=enable_timing, blocking=blocking, interprocess=interprocess)

    def current_stream(device: DeviceLike = None) -> torch.Stream:
        return torch.accelerator.current_stream(torch.device("npu", _index(device, ext)))

    def default_stream(device: DeviceLike = None) -> torch.Stream:
        return torch.Stream(stream_id=0, device_index=_index(device, ext), device_type=_PRIVATEUSE1)

    def set_stream(stream: torch.Stream) -> None:
        torch.accelerator.set_stream(stream)

    class StreamContext:
        """`with torch.npu.stream(s):` makes s current on its device, and restores the previous one."""

        def __init__(self, stream: Optional[torch.Stream]) -> None:
            self.stream = stream
            self.prev: Optional[torch.Stream] = None

        def __enter__(self) -> Optional[torch.Stream]:
            if self.stream is not None:
                self.prev = torch.accelerator.current_stream(self.stream.device)
                torch.accelerator.set_stream(self.stream)
            return self.stream

        def __exit__(self, *exc: Any) -> None:
            if self.prev is not None:
                torch.accelerator.set_stream(self.prev)

    def stream(stream: Optional[torch.Stream]) -> StreamContext:
        return StreamContext(stream)

    # Random numbers: the CPU generator (see the hooks in fake_npu.cpp).
    def get_rng_state(device: DeviceLike = "npu") -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: DeviceLike = "npu") -> None:
        torch.set_rng_state(new_state)

    def get_rng_state_all() -> list[torch.Tensor]:
        return [torch.get_rng_state() for _ in range(ext.device_count())]

    def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
        if new_states:
            torch.set_rng_state(new_states[0])

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def manual_seed_all(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def seed() -> None:
        torch.default_generator.seed()

    def seed_all() -> None:
        torch.default_generator.seed()

    def initial_seed() -> int:
        return torch.default_generator.initial_seed()

    # What the device is and supports.
    def get_device_name(device: DeviceLike = None) -> str:
        return soc_name()  # FAKE_NPU_SOC, else Ascend910B2

    def get_device_capability(device: DeviceLike = None) -> tuple[int, int]:
        return (0, 0)

    class _Properties:
        def __init__(self, index: int) -> None:
            self.name = get_device_name(index)
            self.total_memory = 64 * 2**30
            self.index = index

        def __repr__(self) -> str:
            return f"_NPUDeviceProperties(name='{self.name}', total_memory={self.total_memory // 2**20}MB)"

    def get_device_properties(device: DeviceLike = None) -> _Properties:
        return _Properties(_index(device, ext))

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # torch_npu's rule (NpuVariables.cpp: SoC version >= Ascend910B1): Atlas A2 and A3, 310B and 950 yes; the
        # first 910 generation (whose names include a bare "Ascend910B") and 310P no.
        return soc_name().startswith(("Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4", "Ascend910_93",
                                      "Ascend310B", "Ascend950"))

    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    # Memory: allocated bytes are counted exactly by the C++ allocator; nothing is cached, so reserved = allocated.
    def memory_allocated(device: DeviceLike = None) -> int:
        return ext.memory_allocated(_index(device, ext))

    def max_memory_allocated(device: DeviceLike = None) -> int:
        return ext.max_memory_allocated(_index(device, ext))

    def reset_peak_memory_stats(device: DeviceLike = None) -> None:
        ext.reset_peak_memory_stats(_index(device, ext))

    def reset_max_memory_allocated(device: DeviceLike = None) -> None:
        ext.reset_peak_memory_stats(_index(device, ext))

    def memory_stats(device: DeviceLike = None) -> dict[str, int]:
        index = _index(device, ext)
        current, peak = ext.memory_allocated(index), ext.max_memory_allocated(index)
        return {"allocated_bytes.all.current": current, "allocated_bytes.all.peak": peak,
                "reserved_bytes.all.current": current, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    def mem_get_info(device: DeviceLike = None) -> tuple[int, int]:
        total = 64 * 2**30
        return total - memory_allocated(device), total

    def empty_cache() -> None:
        pass

    functions = dict(locals())
    functions.pop("ext")
    functions.pop("module")
    for name, value in functions.items():
        if not name.startswith("__"):
            setattr(module, name, value)
    module.memory_reserved = memory_allocated
    module.max_memory_reserved = max_memory_allocated
    return module
