"""Run a function on N real ranks: separate processes (spawned), a gloo process group over TCP on a free port, a hard
timeout, and each rank's output collected.

    results = run_ranks(fn, world_size=4, args=(...,))   # fn must be importable (module level)

Each rank runs `fn(*args)` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* set and the default process group
already initialized; its return value (picklable) comes back in rank order. A rank that raises, dies, or a group
that does not finish within `timeout` seconds fails the calling test with every rank's output, instead of hanging
CI. Ranks end the way launch.env.shutdown does (barrier, destroy the group, flush, os._exit) because gloo can
otherwise abort the interpreter at exit after DTensor / FSDP / DCP work.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn: Callable, args: tuple, rank: int, world_size: int, port: int, results: Any, log_dir: str,
               threads: int) -> None:
    log = open(Path(log_dir) / f"rank_{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
    })
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
        # Plain pickle to bytes: torch.multiprocessing would pass tensors as shared-memory handles, which die with
        # this process at os._exit before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
        dist.barrier()
    except BaseException:
        code = 1
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        results.close()
        results.join_thread()  # the queue writes from a background thread: let it finish before os._exit
        log.flush()
        os._exit(code)


def _logs(log_dir: str, world_size: int, tail: int = 60) -> str:
    parts = []
    for rank in range(world_size):
        path = Path(log_dir) / f"rank_{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no output)"
        parts.append(f"----- rank {rank} -----\n" + "\n".join(text.splitlines()[-tail:]))
    return "\n".join(parts)


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300, threads: int = 1) -> list[Any]:
    """fn(*args) on world_size gloo ranks; returns their results in rank order or fails with their output."""
    context = mp.get_context("spawn")
    results = context.Queue()
    log_dir = tempfile.mkdtemp(prefix="ranks-")
    port = free_port()
    procs = [
        context.Process(target=_rank_main, args=(fn, args, r, world_size, port, results, log_dir, threads), daemon=True)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    deadline = time.time() + timeout
    failure = None
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue_module.Empty:
                if time.time() > deadline:
                    failure = f"timed out after {timeout}s (a hang?); finished ranks: {sorted(collected)}"
                    break
                dead = [p for r, p in enumerate(procs) if r not in collected and p.exitcode not in (None, 0)]
                if dead:
                    # Give the queue a moment: a rank may have reported its error just before exiting.
                    time.sleep(1.0)
                    while not results.empty():
                        rank, status, value = results.get()
                        collected[rank] = (status, value)
                    failure = f"rank(s) died: exit codes {[p.exitcode for p in procs]}"
                    break
                continue
            collected[rank] = (status, value)
            if status == "error":
                failure = f"rank {rank} raised:\n{value}"
                break
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.time()) if failure is None else 5.0)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failure is None and any(p.exitcode != 0 for p in procs):
        failure = f"ranks exited with codes {[p.exitcode for p in procs]} after returning"
    if failure is not None:
        raise AssertionError(f"{failure}\n{_logs(log_dir, world_size)}")
    return [pickle.loads(collected[r][1]) for r in range(world_size)]
