"""The sbatch script of a Slurm job: one launcher task per node (srun), each running its node's share with its
node rank from SLURM_NODEID; SIGUSR1 a set time before the limit, which reaches the workers as a preemption notice."""

from __future__ import annotations

import shlex
import sys

from launch.config import LaunchConfig
from launch.recipes import Setting


def sbatch_script(cfg: LaunchConfig, argv: list[str], settings: list[Setting], preempt_grace_s: int,
                  log_dir: str, python: str = sys.executable) -> str:
    lead = cfg.slurm.signal_lead_s or preempt_grace_s + 60
    lines = ["#!/bin/bash", f"#SBATCH --job-name={cfg.job_id}", f"#SBATCH --nodes={cfg.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={cfg.slurm.time}",
             # Job steps (the launchers), not the batch shell, get SIGUSR1 `lead` seconds before the time limit.
             f"#SBATCH --signal=USR1@{lead}", f"#SBATCH --output={log_dir}/slurm-%j.out"]
    if cfg.slurm.partition:
        lines.append(f"#SBATCH --partition={cfg.slurm.partition}")
    if cfg.slurm.account:
        lines.append(f"#SBATCH --account={cfg.slurm.account}")
    if cfg.slurm.gres:
        lines.append(f"#SBATCH --gres={cfg.slurm.gres}")
    lines += [f"#SBATCH {extra}" for extra in cfg.slurm.extra]
    lines += ["", "set -euo pipefail", "# The recipe's environment (launch/recipes.py), each entry overridable with "
              "launch.env.NAME=VALUE"]
    lines += [f"export {s.name}={shlex.quote(s.value)}" for s in settings]
    inner = [a for a in argv if not a.startswith(("launch.scheduler=", "launch.dry_run="))]
    launcher = shlex.join([python, "-m", "launch", *inner, "launch.scheduler=slurm"])
    lines += ["", "# One launcher per node; each reads its node rank from SLURM_NODEID.",
              f"srun --ntasks-per-node=1 --kill-on-bad-exit=0 {launcher}", ""]
    return "\n".join(lines)
