"""Checkpoint folders that are either complete or ignored.

Layout of `run.dir/checkpoints/step_<N>/`:
    .metadata, *.distcp      model and optimizer, via torch.distributed.checkpoint (layout-free, reshardable)
                             (or DeepSpeed's own files under dp_engine=deepspeed)
    trainer_state.json       step and data sampler position (the LR schedule is a function of the step)
    rng/rank_<r>.pt          each rank's RNG state
    COMMITTED                written last: what the checkpoint is (step, world size, layout, engine)

Every rank writes into `step_<N>.tmp/`; once all have finished, each rank's files are on disk (fsync: DCP syncs the
shards it writes, the rest is synced here), rank 0 writes COMMITTED, syncs it and the folder, renames the folder to
`step_<N>` and syncs its parent. A crash at any point before that leaves only a `.tmp` folder, which resume ignores
and the next save of that step clears, so the previous good checkpoint is never touched, nor is a committed one left
torn by a node that lost power. An older committed folder with the same step (a run restarted from an earlier
checkpoint) is kept under a `.superseded-<time>` name, never deleted.

Before a checkpoint is loaded it is verified (`problem`): its marker and trainer state parse, and every file its
DCP metadata refers to is there and as long as the metadata says. `checkpoint.resume=auto` takes the newest intact
one, saying in one line which damaged ones it passed over; `keep_last` counts intact checkpoints only.
"""

from __future__ import annotations

import json
import logging
import os
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

log = logging.getLogger("supertrain")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """A folder's entries (files created or renamed in it) reach the disk only when the folder itself is synced."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, text: str) -> None:
    path.write_text(text)
    fsync_file(path)


def problem(path: Path) -> Optional[str]:
    """Why the committed checkpoint at `path` cannot be loaded, or None when it is intact: marker and trainer state
    parse; a DCP checkpoint's metadata reads and every byte range it refers to exists; a DeepSpeed one has files."""
    try:
        info = json.loads((path / COMMIT_MARKER).read_text())
        json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError) as error:
        return f"its {COMMIT_MARKER} or {TRAINER_STATE} does not parse ({error})"
    if info.get("engine") == "deepspeed":
        return None if any(path.glob("**/*.pt")) else "it holds no DeepSpeed files"
    if not (path / ".metadata").is_file():
        return "its DCP .metadata is missing"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # truncated or corrupt pickle, wrong format: whatever torch raises
        return f"its DCP .metadata cannot be read ({type(error).__name__})"
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


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


def newest_intact(root: Path, warn: bool = True) -> Optional[Path]:
    """The newest committed checkpoint under root that verifies; each damaged newer one is passed over with one
    warning line. None when there is none at all; CheckpointError when there are some and none is intact."""
    found = committed_checkpoints(root)
    skipped = []
    for _, path in reversed(found):
        damaged = problem(path)
        if damaged is None:
            if warn and skipped:
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead", skipped[0][0], skipped[0][1],
                            path.name)
            return path
        skipped.append((path.name, damaged))
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {root}: the newest, {skipped[0][0]}, is damaged ({skipped[0][1]}), and so is "
            f"every older one: move them aside, or start afresh with checkpoint.resume=none"
        )
    return None


def resolve_resume(root: Path, resume: str) -> Optional[Path]:
    """The folder to resume from: `auto` = newest intact committed one under root (or None), `none` = None, else a
    path, which must be committed and intact."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact(root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume={resume!r} does not exist: give a step_<N> folder, auto or none")
    if not is_committed(path):
        raise CheckpointError(
            f"checkpoint.resume={resume!r} has no {COMMIT_MARKER} marker: its save did not finish; "
            f"pick an older step_<N> folder or use checkpoint.resume=auto"
        )
    damaged = problem(path)
    if damaged is not None:
        raise CheckpointError(f"checkpoint.resume={resume!r} is damaged ({damaged}): pick another step_<N> folder, "
                              f"or checkpoint.resume=auto for the newest intact one")
    return path


class CheckpointManager:
    """Runs the save protocol; what goes into the folder is the caller's `write(folder)`."""

    def __init__(self, root: Path, rank: int, barrier: Callable[[], None], keep_last: int = 0) -> None:
        self.root = root
        self.rank = rank
        self.barrier = barrier
        self.keep_last = keep_last

    def save(self, step: int, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
        """Write step_<step> by the protocol above; CheckpointError (one line) when the disk refuses, with every
        checkpoint already committed left as it was."""
        try:
            return self._save(step, write, info)
        except OSError as error:
            raise CheckpointError(f"saving step_{step} in {self.root} failed ({error.strerror or error}"
                                  f"{': ' + str(error.filename) if error.filename else ''}): free space or fix "
                                  f"permissions; the checkpoints already saved are untouched") from None

    def _save(self, step: int, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
        final = self.root / f"step_{step}"
        staging = self.root / f"step_{step}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that crashed
            staging.mkdir()
        self.barrier()
        write(staging)  # each rank syncs what it wrote
        self.barrier()
        if self.rank == 0:
            for file in staging.rglob("*"):  # DCP synced its shards; DeepSpeed's and any other files are synced here
                if file.is_file():
                    fsync_file(file)
            for folder in sorted({p.parent for p in staging.rglob("*")} | {staging}):
                fsync_dir(folder)
            write_durably(staging / COMMIT_MARKER, json.dumps({"step": step, "time": time.time(), **info}, indent=2))
            fsync_dir(staging)
            if final.exists():
                if is_committed(final):
                    final.rename(final.with_name(f"{final.name}.superseded-{int(time.time())}"))
                else:
                    shutil.rmtree(final)
            staging.rename(final)
            fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest keep_last intact checkpoints, and nothing older (a damaged one never counts)."""
        if self.keep_last <= 0:
            return
        kept = 0
        for _, path in reversed(committed_checkpoints(self.root)):
            if kept >= self.keep_last:
                shutil.rmtree(path)
            elif problem(path) is None:
                kept += 1


# ---- trainer-level state ---------------------------------------------------------------------------------------


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    write_durably(folder / TRAINER_STATE, json.dumps(state, indent=2))


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
    fsync_file(path)


def load_rng(folder: Path, rank: int) -> Optional[dict[str, Any]]:
    """This rank's saved RNG state, or None when the checkpoint came from a smaller world."""
    path = rng_file(folder, rank)
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    return state
