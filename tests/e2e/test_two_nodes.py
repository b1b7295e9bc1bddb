"""Two "nodes" on this machine: two `python -m launch` processes on loopback with static node ranks train `tiny` to
the same per-step losses as one node with the same world size; when every process of one node is killed, both
launchers start their node again and the run resumes from its checkpoint to the same losses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, clean_env, losses_by_step

pytestmark = pytest.mark.slow

STEPS = 24
ARGS = [*FAST, f"train.steps={STEPS}", "checkpoint.every=8", "parallel.stall_timeout_s=60"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher(run_dir: Path, *launch: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch", *ARGS, f"run.dir={run_dir}", *launch], cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and max(losses_by_step(run_dir) or {0: 0}) >= step:
            return
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        errors.append(err)
        assert proc.returncode == 0, err
    return errors


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("launch") / "one_node"
    proc = _launcher(run_dir, "launch.nproc_per_node=2", f"launch.master_port={_port()}")
    _finish([proc])
    return run_dir


def test_two_nodes_reproduce_one_node(one_node, tmp_path) -> None:
    run_dir, port = tmp_path / "two_nodes", _port()
    nodes = [_launcher(run_dir, "launch.nodes=2", f"launch.node_rank={rank}", f"launch.master_port={port}")
             for rank in (0, 1)]
    errors = _finish(nodes)
    assert "node 1: torchrun started" in errors[1]
    assert losses_by_step(run_dir) == losses_by_step(one_node)
    assert sorted(losses_by_step(run_dir)) == list(range(1, STEPS + 1))


def test_a_killed_node_restarts_under_the_launcher_and_resumes(one_node, tmp_path) -> None:
    run_dir, port = tmp_path / "killed", _port()
    nodes = [_launcher(run_dir, "launch.nodes=2", f"launch.node_rank={rank}", f"launch.master_port={port}",
                       "launch.max_restarts=2") for rank in (0, 1)]
    _wait_for_step(run_dir, 11, nodes)  # past the checkpoint of step 8
    victims = _descendants(nodes[1].pid)  # node 1's torchrun and its worker: the node's processes die at once
    assert victims
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    errors = _finish(nodes)
    for rank, err in enumerate(errors):
        assert f"node {rank}: torchrun exited with code" in err and "attempt 2 of 3" in err, err
    assert losses_by_step(run_dir) == losses_by_step(one_node)
    resumed = [line for line in (run_dir / "logs" / "rank_0.log").read_text().splitlines() if "resumed from" in line]
    assert resumed and "step_8" in resumed[-1]
