"""Process-group life cycle: what torchrun tells a rank, backend environment, timeouts, and a clean exit.

The clean exit matters on CPU: after DTensor, FSDP2, DCP or autograd all-to-all work, a gloo worker thread can
abort the interpreter during shutdown (SIGABRT, "terminate called without an active exception"), so a good run
would be reported as failed. Ending each rank with a barrier, destroying the process group, flushing and leaving
through os._exit avoids it (0 aborts in 44 runs, against 20-80% of runs without it).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from configs.errors import ConfigError
from launch.device import CUDA, NPU, Device, ascend_generation

log = logging.getLogger("supertrain")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class LaunchError(ConfigError):
    """The process was started in a way it cannot run from (one line, exit code 2)."""


def rank_info() -> RankInfo:
    """What torchrun (or any launcher following its variables) says about this process."""
    values = {name: os.environ.get(name, default) for name, default in
              (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))}
    if not values["LOCAL_RANK"].strip().isdigit():
        # MindCluster's Ascend Operator sets LOCAL_RANK to the pod's NPU list and RANK to the pod's node rank.
        raise LaunchError(f"LOCAL_RANK={values['LOCAL_RANK']!r} is a list of devices, as a MindCluster job sets it, "
                          f"not this process's rank: start each pod with python -m launch launch.scheduler=mindcluster")
    try:
        return RankInfo(**{name.lower(): int(value) for name, value in values.items()})
    except ValueError:
        raise LaunchError(f"RANK={values['RANK']!r} and WORLD_SIZE={values['WORLD_SIZE']!r} must be integers (as "
                          f"torchrun sets them)") from None


# Seconds a process-group timeout keeps above HCCL's own, so that HCCL reports a stuck collective (and writes its
# logs) before the watchdog tears the group down.
HCCL_MARGIN_S = 60
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Timeouts:
    """Seconds a rank waits: `init_s` while starting up (rendezvous, building the mesh and the model), `step_s` for one
    collective during training, as the process groups apply them."""

    init_s: int
    step_s: int


def hccl_environment(generation: str, init_timeout_s: int, step_timeout_s: int) -> dict[str, str]:
    """HCCL's own timeouts from ours: HCCL_CONNECT_TIMEOUT (connecting all ranks) and HCCL_EXEC_TIMEOUT (one
    collective), in the ranges CANN 8.5 documents (environment-variable reference, HCCL_CONNECT_TIMEOUT and
    HCCL_EXEC_TIMEOUT): connect [120, 7200] s on every chip; execution [0, 2147483647] s on Atlas A2 and A3 (0 =
    never), (0, 17340] s on the first 910 generation, which counts it in whole 68 s steps."""
    if generation == "910A":
        execution = min(max(step_timeout_s, 68), 17340) // 68 * 68
    else:
        execution = min(max(step_timeout_s, 0), _INT32_MAX)
    return {"HCCL_CONNECT_TIMEOUT": str(min(max(init_timeout_s, 120), 7200)), "HCCL_EXEC_TIMEOUT": str(execution)}


# The collective libraries' flight recorders: each group keeps its last collectives and, when its watchdog times
# out, writes them (per rank) to <prefix><rank>, which names the collective and the ranks that never joined it.
# torch's NCCL backend and torch_npu's HCCL backend (tools/flight_recorder in Ascend/pytorch) read these variables;
# gloo has no recorder (the stalled-rank watch, launch/heartbeat.py, covers every backend).
FLIGHT_RECORDER = {
    CUDA: {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"},
    NPU: {"TORCH_HCCL_ENABLE_MONITORING": "1", "TORCH_HCCL_TRACE_BUFFER_SIZE": "2000",
          "TORCH_HCCL_DUMP_ON_TIMEOUT": "1"},
}
FLIGHT_RECORDER_FILE = {CUDA: "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", NPU: "TORCH_HCCL_DEBUG_INFO_TEMP_FILE"}


def backend_environment(device: Device, init_timeout_s: int, step_timeout_s: int) -> dict[str, str]:
    """Environment the collective library reads at start-up (set where the user has not set it)."""
    environment = dict(FLIGHT_RECORDER.get(device.kind, {}))
    if device.kind == NPU:
        environment.update(hccl_environment(ascend_generation(device.name()), init_timeout_s, step_timeout_s))
    return environment


def flight_recorder_file(device: Device, logs_dir: str) -> None:
    """Have the flight recorder write its dump into the run's logs (read when it dumps, so set once the run folder
    is known; the user's own setting wins)."""
    variable = FLIGHT_RECORDER_FILE.get(device.kind)
    if variable:
        os.environ.setdefault(variable, os.path.join(logs_dir, "flight_recorder_rank_"))


def process_group_timeouts(device: Device, init_timeout_s: int, step_timeout_s: int,
                           environment: Mapping[str, str] = os.environ) -> Timeouts:
    """The process groups' timeouts: ours, raised on NPU above the HCCL timeouts in effect (the user's, where set),
    as torch_npu asks ("the timeout passed to new_group and init_process_group should be larger than
    HCCL_CONNECT_TIMEOUT and HCCL_EXEC_TIMEOUT", docs TORCH_HCCL_ASYNC_ERROR_HANDLING). HCCL adds 20 s to its socket
    set-up; an execution timeout of 0 never fires, so it sets no floor."""
    if device.kind != NPU:
        return Timeouts(init_timeout_s, step_timeout_s)
    connect = int(environment.get("HCCL_CONNECT_TIMEOUT", "120"))
    execution = int(environment.get("HCCL_EXEC_TIMEOUT", "1836"))
    if ascend_generation(device.name()) == "910A":
        execution = execution // 68 * 68
    step = step_timeout_s if execution == 0 else max(step_timeout_s, execution + HCCL_MARGIN_S)
    return Timeouts(max(init_timeout_s, connect + 20 + HCCL_MARGIN_S), step)


@dataclass(frozen=True)
class Started:
    """What init_distributed set up: the timeouts in effect and the job's key-value store (this restart's keys)."""

    timeouts: Timeouts
    store: Optional[dist.Store]


def _restart_attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def connect_job_store(info: RankInfo, timeout_s: int) -> Optional[dist.Store]:
    """A new connection to the store torchrun's agent serves, under a prefix of this restart attempt; None when the
    launcher is not torchrun's agent (then the default group's store is the job's).

    The agent keeps one store for the whole job, and torch adds no prefix per restart: a restarted rank's gloo mesh
    read the previous attempt's addresses (the dead ranks' old ports) whenever it asked before the new rank had
    written its own, and failed in connectFullMesh. Keys under `attempt_<n>/` belong to this attempt alone."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"supertrain/attempt_{_restart_attempt()}", agent)


def default_store() -> Optional[dist.Store]:
    """The default process group's store (private in torch: None where it is not there)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def init_distributed(device: Device, info: RankInfo, init_timeout_s: int, step_timeout_s: int) -> Started:
    """Start the default process group on this rank's device; return the timeouts in effect and the job's store.

    A group bound to the rank's device has DeviceMesh split its groups from the default communicator (one call per
    mesh dimension instead of one per group). On CUDA the device is passed to init_process_group: NCCL connects
    eagerly and splits. torch_npu 2.13/2.14 accept the binding, but their HCCL backend cannot split (it reports
    supports_splitting False; no comm-split in its sources), so DeviceMesh's split_group would fail: on NPU the group
    is bound after start-up only where the backend reports that it can split, and otherwise the mesh's groups are
    created one by one, with one line saying so (on a large job, RANK_TABLE_FILE lets torch_npu derive them from the
    global communicator instead).
    """
    for key, value in backend_environment(device, init_timeout_s, step_timeout_s).items():
        os.environ.setdefault(key, value)
    timeouts = process_group_timeouts(device, init_timeout_s, step_timeout_s)
    device.set_device(info.local_rank)
    here = device.torch_device(info.local_rank)
    store = connect_job_store(info, timeouts.init_s)
    dist.init_process_group(
        backend=device.backend,
        timeout=timedelta(seconds=timeouts.init_s),
        rank=info.rank,
        world_size=info.world_size,
        device_id=here if device.kind == CUDA else None,
        store=store,
    )
    if device.kind == NPU:
        if _can_split(dist.group.WORLD, here):
            dist.group.WORLD.bound_device_id = here
        elif info.rank == 0:
            log.warning("the %s backend cannot split communicators: the device mesh's process groups are created one "
                        "by one", device.backend)
    return Started(timeouts, store if store is not None else default_store())


def describe_timeouts(device: Device, timeouts: Timeouts) -> str:
    """The timeouts in effect, for the start-up log."""
    hccl = ""
    if device.kind == NPU:
        hccl = (f"; HCCL connect {os.environ.get('HCCL_CONNECT_TIMEOUT')} s, "
                f"execution {os.environ.get('HCCL_EXEC_TIMEOUT')} s")
    return f"process-group timeouts {timeouts.init_s} s at start-up, {timeouts.step_s} s per collective{hccl}"


def _can_split(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether the group's backend for `device` splits communicators (a backend that is not a C++ Backend, such as a
    Python process group, cannot)."""
    try:
        return bool(group._get_backend(device).supports_splitting)
    except (RuntimeError, AttributeError):
        return False


def set_group_timeouts(groups: Iterable[dist.ProcessGroup], device: Device, seconds: int) -> None:
    """Give every group this timeout, on every backend: torch's _set_pg_timeout changes only gloo and NCCL groups
    (for hccl it warns and returns), and only the group it is given, while each DeviceMesh subgroup starts with its
    backend's default (30 min; torch_npu's watchdog then HCCL_EXEC_TIMEOUT + 30 min). ProcessGroup.set_timeout
    reaches each backend of a group; torch_npu's HCCL backend takes the change (ProcessGroupHCCL::setTimeout, bound as
    _set_default_timeout, in torch_npu 2.13 and 2.14). A backend that takes neither keeps its timeout, with one line."""
    timeout = timedelta(seconds=seconds)
    for group in groups:
        try:
            group.set_timeout(timeout)
        except RuntimeError:
            backend = group._get_backend(device.torch_device())
            if hasattr(backend, "_set_default_timeout"):
                backend._set_default_timeout(timeout)
            else:
                log.warning("the %s backend cannot change a group's timeout: %s keeps its own", device.backend,
                            group.group_name)


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
