"""How a run ends: a documented exit code and, on failure, one line naming the cause, the rank that saw it and the fix.

    0    finished
    1    an unforeseen error (a bug): its traceback, then the line
    2    bad input: config, data, checkpoint or environment; nothing already saved is touched
    3    training diverged: the loss or gradient norm was not finite (or the loss spiked) and train.nonfinite stopped it
    4    another rank failed or stalled; the line names it
    75   preempted (SIGTERM or SIGUSR1): the run saved a checkpoint at a step boundary; run it again to resume
    130  interrupted (Ctrl-C)

Every rank that fails reports, but a failure all ranks share is printed once: the first rank to fail publishes its
line in the job's store, and a later rank prints only a line that says something else (its own cause).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Optional

from configs.errors import ConfigError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER = 4
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

_FIRST_ERROR_KEY = "supertrain/first_error"


class Diverged(Exception):
    """The loss or gradient norm was not finite, or the loss spiked, and the policy says stop."""


class PeerFailure(Exception):
    """Another rank failed or stalled; the message names it."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived; the run saved (or tried to save) and stops."""


def is_ours(error: BaseException) -> bool:
    """A failure this package raised on purpose, with its line already written for the user."""
    return isinstance(error, (ConfigError, Diverged, PeerFailure, Preempted))


# What a collective says when its peer went away or never came: gloo's, NCCL's and HCCL's errors and timeouts.
_COLLECTIVE = re.compile(r"gloo|nccl|hccl|connection (closed|reset|refused)|broken pipe|timed out waiting|"
                         r"socket timeout", re.IGNORECASE)


def looks_collective(error: BaseException) -> bool:
    """Whether the error came out of a collective or the store (and so most likely from another rank's failure)."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, (RuntimeError, ConnectionError, TimeoutError)) and bool(_COLLECTIVE.search(str(error)))


def exit_code(error: BaseException) -> int:
    if isinstance(error, ConfigError):
        return EXIT_BAD_INPUT
    if isinstance(error, Diverged):
        return EXIT_DIVERGED
    if isinstance(error, PeerFailure):
        return EXIT_PEER
    if isinstance(error, Preempted):
        return EXIT_PREEMPTED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def _message(error: BaseException) -> str:
    if isinstance(error, (ConfigError, Diverged, PeerFailure, Preempted)):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{type(error).__name__}: {first} (an unexpected error, a bug: the traceback above says where; please "
            f"report it with this rank's log, run.dir/logs/rank_<r>.log)")


def error_line(error: BaseException, rank: Optional[int]) -> str:
    where = f"rank {rank}: " if rank is not None else ""
    kind = "stopped" if isinstance(error, (Preempted, KeyboardInterrupt)) else "error"
    return f"supertrain: {kind}: {where}{_message(error)}"


def report(error: BaseException, rank: int, distributed: bool, store: Optional[Any] = None,
           everyone: bool = True) -> int:
    """Print the failure's line where it is news and return its exit code.

    `store`: the job's key-value store, to print a failure that every rank shares once; `everyone` False means the
    error is the same on every rank by construction (the config), so rank 0 alone prints it."""
    line = error_line(error, rank if distributed else None)
    news = _news(store, rank, _message(error), collateral=isinstance(error, PeerFailure))
    if not distributed or (not everyone and rank == 0) or (everyone and news):
        _say(line)
    return exit_code(error)


def _say(line: str) -> None:
    """One write for the line and its newline: with PYTHONUNBUFFERED (common in containers) print() makes two, and
    another rank's output on the shared stderr can land between them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _news(store: Optional[Any], rank: int, message: str, collateral: bool) -> bool:
    """Whether this rank's failure is news: it is the first published, or (unless it is only the echo of another
    rank's, `collateral`) another rank's first says something else. Without a store (a process group not started
    yet) every rank says it."""
    if store is None:
        return True
    mine = f"{rank}\n{message}"
    try:
        first = store.compare_set(_FIRST_ERROR_KEY, "", mine).decode()
    except Exception:  # the store may have gone with the job: say it rather than stay silent
        return True
    return first == mine or (not collateral and first.split("\n", 1)[-1] != message)


def first_failure(store: Optional[Any]) -> Optional[str]:
    """The first failure another rank published, if any (a rank that is told to stop checks it: its peer's failure,
    not a preemption, is then why)."""
    if store is None:
        return None
    try:
        if not store.check([_FIRST_ERROR_KEY]):
            return None
        rank, _, message = store.get(_FIRST_ERROR_KEY).decode().partition("\n")
        return f"rank {rank}: {message}"
    except Exception:
        return None
