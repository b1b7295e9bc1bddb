"""The run folder: chosen once for every rank, checked to be writable, locked while a run uses it, and its
config.yaml written only once the run has started cleanly.

The lock is an flock on `run.dir/.lock`, held by rank 0 for the life of its process: a second job on the same folder
stops at start-up with one line naming the first (host, pid, start time), while a restart of the same job, whose
previous processes are gone, takes the lock again (the kernel releases it with the process). flock is advisory and,
on some network filesystems, local to a node; the line in the lock file still names the holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from configs.errors import ConfigError

log = logging.getLogger("supertrain")
LOCK_FILE = ".lock"
# The open lock files of this process by folder: a lock lasts as long as its file stays open, and a second flock
# from this same process (a second run in one process, as the tests make) would otherwise refuse its own lock.
_held: dict[Path, Any] = {}


class RunDirError(ConfigError):
    """run.dir cannot be used: not writable, or in use by another run."""


def claim(run_dir: Path) -> None:
    """Make run.dir (and its logs/ folder) and lock it for this process; RunDirError with one line otherwise."""
    run_dir = run_dir.absolute()
    if run_dir in _held:
        return
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as error:
        raise RunDirError(f"run.dir={run_dir} cannot be used: {error.strerror or error}: choose a writable folder "
                          f"(run.dir=...)") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"run.dir={run_dir} is in use by another run ({holder}): wait for it to finish, or give this "
                          f"run its own run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held[run_dir] = handle


def release(run_dir: Path) -> None:
    """Unlock run.dir (a finished run; a process that ends releases its locks anyway)."""
    handle = _held.pop(run_dir.absolute(), None)
    if handle is not None:
        handle.close()


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write run.dir/config.yaml; a different one from an earlier start of this run is kept as config.<n>.yaml and
    the keys that changed are named in one line (a resumed run follows the new values)."""
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if path.is_file():
        old_text = path.read_text()
        if old_text == text:
            return
        changed = _changed_keys(yaml.safe_load(old_text) or {}, config)
        number = 1 + sum(1 for _ in run_dir.glob("config.*.yaml"))
        path.rename(run_dir / f"config.{number}.yaml")
        if changed:
            log.warning("this start's config differs from the last one in %s (kept as config.%d.yaml): %s", run_dir,
                        number, ", ".join(changed))
    spare = path.with_name("config.yaml.tmp")
    spare.write_text(text)
    os.replace(spare, path)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed += _changed_keys(before, after, f"{prefix}{key}.")
        elif before != after:
            changed.append(f"{prefix}{key} {json.dumps(before)} -> {json.dumps(after)}")
    return changed
