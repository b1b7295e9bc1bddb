"""Process-group life cycle: what torchrun tells a rank, backend environment, timeouts, and a clean exit.

The clean exit matters on CPU: after DTensor, FSDP2, DCP or autograd all-to-all work, a gloo worker thread can
abort the interpreter during shutdown (SIGABRT, "terminate called without an active exception"), so a good run
would be reported as failed. Ending each rank with a barrier, destroying the process group, flushing and leaving
through os._exit avoids it (0 aborts in 44 runs, against 20-80% of runs without it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from launch.device import NPU, Device


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info() -> RankInfo:
    """What torchrun (or any launcher following its variables) says about this process."""
    return RankInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def backend_environment(device: Device, init_timeout_s: int, step_timeout_s: int) -> dict[str, str]:
    """Environment the collective library reads at start-up; values the user already set win."""
    if device.kind != NPU:
        return {}
    return {
        # HCCL waits this long (s) for all ranks to connect, and this long for one collective to finish; CANN accepts
        # [120, 7200] and [68, 17340] (CANN environment-variable reference), so values are clamped into them.
        "HCCL_CONNECT_TIMEOUT": str(min(max(init_timeout_s, 120), 7200)),
        "HCCL_EXEC_TIMEOUT": str(min(max(step_timeout_s, 68), 17340)),
    }


def init_distributed(device: Device, info: RankInfo, init_timeout_s: int, step_timeout_s: int) -> None:
    for key, value in backend_environment(device, init_timeout_s, step_timeout_s).items():
        os.environ.setdefault(key, value)
    device.set_device(info.local_rank)
    dist.init_process_group(
        backend=device.backend,
        timeout=timedelta(seconds=init_timeout_s),
        rank=info.rank,
        world_size=info.world_size,
        # Binding the device up front (eager init) is documented for NCCL; HCCL and gloo connect lazily.
        device_id=device.torch_device(info.local_rank) if device.backend == "nccl" else None,
    )


def set_step_timeout(step_timeout_s: int, groups: Optional[list] = None) -> None:
    """Start-up (rendezvous, first collectives) may be slow; training collectives get their own limit."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for group in groups or [None]:
        _set_pg_timeout(timedelta(seconds=step_timeout_s), group)


def shutdown(code: int, clean: bool = True) -> None:
    """Leave the process. With a process group: synchronize (when the run ended well), destroy, flush, os._exit."""
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone must not turn a finished run into a crash
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
