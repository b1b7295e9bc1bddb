"""Each node's command: torchrun (or torch_npu's launcher) running `python -m train` with the node's placement."""

from __future__ import annotations

import shlex
import sys
from functools import lru_cache
from typing import Optional

from launch.config import LaunchConfig, Runner
from launch.nodes import NodePlacement
from launch.recipes import Setting

RUNNER_MODULES = {Runner.torchrun: "torch.distributed.run", Runner.torch_npu: "torch_npu.distributed.run"}
# Forwarded by torchrun to every worker: Slurm's warning (SIGUSR1) included, which train treats as a preemption
# notice (save at the next step boundary, exit 75).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Variables a scheduler sets for its own launch model that must not reach torchrun's agent (it sets its workers').
SCHEDULER_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@lru_cache(maxsize=1)
def torchrun_options() -> frozenset[str]:
    """The option names the installed torchrun accepts (--signals-to-handle and --shutdown-timeout are recent)."""
    from torch.distributed.run import get_args_parser

    return frozenset(option for action in get_args_parser()._actions for option in action.option_strings)


def node_command(cfg: LaunchConfig, placement: NodePlacement, node_rank: Optional[int], train_args: list[str],
                 preempt_grace_s: int, python: str = sys.executable) -> list[str]:
    """The command one node runs. `node_rank` None: every node runs the same command and c10d numbers them."""
    command = [python, "-m", RUNNER_MODULES[cfg.runner], f"--nnodes={placement.count}",
               f"--nproc_per_node={placement.nproc}"]
    if node_rank is not None:
        command += [f"--node_rank={node_rank}", f"--master_addr={placement.master_addr}",
                    f"--master_port={placement.master_port}"]
    else:
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={placement.master_addr}:{placement.master_port}",
                    f"--rdzv_id={cfg.job_id}"]
    # Restarts are the launcher's: every node starts afresh, a dead node included (launch/__main__.py).
    command.append("--max_restarts=0")
    options = torchrun_options()
    if "--signals_to_handle" in options:
        command.append(f"--signals_to_handle={FORWARDED_SIGNALS}")
    if "--shutdown_timeout" in options:
        # Workers get this long after a signal before SIGKILL: the preemption save's grace, and a margin.
        command.append(f"--shutdown_timeout={preempt_grace_s + 30}")
    return [*command, "-m", "train", *train_args]


def render(command: list[str], settings: list[Setting]) -> str:
    """One shell line: the environment, then the command."""
    prefix = " ".join(f"{s.name}={shlex.quote(s.value)}" for s in settings)
    return f"{prefix} {shlex.join(command)}".strip()
