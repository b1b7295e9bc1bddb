"""`python -m launch [train overrides ...] [launch.key=value ...]`: run `python -m train` on one node or many.

    python -m launch launch.nproc_per_node=4 parallel.dp_shard=4                    # this machine
    python -m launch model=deepseek_v3 device=npu launch.nodes=48 launch.nproc_per_node=16 launch.dry_run=true
    python -m launch launch.scheduler=slurm launch.nodes=4 launch.nproc_per_node=8 device=cuda   # writes, submits
    python -m launch launch.scheduler=mindcluster device=npu      # in each pod of an AscendJob

`launch.*` keys configure the launcher (launch/config.py); every other argument goes unchanged to `python -m
train` on every node, and is checked here first (`python -m train --cfg`), so a typo stops before any node starts.
Exit codes: 0 done; 2 a bad config (one line); otherwise the last exit code of this node's torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from configs.errors import ConfigError

log_prefix = "launch"


def _say(message: str) -> None:
    sys.stderr.write(f"[{log_prefix}] {message}\n")
    sys.stderr.flush()


def _train_config(train_args: list[str]) -> dict[str, Any]:
    """The composed train config, from `python -m train --cfg` (its errors are the user's one line)."""
    import yaml

    result = subprocess.run([sys.executable, "-m", "train", "--cfg", *train_args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        message = lines[-1] if lines else f"python -m train --cfg exited with {result.returncode}"
        raise ConfigError(message.removeprefix("supertrain: error: "))
    return yaml.safe_load(result.stdout)


def _inside_job(scheduler: str) -> bool:
    if scheduler == "slurm":
        return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NODEID"))
    if scheduler == "mindcluster":
        return bool(os.environ.get("MASTER_ADDR") and os.environ.get("LOCAL_WORLD_SIZE"))
    return True


def _node_environment(settings: list, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    from launch.job import SCHEDULER_RANK_VARIABLES

    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in SCHEDULER_RANK_VARIABLES}
    for setting in settings:
        if setting.source == "launch.env":
            env[setting.name] = setting.value  # asked for on the command line: wins over the shell's
        else:
            env.setdefault(setting.name, setting.value)  # a recipe value: the site's own setting wins
    return env


def _supervise(command: list[str], env: dict[str, str], node: int, restarts: int) -> int:
    """Run this node's torchrun; after a failure start it again (up to `restarts` times): every node does the same,
    so the job restarts as a whole and resumes from its newest intact checkpoint. Signals go on to torchrun, which
    forwards them to the workers (SIGTERM and Slurm's SIGUSR1: save at the next step, exit 75)."""
    current: dict[str, Any] = {"proc": None, "signalled": False}

    def forward(signum: int, frame: Any) -> None:
        current["signalled"] = True
        if current["proc"] is not None and current["proc"].poll() is None:
            current["proc"].send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = 1
    for attempt in range(restarts + 1):
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        current["proc"] = proc
        _say(f"node {node}: torchrun started (pid {proc.pid}), attempt {attempt + 1} of {restarts + 1}")
        code = proc.wait()
        if code == 0 or current["signalled"]:
            break
        if attempt < restarts:
            _say(f"node {node}: torchrun exited with code {code}; starting again ({attempt + 1} of {restarts} "
                 f"restarts); the run resumes from its newest intact checkpoint")
            time.sleep(2)
    _say(f"node {node}: done, exit code {code}")
    return code


def run(argv: list[str]) -> int:
    from configs.loading import load_typed_config
    from launch.config import LaunchRoot, Scheduler
    from launch.job import node_command, render
    from launch.nodes import place_node
    from launch.recipes import choose_recipe, job_environment
    from launch.slurm import sbatch_script

    # launch.env.NAME=VALUE adds a key to a dict, which Hydra spells +launch.env.NAME=VALUE.
    launch_args = [f"+{a}" if a.startswith("launch.env.") else a for a in argv if a.startswith("launch.")]
    train_args = [a for a in argv if not a.startswith("launch.")]
    cfg = load_typed_config(launch_args, "launch", LaunchRoot, "launch_schema").launch
    train = _train_config(train_args)
    device = str(train["device"]["type"])
    grace = int(train["checkpoint"]["preempt_grace_s"])
    recipe = choose_recipe(cfg.recipe, device, cfg.nproc_per_node)
    timeouts = (int(train["parallel"]["init_timeout_s"]), int(train["parallel"]["step_timeout_s"]))
    settings = job_environment(recipe, cfg.socket_ifname, device, dict(cfg.env), timeouts)
    if recipe is not None:
        _say(f"environment recipe {recipe.name} ({recipe.about}):")
        for s in settings:
            _say(f"  {s.name}={s.value}: {s.why} [{s.source}]")

    if cfg.runner.value == "torch_npu" and not cfg.dry_run:
        import importlib.util

        if importlib.util.find_spec("torch_npu") is None:
            raise ConfigError("launch.runner=torch_npu needs torch_npu installed on every node (pip install "
                              "'supertrain[npu]' with CANN); launch.runner=torchrun works everywhere")
    inside = _inside_job(cfg.scheduler.value)
    if cfg.scheduler == Scheduler.slurm and not inside:
        run_dir = Path(train["run"]["dir"] or f"outputs/{train['model']['name']}-slurm").absolute()
        script = sbatch_script(cfg, argv, settings, grace, str(run_dir / "logs"))
        if cfg.dry_run:
            sys.stdout.write(script)
            return 0
        return _submit(script, run_dir, cfg.job_id, cfg.slurm.submit)

    placement = place_node(cfg, os.environ, dry_run_outside_job=cfg.dry_run and not inside)
    if placement.count > 1 and placement.master_addr in ("127.0.0.1", "localhost"):
        _say(f"launch.master_addr={placement.master_addr} with {placement.count} nodes reaches only this host: set it "
             f"to node 0's address unless every node runs here")
    if cfg.dry_run:
        how = placement.source if placement.rank is not None or placement.count == 1 else (
            "launch.node_rank: start node i with launch.node_rank=i (without it, c10d numbers nodes as they join)")
        _say(f"{placement.count} node(s) x {placement.nproc} processes; node ranks from {how}; rank 0 listens on "
             f"{placement.master_addr}:{placement.master_port}")
        for rank in range(placement.count):
            command = node_command(cfg, placement, rank, train_args, grace)
            sys.stdout.write(f"# node {rank}\n{render(command, settings)}\n")
        return 0
    if placement.rank is None and placement.count > 1:
        _say(f"{placement.count} nodes without static node ranks: c10d numbers them as they join")
    command = node_command(cfg, placement, placement.rank, train_args, grace)
    return _supervise(command, _node_environment(settings), placement.rank or 0, cfg.max_restarts)


def _submit(script: str, run_dir: Path, job_id: str, submit: bool) -> int:
    import shutil

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{job_id}.sbatch"
    path.write_text(script)
    if not submit:
        _say(f"wrote {path}; submit it with: sbatch {path}")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError(f"launch.scheduler=slurm: sbatch is not on PATH here; the script is at {path} (submit it "
                          f"from a Slurm login node, or set launch.slurm.submit=false)")
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    sys.stderr.write(result.stdout + result.stderr)
    return result.returncode


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write((__doc__ or "").strip() + "\n")
        return 0
    try:
        return run(argv)
    except ConfigError as error:
        sys.stderr.write(f"supertrain launch: error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
