"""Importing a Hugging Face checkpoint on N ranks: bytes read, per-rank peak host memory and throughput.

A 156M-parameter Llama-style model is exported once as a bf16 Hugging Face folder (312 MB, sharded safetensors).
Then, for N = 1, 2 and 4 CPU ranks (gloo), each rank builds the model on the meta device, shards it with FSDP2,
allocates its shards and imports (train/hf/load.py). Per rank: bytes read, the wall time, and the growth of the
process's peak resident memory (Linux's VmHWM, reset first) over allocation plus import; the pages of the
memory-mapped files a rank touches count as resident too. Before each N the files are dropped from the page cache
(posix_fadvise DONTNEED), so the first read comes from the disk where the kernel honours it; the disk's own rate is
measured the same way, reading the files once sequentially.

`python -m bench hf_import`; about a minute on the 2-core development machine.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.init import MODEL, _peak_resident_bytes, _reset_peak

RANKS = (1, 2, 4)


def _drop_from_page_cache(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _disk_read_rate(folder: Path) -> float:
    """Bytes per second reading every file once, sequentially, in 16 MB pieces, after dropping them from the cache."""
    _drop_from_page_cache(folder)
    total, started = 0, time.perf_counter()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as handle:
            while chunk := handle.read(16 * 2**20):
                total += len(chunk)
    return total / (time.perf_counter() - started)


def _export(folder: Path) -> int:
    from configs.schema import ModelConfig
    from models.transformer import build_model
    from parallel.materialize import materialize
    from train.hf.export import export_hf

    cfg = ModelConfig(**MODEL)
    model = materialize(build_model(cfg), cfg, torch.device("cpu"), seed=0)
    export_hf([model], cfg, folder, "bfloat16", shard_bytes=64 * 2**20)
    return sum(p.numel() for p in model.parameters())


def _rank(rank: int, world: int, port: int, folder: str, results: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from configs.schema import ModelConfig
    from models.transformer import build_model
    from train.hf.load import load_hf_weights

    torch.set_num_threads(max(1, 2 // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    cfg = ModelConfig(**MODEL)
    model = build_model(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dist.barrier()
    _reset_peak()
    before = _peak_resident_bytes()
    started = time.perf_counter()
    model.to_empty(device=torch.device("cpu"))
    report = load_hf_weights([model], cfg, Path(folder))
    seconds = time.perf_counter() - started
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    results.put((rank, seconds, report.bytes_read, _peak_resident_bytes() - before, shard))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _import_on(world: int, folder: Path) -> list[tuple]:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank, args=(r, world, port, str(folder), results)) for r in range(world)]
    for proc in procs:
        proc.start()
    rows = sorted(results.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return rows


def run() -> dict:
    from train.hf.files import SafetensorsFolder

    with tempfile.TemporaryDirectory(prefix="hf_import_") as tmp:
        folder = Path(tmp) / "model"
        parameters = _export(folder)
        checkpoint_bytes = SafetensorsFolder(folder).tensor_bytes()
        figures: dict[str, Any] = {
            "parameters": parameters,
            "checkpoint_mb": checkpoint_bytes / 1e6,
            "largest_tensor_mb": 32000 * 1024 * 2 / 1e6,  # the embedding (and the head), bf16 in the file
            "disk_read_mb_per_s": _disk_read_rate(folder) / 1e6,
        }
        for world in RANKS:
            _drop_from_page_cache(folder)
            rows = _import_on(world, folder)
            seconds = max(row[1] for row in rows)
            read = sum(row[2] for row in rows)
            figures[f"ranks_{world}"] = {
                "read_all_ranks_over_checkpoint": read / checkpoint_bytes,
                "read_per_rank_mb": max(row[2] for row in rows) / 1e6,
                "shard_per_rank_mb": max(row[4] for row in rows) / 1e6,
                "peak_growth_per_rank_mb": max(row[3] for row in rows) / 1e6,
                "seconds": seconds,
                "import_mb_per_s": checkpoint_bytes / seconds / 1e6,
            }
    return figures
