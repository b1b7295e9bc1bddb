"""The training loop: data in, optimizer steps out, with evaluation, metrics and checkpoints on schedule.

Parallelism is invisible here: an `Engine` (parallel/engine.py) runs each step, and the loop only decides which
sequences this data-parallel rank reads, what learning rate each step uses, and when to log, evaluate and save.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from configs.errors import ConfigError
from launch.device import Device
from models.counts import flops_per_token, num_params
from models.kernels import describe_kernels, matmul_kernels
from parallel.apply import build_engine, training_dtype
from parallel.dims import Meshes, ParallelDims
from parallel.engine import Batch, StepOutput
from train import checkpoint as ckpt
from train.config import Config, to_plain_dict
from train.data import GlobalBatchSampler, SequenceDataset, build_datasets, micro_batches, rank_slice
from train.metrics import Throughput, build_logger, format_line
from train.optim import WarmupDecay, build_optimizer

log = logging.getLogger("supertrain")


class Trainer:
    def __init__(
        self,
        cfg: Config,
        device: Device,
        dims: ParallelDims,
        run_dir: Path,
        rank: int = 0,
        local_rank: int = 0,
        mesh: Optional[Meshes] = None,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.torch_device = device.torch_device(local_rank)
        self.dims = dims
        self.rank = rank
        self.run_dir = run_dir
        # Checked first: a wrong checkpoint.resume must fail before minutes of set-up, not after.
        self.resume_path = ckpt.resolve_resume(run_dir / "checkpoints", cfg.checkpoint.resume)

        self.data = build_datasets(cfg.data, cfg.train.seq_len)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {self.data.vocab_size} ids: "
                f"raise model.vocab_size"
            )
        self.sampler = GlobalBatchSampler(len(self.data.train), cfg.train.global_batch, cfg.train.seed)
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

        torch.manual_seed(cfg.train.seed)
        self.engine = build_engine(cfg.model, cfg.parallel, cfg.train, device, dims, mesh, local_rank,
                                   lambda module: build_optimizer(module, cfg.optim))
        self.lr_schedule = WarmupDecay(cfg.optim, cfg.train.steps)
        self.step = 0

        self.checkpoints = ckpt.CheckpointManager(run_dir / "checkpoints", rank, barrier, cfg.checkpoint.keep_last)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        dtype = training_dtype(cfg.train.mixed_precision, device) or torch.float32
        # Before wandb starts: on CPU the peak is measured, and wandb's service process would compete for the cores.
        self.peak = device.peak_flops(dtype, matmul_kernels(dtype), cfg.device.peak_tflops)
        self.logger = build_logger(cfg.logging, rank, run_dir, to_plain_dict(cfg))
        self.throughput = Throughput(self.flops_per_token, self.peak.flops, dims.world_size, device.synchronize)
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len

        log.info(
            "model %s: %.2fM parameters (%.2fM active), %.3g training FLOPs/token; data: %s; %d train / %d val "
            "sequences; layout %s; %s, compute %s; MFU peak %s per device (%s)",
            cfg.model.name, num_params(cfg.model) / 1e6, num_params(cfg.model, active_only=True) / 1e6,
            self.flops_per_token, self.data.description, len(self.data.train), len(self.data.val), dims,
            f"{device}, {describe_kernels(device.kind)}", dtype,
            f"{self.peak.flops:.3g} FLOP/s" if self.peak.flops else "unknown, MFU not reported", self.peak.source,
        )

    # ---- data -----------------------------------------------------------------------------------------------

    def _rank_batches(self, dataset: SequenceDataset, global_indices: np.ndarray) -> list[Batch]:
        mine = rank_slice(global_indices, self.dp_rank, self.dims.dp)
        return [dataset.batch(mb) for mb in micro_batches(mine, self.cfg.train.micro_batch)]

    def _val_indices(self, batch_number: int) -> np.ndarray:
        g = self.cfg.train.global_batch
        return np.arange(batch_number * g, (batch_number + 1) * g) % len(self.data.val)

    # ---- steps ----------------------------------------------------------------------------------------------

    def train_step(self) -> StepOutput:
        batches = self._rank_batches(self.data.train, self.sampler.next_batch())
        output = self.engine.train_step(batches, self.lr_schedule.rate(self.step), self.cfg.train.grad_clip)
        self.step += 1
        return output

    def evaluate(self) -> float:
        total = 0.0
        for b in range(self.cfg.train.eval_batches):
            total += self.engine.evaluate(self._rank_batches(self.data.val, self._val_indices(b)))
        return total / self.cfg.train.eval_batches

    def _max_memory(self) -> int:
        # On the device: NCCL and HCCL take device tensors only.
        memory = torch.tensor(self.device.max_memory_bytes(), dtype=torch.int64, device=self.torch_device)
        if dist.is_initialized():
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        return int(memory)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        def write(folder: Path) -> None:
            self.engine.save(folder)
            ckpt.save_rng(folder, self.rank, self.device.rng_state())
            if self.rank == 0:
                ckpt.write_trainer_state(folder, {"step": self.step, "sampler": self.sampler.state_dict()})

        info = {"world_size": self.dims.world_size, "layout": str(self.dims), "engine": self.engine.kind,
                **self.engine.checkpoint_info()}
        path = self.checkpoints.save(self.step, write, info)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        info = ckpt.read_commit_info(path)
        if info.get("engine", "native") != self.engine.kind:
            raise ckpt.CheckpointError(
                f"{path} was written by the {info.get('engine')} engine and cannot load under dp_engine="
                f"{self.cfg.parallel.dp_engine.value}: resume with the engine that wrote it, or checkpoint.resume=none"
            )
        for key, value in self.engine.checkpoint_info().items():
            if info.get(key) != value:
                raise ckpt.CheckpointError(
                    f"{path} was saved with {key}={info.get(key)} and the {self.engine.kind} engine can only load it "
                    f"with the same {key} (this run: {value}): resume with the saving layout, or checkpoint.resume=none"
                )
        state = ckpt.read_trainer_state(path)
        self.engine.load(path)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        rng = ckpt.load_rng(path, self.rank)
        if rng is not None:
            self.device.set_rng_state(rng["device"])
        self.logger.log({"event": "resume", "from": str(path)}, self.step)
        log.info("resumed from %s at step %d (saved under %s)", path, self.step, info.get("layout"))

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        if every == 0:
            return False
        return self.step % every == 0 or (self.cfg.checkpoint.final and self.step == self.cfg.train.steps)

    # ---- loop -----------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        self.resume()
        cfg = self.cfg
        total = cfg.train.steps
        progress = _progress_bar(self.rank, self.step, total)
        last: dict[str, Any] = {}
        step_times: list[float] = []
        steps_logged = 0
        started = time.perf_counter()
        self.throughput.restart()
        while self.step < total:
            output = self.train_step()
            self.throughput.add(self.tokens_per_step)
            progress.update(1)
            metrics: dict[str, Any] = {}
            # Step 1 too: the starting loss is the first thing a user checks.
            if self.step % cfg.logging.every == 0 or self.step in (1, total):
                tokens_per_s, mfu = self.throughput.report()
                if steps_logged:  # the first interval holds warm-up: allocation, first collectives
                    step_times.append(self.tokens_per_step / tokens_per_s)
                steps_logged += 1
                metrics = {
                    **self.engine.step_metrics(output),
                    "lr": self.lr_schedule.rate(self.step - 1),
                    "tokens_per_s": tokens_per_s,
                    **({"mfu": mfu} if mfu is not None else {}),
                    "memory_bytes": self._max_memory(),
                }
                if not math.isfinite(metrics["loss"]):
                    log.warning("step %d: loss is %s", self.step, metrics["loss"])
            paused = False  # evaluation and checkpoint time stay out of tokens/s
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == total):
                metrics["val_loss"] = self.evaluate()
                paused = True
            if metrics:
                self.logger.log(metrics, self.step)
                log.info(format_line(self.step, total, metrics))
                last = {**last, **metrics}
            if self._checkpoint_due():
                self.save_checkpoint()
                paused = True
            if paused:
                self.throughput.restart()
        progress.close()
        last["wall_time_s"] = time.perf_counter() - started
        if step_times:
            last["step_time_s"] = statistics.median(step_times)
            predicted = cfg.parallel.predicted_step_s
            log.info("step time: measured %.3gs (median of logged intervals)%s", last["step_time_s"],
                     f", planner predicted {predicted:.3g}s" if predicted else "")
        self.logger.finish()
        self.summary = last
        return last


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(rank: int, initial: int, total: int) -> Any:
    if rank != 0 or not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False)

