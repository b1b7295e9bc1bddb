"""Trunk benchmark: how close one CPU process gets to this machine's matmul peak, and what the trainer costs.

1. Model FLOP rate: forward + backward of a small dense model (d_model 512, 4 layers, seq 512, fp32), counted as
   `flops_per_token` (6N + attention) x tokens/s, as a fraction of the best fp32 matmul rate (square matmuls of
   1024 and 2048) measured in the same round as the steps; the median over rounds is the figure. Target >= 0.9.
   Measured with 4 heads of 128 (the head width of every Llama 3 size) and, for comparison, 8 heads of 64:
   narrower heads make attention's matmuls less efficient.
2. Trainer overhead: the median step time of the full `train` loop (data sampling, accumulation, clipping, LR
   schedule, metrics) against a bare PyTorch loop over the same model, AdamW and batch, measured in the same run,
   alternating the two. Target <= 3%.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from launch.device import measure_matmul_flops
from models.config import flops_per_token
from models.transformer import build_model, materialize

D_MODEL = 512
MODEL = [
    "model.name=bench512",
    "model.n_layers=4",
    f"model.d_model={D_MODEL}",
    "model.ffn_hidden=1536",
    "model.vocab_size=512",
]
SEQ_LEN = 512
BATCH = 8
HEAD_DIMS = (128, 64)


def _config(head_dim: int = HEAD_DIMS[0]) -> Any:
    from train.config import load_config

    heads = D_MODEL // head_dim
    return load_config([
        *MODEL, f"model.n_heads={heads}", f"model.n_kv_heads={heads}", "device=cpu", "train.mixed_precision=fp32",
        f"train.seq_len={SEQ_LEN}", f"train.global_batch={BATCH}", f"train.micro_batch={BATCH}", "train.eval_every=0",
        "logging.mode=disabled", "logging.every=1", "checkpoint.every=0", "data.max_bytes=4000000",
    ])


def _peak() -> float:
    return max(measure_matmul_flops(torch.float32, size, repeats=10) for size in (1024, 2048))


def model_flop_rate(head_dim: int, rounds: int = 5, steps_per_round: int = 3) -> dict[str, float]:
    """Fraction of the matmul peak, measured in rounds that each time the peak and then a few model steps, so that
    drift in this machine's speed (the peak moved between 177 and 203 GFLOP/s across runs) hits both alike."""
    cfg = _config(head_dim)
    model = materialize(build_model(cfg.model), cfg.model, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ_LEN + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        start = time.perf_counter()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):  # the first passes pay for allocation
        step()
    flops_per_step = flops_per_token(cfg.model, SEQ_LEN) * BATCH * SEQ_LEN
    fractions, step_times, peaks = [], [], []
    for _ in range(rounds):
        peak = _peak()
        step_time = statistics.median(step() for _ in range(steps_per_round))
        fractions.append(flops_per_step / step_time / peak)
        step_times.append(step_time)
        peaks.append(peak)
    step_time = statistics.median(step_times)
    return {
        "heads": cfg.model.n_heads,
        "tokens_per_s": BATCH * SEQ_LEN / step_time,
        "model_flops_per_s": flops_per_step / step_time,
        "matmul_peak_flops_per_s": statistics.median(peaks),
        "fraction_of_matmul_peak": statistics.median(fractions),
        "fraction_lowest_round": min(fractions),
        "fraction_highest_round": max(fractions),
    }


def _bare_loop_step_times(cfg: Any, steps: int) -> list[float]:
    """The same model, AdamW settings and batches, with nothing around them."""
    from train.data import build_datasets
    from train.optim import build_optimizer

    model = materialize(build_model(cfg.model), cfg.model, torch.device("cpu"), seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim)
    data = build_datasets(cfg.data, cfg.train.seq_len)
    inputs, targets = data.train.batch(range(BATCH))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(inputs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[2:]


def _trainer_step_times(cfg: Any, steps: int, run_dir: str) -> list[float]:
    import json

    from launch.env import RankInfo
    from train.__main__ import prepare, train_with

    cfg.train.steps = steps
    cfg.run.dir = run_dir
    info = RankInfo(rank=0, local_rank=0, world_size=1)
    device, dims = prepare(cfg, info)
    trainer = train_with(cfg, info, device, dims)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = BATCH * SEQ_LEN
    return [tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]


def trainer_overhead(steps: int = 8, rounds: int = 2) -> dict[str, float]:
    import tempfile

    cfg = _config()
    bare, full = [], []
    for round_index in range(rounds):  # alternate, so that drift in machine speed hits both alike
        bare += _bare_loop_step_times(cfg, steps)
        full += _trainer_step_times(_config(), steps, tempfile.mkdtemp(prefix=f"bench-trainer-{round_index}-"))
    bare_step, full_step = statistics.median(bare), statistics.median(full)
    return {"bare_step_s": bare_step, "trainer_step_s": full_step, "overhead": full_step / bare_step - 1}


def run() -> dict[str, Any]:
    rates = {f"head_dim_{dim}": model_flop_rate(dim) for dim in HEAD_DIMS}
    return {
        "threads": torch.get_num_threads(),
        "model_flop_rate": rates,
        "trainer_overhead": trainer_overhead(),
    }
