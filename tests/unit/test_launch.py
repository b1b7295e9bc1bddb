"""python -m launch: node placement per scheduler (Slurm, MindCluster with its exact variables, rank tables), the
dry run of a 48-node CloudMatrix job, the sbatch script, the environment recipe, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs.errors import ConfigError
from conftest import REPO, clean_env
from launch.config import LaunchConfig, Scheduler
from launch.device import CUDA
from launch.env import LaunchError, rank_info
from launch.nodes import expand_hostlist, parse_device_list, place_node, rank_table_servers
from launch.recipes import RECIPES, choose_recipe, job_environment


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=REPO)


# ---- placement ----------------------------------------------------------------------------------------------


def test_slurm_host_lists_expand_in_order() -> None:
    assert expand_hostlist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]


def test_slurm_placement_takes_the_node_id_and_the_first_host() -> None:
    env = {"SLURM_JOB_ID": "991", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "npu[004-007]", "SLURM_JOB_NUM_NODES": "4"}
    placement = place_node(LaunchConfig(scheduler=Scheduler.slurm, nodes=4, nproc_per_node=16), env)
    assert (placement.rank, placement.count, placement.nproc, placement.master_addr) == (2, 4, 16, "npu004")
    with pytest.raises(ConfigError, match="the Slurm allocation has 4 nodes and launch.nodes=8"):
        place_node(LaunchConfig(scheduler=Scheduler.slurm, nodes=8), env)


# What the Ascend Operator sets in each pod of a 2-pod x 16-NPU PyTorch AscendJob (MindCluster documentation, "Ascend
# Operator environment variables"): RANK is the pod's node rank, WORLD_SIZE the job's NPUs, LOCAL_WORLD_SIZE the
# pod's NPUs, LOCAL_RANK the list of the pod's NPU ids, MASTER_PORT the ascendjob-port (2222 by default).
MINDCLUSTER_WORKER = {"MASTER_ADDR": "10.96.12.7", "MASTER_PORT": "2222", "WORLD_SIZE": "32", "RANK": "1",
                      "LOCAL_WORLD_SIZE": "16", "LOCAL_RANK": "{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}"}


def test_mindcluster_pod_rank_becomes_the_node_rank() -> None:
    placement = place_node(LaunchConfig(scheduler=Scheduler.mindcluster), MINDCLUSTER_WORKER)
    assert (placement.rank, placement.count, placement.nproc) == (1, 2, 16)
    assert (placement.master_addr, placement.master_port) == ("10.96.12.7", 2222)
    assert parse_device_list("0,1,2,3") == [0, 1, 2, 3] == parse_device_list("{0,1,2,3}")


def test_mindcluster_inconsistent_variables_are_named() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE=30 is not a multiple of LOCAL_WORLD_SIZE=16"):
        place_node(LaunchConfig(scheduler=Scheduler.mindcluster), {**MINDCLUSTER_WORKER, "WORLD_SIZE": "30"})
    with pytest.raises(ConfigError, match="lists 4 devices and LOCAL_WORLD_SIZE=16"):
        place_node(LaunchConfig(scheduler=Scheduler.mindcluster), {**MINDCLUSTER_WORKER, "LOCAL_RANK": "{0,1,2,3}"})
    with pytest.raises(ConfigError, match="needs MASTER_ADDR, RANK"):
        place_node(LaunchConfig(scheduler=Scheduler.mindcluster), {"WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "16"})


def test_a_mindcluster_local_rank_list_stops_train_in_one_line(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", MINDCLUSTER_WORKER["LOCAL_RANK"])
    with pytest.raises(LaunchError, match="is a list of devices, as a MindCluster job sets it"):
        rank_info()


def _rank_table(path: Path, servers: list[tuple[str, list[int]]]) -> Path:
    table = {"version": "1.0", "server_count": str(len(servers)), "status": "completed",
             "server_list": [{"server_id": ip, "device": [{"device_id": str(i % 16), "device_ip": f"192.168.1.{r}",
                                                           "rank_id": str(r)} for i, r in enumerate(ranks)]}
                             for ip, ranks in servers]}
    path.write_text(json.dumps(table))
    return path


def test_rank_table_orders_nodes_by_their_ranks(tmp_path) -> None:
    # Listed out of order: HCCL numbers ranks by rank_id, so node order follows the ranks, not the listing.
    path = _rank_table(tmp_path / "table.json", [("10.0.0.2", list(range(16, 32))), ("10.0.0.1", list(range(16)))])
    assert [server for server, _ in rank_table_servers(path)] == ["10.0.0.1", "10.0.0.2"]
    cfg = LaunchConfig(nodes=2, nproc_per_node=16, rank_table=str(path), host_ip="10.0.0.2")
    assert place_node(cfg, {}).rank == 1
    with pytest.raises(ConfigError, match="gives node rank 0 and RANK_TABLE_FILE"):
        place_node(LaunchConfig(nodes=2, nproc_per_node=16, node_rank=0, rank_table=str(path), host_ip="10.0.0.2"),
                   {})
    with pytest.raises(ConfigError, match="names no server of this host"):
        place_node(LaunchConfig(nodes=2, nproc_per_node=16, rank_table=str(path), host_ip="10.0.0.9"), {})


def test_rank_table_with_interleaved_ranks_is_refused(tmp_path) -> None:
    path = _rank_table(tmp_path / "table.json", [("a", [0, 2]), ("b", [1, 3])])
    with pytest.raises(ConfigError, match="not the contiguous block 0-1"):
        rank_table_servers(path)


# ---- recipes ------------------------------------------------------------------------------------------------


def test_recipe_by_node_size_and_overrides() -> None:
    assert choose_recipe("auto", "npu", 16) is RECIPES["cloudmatrix384"]
    assert choose_recipe("auto", "npu", 8) is RECIPES["atlas_a2"]
    assert choose_recipe("auto", CUDA, 8) is None
    settings = {s.name: s for s in job_environment(RECIPES["atlas_a2"], "bond0", "npu", {"HCCL_BUFFSIZE": "400"})}
    assert settings["HCCL_BUFFSIZE"].value == "400" and settings["HCCL_BUFFSIZE"].source == "launch.env"
    assert settings["PYTORCH_NPU_ALLOC_CONF"].value == "expandable_segments:True"
    assert settings["HCCL_SOCKET_IFNAME"].value == settings["GLOO_SOCKET_IFNAME"].value == "bond0"
    assert all(s.source and s.why for s in RECIPES["cloudmatrix384"].settings)
    with pytest.raises(ConfigError, match="launch.recipe='a4' is not one of"):
        choose_recipe("a4", "npu", 8)


# ---- the command line ---------------------------------------------------------------------------------------


def test_dry_run_of_a_48_node_cloudmatrix_job() -> None:
    result = _launch("model=deepseek_v3", "device=npu", "launch.nodes=48", "launch.nproc_per_node=16",
                     "launch.dry_run=true", "launch.master_addr=10.0.0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [line for line in lines if line.startswith("# node ")]
    commands = [line for line in lines if not line.startswith("#")]
    assert headers == [f"# node {rank}" for rank in range(48)]
    for rank, command in enumerate(commands):
        assert f"--node_rank={rank} " in command and "--nnodes=48 --nproc_per_node=16" in command
        assert "--master_addr=10.0.0.1" in command and command.endswith("-m train model=deepseek_v3 device=npu")
        assert command.startswith("PYTORCH_NPU_ALLOC_CONF=expandable_segments:True TASK_QUEUE_ENABLE=2 ")
    assert "environment recipe cloudmatrix384" in result.stderr


def test_slurm_dry_run_prints_a_valid_sbatch_script(tmp_path) -> None:
    result = _launch("device=npu", "launch.scheduler=slurm", "launch.nodes=4", "launch.nproc_per_node=16",
                     "launch.dry_run=true", "launch.slurm.partition=ascend", "launch.env.HCCL_BUFFSIZE=400",
                     f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=4" in directives and "#SBATCH --ntasks-per-node=1" in directives
    assert "#SBATCH --signal=USR1@120" in directives  # checkpoint.preempt_grace_s (60) + 60 before the limit
    assert "#SBATCH --partition=ascend" in directives
    assert "export HCCL_BUFFSIZE=400" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.endswith("launch.scheduler=slurm") and "launch.dry_run" not in srun
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("args, line", [
    (("launch.nodes=0",), "launch.nodes=0 and launch.nproc_per_node=1 must be >= 1"),
    (("launch.nodes=2", "launch.node_rank=2"), "launch.node_rank=2 must lie in [0, launch.nodes=2)"),
    (("model.nosuch=1",), "model.nosuch: Key 'nosuch' not in 'ModelConfig'"),
    (("launch.nosuch=1",), "launch.nosuch"),
    (("launch.scheduler=mindcluster", "device=npu"), "launch.scheduler=mindcluster needs MASTER_ADDR"),
])
def test_bad_launch_configs_stop_in_one_line(args, line) -> None:
    result = _launch(*args)
    assert result.returncode == 2
    assert line in result.stderr.strip().splitlines()[-1]
