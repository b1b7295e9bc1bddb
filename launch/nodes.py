"""Which node this is, how many there are and where rank 0 listens, from the scheduler that started the job.

Static node ranks wherever the scheduler numbers the nodes (HCCL wants a supernode's ranks in physical order, and
torchrun's c10d rendezvous numbers nodes by the order they join): Slurm's SLURM_NODEID, MindCluster's pod rank, an
Ascend rank table's server order, or `launch.node_rank`. With none of them and several nodes, c10d decides.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from configs.errors import ConfigError
from launch.config import LaunchConfig, Scheduler


@dataclass(frozen=True)
class NodePlacement:
    count: int
    nproc: int
    rank: Optional[int]  # None: the rendezvous numbers the nodes
    master_addr: str
    master_port: int
    source: str  # where the rank came from, for the log line


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login5") as host names, in order."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", text):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}")
    return hosts


def parse_device_list(text: str) -> list[int]:
    """MindCluster's LOCAL_RANK: the pod's NPU ids as "{0,1,2,3}" or "0,1,2,3"."""
    items = [item for item in re.split(r"[\s,{}\[\]]+", text) if item]
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ConfigError(f"LOCAL_RANK={text!r} is not a list of device ids") from None


def _need(env: Mapping[str, str], names: tuple[str, ...], scheduler: str) -> None:
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise ConfigError(f"launch.scheduler={scheduler} needs {', '.join(missing)} in the environment (set by the "
                          f"scheduler inside its job): start the launcher inside the job, or use "
                          f"launch.scheduler=local")


def _slurm(cfg: LaunchConfig, env: Mapping[str, str]) -> NodePlacement:
    _need(env, ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST"), "slurm")
    hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    count = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if count != cfg.nodes:
        raise ConfigError(f"the Slurm allocation has {count} nodes and launch.nodes={cfg.nodes}: submit with "
                          f"--nodes={cfg.nodes} or set launch.nodes={count}")
    return NodePlacement(count, cfg.nproc_per_node, int(env["SLURM_NODEID"]), hosts[0], cfg.master_port,
                         "SLURM_NODEID")


def _mindcluster(cfg: LaunchConfig, env: Mapping[str, str]) -> NodePlacement:
    """Ascend Operator's variables for a PyTorch job: RANK is the pod's node rank, WORLD_SIZE the job's NPUs,
    LOCAL_WORLD_SIZE the pod's NPUs, LOCAL_RANK the list of the pod's NPU ids (MindCluster documentation, Ascend
    Operator environment variables)."""
    _need(env, ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"), "mindcluster")
    per_pod = int(env["LOCAL_WORLD_SIZE"])
    world = int(env["WORLD_SIZE"])
    if per_pod < 1 or world % per_pod:
        raise ConfigError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_pod}")
    devices = parse_device_list(env.get("LOCAL_RANK", ",".join(map(str, range(per_pod)))))
    if len(devices) != per_pod:
        raise ConfigError(f"LOCAL_RANK={env.get('LOCAL_RANK')!r} lists {len(devices)} devices and "
                          f"LOCAL_WORLD_SIZE={per_pod}")
    count = world // per_pod
    if (cfg.nodes, cfg.nproc_per_node) not in ((count, per_pod), (1, 1)):
        raise ConfigError(f"the MindCluster job has {count} pods x {per_pod} NPUs and the launch config "
                          f"{cfg.nodes} x {cfg.nproc_per_node}: leave launch.nodes and launch.nproc_per_node unset or "
                          f"match the job")
    port = int(env.get("MASTER_PORT") or cfg.master_port)
    return NodePlacement(count, per_pod, int(env["RANK"]), env["MASTER_ADDR"], port, "MindCluster RANK (pod rank)")


def _local(cfg: LaunchConfig) -> NodePlacement:
    rank = cfg.node_rank if cfg.node_rank is not None else (0 if cfg.nodes == 1 else None)
    return NodePlacement(cfg.nodes, cfg.nproc_per_node, rank, cfg.master_addr, cfg.master_port,
                         "launch.node_rank" if cfg.node_rank is not None else "c10d rendezvous (join order)")


# ---- Ascend rank tables ---------------------------------------------------------------------------------------


def rank_table_servers(path: Path) -> list[tuple[str, list[int]]]:
    """(server_id, its devices' rank_ids) per server, in the table's order (super pods, then servers): the order HCCL
    numbers ranks in. Versions 1.0 (server_list) and 1.2 (server_list, super_pod_list) of the format."""
    try:
        table = json.loads(path.read_text())
        servers = [(str(s["server_id"]), [int(d["rank_id"]) for d in s["device"]]) for s in table["server_list"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"RANK_TABLE_FILE={path} is not a readable Ascend rank table ({error})") from None
    servers.sort(key=lambda server: min(server[1]))
    for node, (server, ranks) in enumerate(servers):
        expected = list(range(node * len(ranks), (node + 1) * len(ranks)))
        if sorted(ranks) != expected:
            raise ConfigError(f"RANK_TABLE_FILE={path}: server {server} holds ranks {sorted(ranks)}, not the "
                              f"contiguous block {expected[0]}-{expected[-1]} torchrun gives node {node}")
    return servers


def host_addresses(explicit: Optional[str], env: Mapping[str, str]) -> set[str]:
    if explicit:
        return {explicit}
    names = {env[key] for key in ("POD_IP",) if env.get(key)}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return names | {socket.gethostname()}


def _apply_rank_table(placement: NodePlacement, cfg: LaunchConfig, path: Path,
                      env: Mapping[str, str]) -> NodePlacement:
    servers = rank_table_servers(path)
    if len(servers) != placement.count or any(len(ranks) != placement.nproc for _, ranks in servers):
        raise ConfigError(f"RANK_TABLE_FILE={path} lists {len(servers)} servers of {len(servers[0][1])} devices and "
                          f"the job has {placement.count} nodes of {placement.nproc}")
    if cfg.dry_run:
        return placement  # every node is printed; each takes its rank from the table when it starts
    mine = host_addresses(cfg.host_ip, env)
    found = [node for node, (server, _) in enumerate(servers) if server in mine]
    if not found:
        raise ConfigError(f"RANK_TABLE_FILE={path} names no server of this host ({', '.join(sorted(mine))}): set "
                          f"launch.host_ip to this host's server_id")
    if placement.rank is not None and placement.rank != found[0]:
        raise ConfigError(f"{placement.source} gives node rank {placement.rank} and RANK_TABLE_FILE={path} gives "
                          f"{found[0]}: HCCL would number the ranks differently; fix one of them")
    return NodePlacement(placement.count, placement.nproc, found[0], placement.master_addr, placement.master_port,
                         "RANK_TABLE_FILE server order")


def place_node(cfg: LaunchConfig, env: Mapping[str, str], dry_run_outside_job: bool = False) -> NodePlacement:
    """This node's placement. `dry_run_outside_job`: a Slurm or MindCluster dry run away from its job, which prints
    every node as the scheduler would number them."""
    if cfg.scheduler == Scheduler.slurm and not dry_run_outside_job:
        placement = _slurm(cfg, env)
    elif cfg.scheduler == Scheduler.mindcluster and not dry_run_outside_job:
        placement = _mindcluster(cfg, env)
    else:
        placement = _local(cfg)
    table = cfg.rank_table or env.get("RANK_TABLE_FILE")
    if table:
        placement = _apply_rank_table(placement, cfg, Path(table), env)
    return placement
