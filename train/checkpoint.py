"""Checkpoint folders that are either complete or ignored.

Layout of `run.dir/checkpoints/step_<N>/`:
    .metadata, *.distcp      model and optimizer, via torch.distributed.checkpoint (layout-free, reshardable)
                             (or DeepSpeed's own files under dp_engine=deepspeed)
    trainer_state.json       step and data sampler position (the LR schedule is a function of the step)
    rng/rank_<r>.pt          each rank's RNG state
    COMMITTED                written last: what the checkpoint is (step, world size, layout, engine)

Every rank writes into `step_<N>.tmp/`; once all have finished, rank 0 writes COMMITTED and renames the folder to
`step_<N>`. A crash at any point before that leaves only a `.tmp` folder, which resume ignores and the next save of
that step clears, so the previous good checkpoint is never touched. An older committed folder with the same step
(a run restarted from an earlier checkpoint) is kept under a `.superseded-<time>` name, never deleted.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from configs.errors import CheckpointError

COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def is_committed(path: Path) -> bool:
    return (path / COMMIT_MARKER).is_file()


def committed_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_committed(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_commit_info(path: Path) -> dict[str, Any]:
    return json.loads((path / COMMIT_MARKER).read_text())


def resolve_resume(root: Path, resume: str) -> Optional[Path]:
    """The folder to resume from: `auto` = newest committed one under root (or None), `none` = None, else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = committed_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume!r} does not exist: give a step_<N> folder, auto or none")
    if not is_committed(path):
        raise CheckpointError(
            f"checkpoint.resume={resume!r} has no {COMMIT_MARKER} marker: its save did not finish; "
            f"pick an older step_<N> folder or use checkpoint.resume=auto"
        )
    return path


class CheckpointManager:
    """Runs the save protocol; what goes into the folder is the caller's `write(folder)`."""

    def __init__(self, root: Path, rank: int, barrier: Callable[[], None], keep_last: int = 0) -> None:
        self.root = root
        self.rank = rank
        self.barrier = barrier
        self.keep_last = keep_last

    def save(self, step: int, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
        final = self.root / f"step_{step}"
        staging = self.root / f"step_{step}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that crashed
            staging.mkdir()
        self.barrier()
        write(staging)
        self.barrier()
        if self.rank == 0:
            (staging / COMMIT_MARKER).write_text(json.dumps({"step": step, "time": time.time(), **info}, indent=2))
            if final.exists():
                if is_committed(final):
                    final.rename(final.with_name(f"{final.name}.superseded-{int(time.time())}"))
                else:
                    shutil.rmtree(final)
            staging.rename(final)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in committed_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path)


# ---- trainer-level state ---------------------------------------------------------------------------------------


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))


def read_trainer_state(folder: Path) -> dict[str, Any]:
    file = folder / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {TRAINER_STATE}: it was not written by supertrain")
    return json.loads(file.read_text())


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


def save_rng(folder: Path, rank: int, device_rng: Optional[torch.Tensor]) -> None:
    path = rng_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "device": device_rng}, path)


def load_rng(folder: Path, rank: int) -> Optional[dict[str, Any]]:
    """This rank's saved RNG state, or None when the checkpoint came from a smaller world."""
    path = rng_file(folder, rank)
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    return state
