"""Initialisation's cost per rank: a 156M-parameter dense model built on the meta device, sharded with FSDP2 over N
CPU ranks (gloo) and materialized, each rank drawing only its shards (parallel/materialize.py). Per rank: the wall
and CPU time of the draw and the growth of the process's peak resident memory while it runs (Linux's VmHWM, reset
first), for N = 1 and N = 4. CPU time and memory should shrink about as 1/N (four ranks share the development
machine's two cores, so their wall time does not); before ranks drew their own blocks, every rank drew every whole
tensor on the CPU and kept its slice.

`python -m bench init`; about half a minute on the 2-core development machine.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any

import torch

# 156M parameters: 8 layers of d_model 1024 (GQA 16/4 heads, SwiGLU 2816) and a 32000-token vocabulary.
MODEL = dict(name="init_bench", n_layers=8, d_model=1024, n_heads=16, n_kv_heads=4, ffn_hidden=2816, vocab_size=32000)
RANKS = (1, 4)


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size


def _rank(rank: int, world: int, port: int, results: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from configs.schema import ModelConfig
    from models.transformer import build_model
    from parallel.materialize import materialize

    torch.set_num_threads(max(1, 2 // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    cfg = ModelConfig(**MODEL)
    model = build_model(cfg)
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    _reset_peak()
    before = _peak_resident_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    materialize(model, cfg, torch.device("cpu"), seed=0)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    results.put((rank, seconds, cpu_seconds, _peak_resident_bytes() - before))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's worker threads can abort a normal interpreter exit


def _run(world: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_rank, args=(r, world, port, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    rows = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    return {"seconds_per_rank": max(r[1] for r in rows), "cpu_seconds_per_rank": max(r[2] for r in rows),
            "peak_growth_gib_per_rank": max(r[3] for r in rows) / 2**30}


def run() -> dict[str, Any]:
    from configs.schema import ModelConfig
    from models.counts import num_params

    figures: dict[str, Any] = {"parameters": num_params(ModelConfig(**MODEL))}
    for world in RANKS:
        figures[f"ranks_{world}"] = _run(world)
    return figures
