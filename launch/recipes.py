"""Environment recipes: the runtime variables a site sets for an Ascend training job, each with why and where it is
documented. `launch.recipe=auto` picks one by device and node size; `launch.env.NAME=VALUE` overrides any entry.

HCCL's two timeouts come from the run's own parallel.init_timeout_s and step_timeout_s (`hccl_timeouts`), computed as
`python -m train` computes them (launch/env.py), so the process groups' timeouts stay above HCCL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from configs.errors import ConfigError
from launch.device import CPU, CUDA, NPU


@dataclass(frozen=True)
class Setting:
    name: str
    value: str
    why: str
    source: str


_TORCH_NPU_ENV = "torch_npu documentation, environment variables (hiascend.com, PyTorch, comref/Envvariables)"
_CANN_ENV = "CANN environment variable reference (hiascend.com, envref)"
_MINDSPEED = "MindSpeed-LLM examples/fsdp2/env_config.sh"

ASCEND = (
    Setting("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True",
            "the caching allocator extends segments instead of splitting fixed blocks: less fragmentation as "
            "activation sizes change (pipeline stages, MoE routing)", f"{_TORCH_NPU_ENV}: PYTORCH_NPU_ALLOC_CONF; "
            f"{_MINDSPEED}"),
    Setting("TASK_QUEUE_ENABLE", "2", "operators dispatched through torch_npu's task queue at level 2: host-side "
            "launch work overlaps device execution", f"{_TORCH_NPU_ENV}: TASK_QUEUE_ENABLE; {_MINDSPEED}"),
    Setting("CPU_AFFINITY_CONF", "1", "each rank's threads bound to the CPU cores of its NPU's NUMA node (coarse "
            "binding): no host-side cross-socket traffic", f"{_TORCH_NPU_ENV}: CPU_AFFINITY_CONF; {_MINDSPEED}"),
    Setting("HCCL_BUFFSIZE", "200", "MB of buffer per communicator (CANN's default, stated so that the planner's "
            "memory figure, 2 x HCCL_BUFFSIZE per group, matches); raise it for large MoE all-to-all messages",
            f"{_CANN_ENV}: HCCL_BUFFSIZE"),
)


@dataclass(frozen=True)
class Recipe:
    name: str
    devices_per_node: int
    settings: tuple[Setting, ...]
    about: str


RECIPES = {
    "cloudmatrix384": Recipe("cloudmatrix384", 16, ASCEND,
                             "Huawei CloudMatrix 384 (Atlas 900 A3 SuperPoD): 48 nodes x 16 Ascend 910C dies on one "
                             "Unified Bus"),
    "atlas_a2": Recipe("atlas_a2", 8, ASCEND,
                       "Atlas 800T A2 / Atlas 900 A2 PoD: 8 Ascend 910B per node on HCCS, RoCE between nodes"),
}


def hccl_timeouts(init_timeout_s: int, step_timeout_s: int) -> list[Setting]:
    """HCCL_CONNECT_TIMEOUT and HCCL_EXEC_TIMEOUT for Atlas A2/A3 from the run's timeouts."""
    from launch.env import hccl_environment

    why = {"HCCL_CONNECT_TIMEOUT": "seconds to connect every rank: parallel.init_timeout_s, in CANN's range",
           "HCCL_EXEC_TIMEOUT": "seconds one collective may take: parallel.step_timeout_s (the process groups' "
                                "timeouts are set above it)"}
    return [Setting(name, value, why[name], f"{_CANN_ENV}: {name}; launch/env.py")
            for name, value in hccl_environment("A2/A3", init_timeout_s, step_timeout_s).items()]


def choose_recipe(name: str, device: str, nproc_per_node: int) -> Optional[Recipe]:
    """The recipe `launch.recipe` names; `auto`: none off Ascend, else the preset whose node size matches."""
    if name == "none":
        return None
    if name == "auto":
        if device not in (NPU, "auto"):
            return None
        return RECIPES["cloudmatrix384"] if nproc_per_node == 16 else RECIPES["atlas_a2"]
    if name not in RECIPES:
        raise ConfigError(f"launch.recipe={name!r} is not one of auto, none, {', '.join(RECIPES)}")
    return RECIPES[name]


def socket_settings(ifname: Optional[str], device: str) -> list[Setting]:
    """The interface every socket of the job uses: the collective library's and gloo's (the CPU-side groups)."""
    if not ifname:
        return []
    variables = {NPU: ("HCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"), CUDA: ("NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME")}.get(device, ("HCCL_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"))
    if device == CPU:
        variables = ("GLOO_SOCKET_IFNAME",)
    return [Setting(name, ifname, "launch.socket_ifname: the network interface to bind", "launch.socket_ifname")
            for name in variables]


def job_environment(recipe: Optional[Recipe], ifname: Optional[str], device: str, overrides: dict[str, str],
                    timeouts: tuple[int, int] = (600, 1800)) -> list[Setting]:
    """The recipe (with HCCL's timeouts from the run's `timeouts`: init, step), the socket interface, then the user's
    launch.env entries, later ones replacing earlier."""
    chosen: dict[str, Setting] = {}
    recipe_settings = (*recipe.settings, *hccl_timeouts(*timeouts)) if recipe else ()
    for setting in (*recipe_settings, *socket_settings(ifname, device)):
        chosen[setting.name] = setting
    for name, value in overrides.items():
        chosen[name] = Setting(name, str(value), "set by launch.env", "launch.env")
    return list(chosen.values())
