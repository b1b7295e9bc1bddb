"""The launcher's own configuration (`launch.*` of `python -m launch`); every other key goes to `python -m train`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from configs.errors import ConfigError


class Scheduler(str, Enum):
    local = "local"  # this machine, or one launcher per node started by hand (launch.node_rank)
    slurm = "slurm"  # writes and submits an sbatch script; inside the allocation, runs this node's share
    mindcluster = "mindcluster"  # an Ascend MindCluster / Volcano job (AscendJob): one launcher per pod


class Runner(str, Enum):
    torchrun = "torchrun"  # torch.distributed.run
    torch_npu = "torch_npu"  # torch_npu.distributed.run: torchrun with its parallel TCPStore rendezvous (large jobs)


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "24:00:00"
    # Generic resources per node, as the site names them (gpu:8, npu:16); none requested when unset.
    gres: Optional[str] = None
    # Further `#SBATCH` lines, verbatim (e.g. "--exclusive", "--qos=high").
    extra: list[str] = field(default_factory=list)
    # Submit with sbatch (false: write the script and print the command that would submit it).
    submit: bool = True
    # Seconds before the time limit at which Slurm sends SIGUSR1 (the preemption notice); 0: the run's
    # checkpoint.preempt_grace_s plus a minute.
    signal_lead_s: int = 0


@dataclass
class LaunchConfig:
    scheduler: Scheduler = Scheduler.local
    nodes: int = 1
    nproc_per_node: int = 1
    # This node's rank (0 .. nodes-1) when nodes are started by hand; unset with several nodes and no scheduler that
    # numbers them: torchrun's c10d rendezvous numbers them in the order they join.
    node_rank: Optional[int] = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = "supertrain"
    # Times this node's processes are started again after a failure (every node restarts; the run resumes from its
    # newest intact checkpoint).
    max_restarts: int = 0
    runner: Runner = Runner.torchrun
    # Environment recipe: auto (by device: the Ascend recipe for the cluster that matches the node size), none, or a
    # preset (cloudmatrix384, atlas_a2); launch.env entries override it.
    recipe: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    # Network interface for the collective libraries' and gloo's sockets (HCCL_SOCKET_IFNAME, NCCL_SOCKET_IFNAME,
    # GLOO_SOCKET_IFNAME); unset: their own choice.
    socket_ifname: Optional[str] = None
    # An Ascend rank table (JSON); unset: $RANK_TABLE_FILE where set. Node ranks then follow its server order.
    rank_table: Optional[str] = None
    # This host's address as the rank table names it; unset: $POD_IP, else the address of this host's name.
    host_ip: Optional[str] = None
    # Print every node's command and environment and the sbatch script; start nothing.
    dry_run: bool = False
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"launch.nodes={self.nodes} and launch.nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nodes:
            raise ConfigError(f"launch.node_rank={self.node_rank} must lie in [0, launch.nodes={self.nodes})")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"launch.master_port={self.master_port} must be a port number (1-65535)")
        if self.max_restarts < 0:
            raise ConfigError(f"launch.max_restarts={self.max_restarts} must be >= 0")


@dataclass
class LaunchRoot:
    launch: LaunchConfig = field(default_factory=LaunchConfig)
