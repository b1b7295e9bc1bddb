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
from models.kernels import kernels_for
from parallel.apply import build_engine, training_dtype
from parallel.dims import Meshes, ParallelDims
from parallel.engine import Batch, StepOutput
from train import checkpoint as ckpt
from train.config import Config, to_plain_dict
from train.data import GlobalBatchSampler, SequenceDataset, build_datasets, micro_batches, rank_slice
from train.metrics import Throughput, build_logger, format_line
from train.failures import Diverged, Preempted
from train.guard import StepGuard
from train.hf.export import export_hf
from train.hf.load import check_hf_config, load_hf_weights
from train.optim import WarmupDecay, build_optimizer
from train.preempt import PreemptionNotice
from train.rundir import write_config

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
        notice: Optional[PreemptionNotice] = None,
        progress: Callable[[int, str], None] = lambda step, phase: None,
    ) -> None:
        """`notice`: the preemption signals' flag (train/preempt.py); `progress(step, phase)`: what the rank is doing,
        for the stalled-rank watch (launch/heartbeat.py)."""
        self.cfg = cfg
        self.device = device
        self.torch_device = device.torch_device(local_rank)
        self.dims = dims
        self.rank = rank
        self.run_dir = run_dir
        # Checked first: a wrong checkpoint.resume must fail before minutes of set-up, not after.
        self.resume_path = ckpt.resolve_resume(run_dir / "checkpoints", cfg.checkpoint.resume)
        self.hf_folder = Path(cfg.checkpoint.init_from_hf) if cfg.checkpoint.init_from_hf else None
        if self.hf_folder is not None and self.resume_path is None:
            check_hf_config(self.hf_folder, cfg.model)  # a mismatch stops before the data and the model are built

        self.data = build_datasets(cfg.data, cfg.train.seq_len)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {self.data.vocab_size} ids: "
                f"raise model.vocab_size"
            )
        self.sampler = GlobalBatchSampler(len(self.data.train), cfg.train.global_batch, cfg.train.seed)
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0

        torch.manual_seed(cfg.train.seed)
        self.kernels = kernels_for(device.kind, cfg.device.kernels, cfg.device.fused.enabled())
        document_end = self.data.eos_id if cfg.data.reset_attention_at_eod else None
        self.engine = build_engine(cfg.model, cfg.parallel, cfg.train, device, dims, mesh, local_rank,
                                   lambda module: build_optimizer(module, cfg.optim), self.kernels, document_end)
        self.lr_schedule = WarmupDecay(cfg.optim, cfg.train.steps)
        self.step = 0
        self.notice = notice
        self.progress = progress
        self._warm = False
        world = dist.group.WORLD if dist.is_initialized() else None
        self.guard = StepGuard(cfg.train, notice, self.torch_device, world, self.engine.global_loss)
        # Batches left out after rollbacks, kept across the reloads that would forget them.
        self.left_out: set[tuple[int, int]] = set()

        self.checkpoints = ckpt.CheckpointManager(run_dir / "checkpoints", rank, barrier, cfg.checkpoint.keep_last)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        dtype = training_dtype(cfg.train.mixed_precision, device) or torch.float32
        # Before wandb starts: on CPU the peak is measured, and wandb's service process would compete for the cores.
        self.peak = device.peak_flops(dtype, self.kernels.matmul_kernels(dtype), cfg.device.peak_tflops)
        self.logger = build_logger(cfg.logging, rank, run_dir, to_plain_dict(cfg))
        self.throughput = Throughput(self.flops_per_token, self.peak.flops, dims.world_size, device.synchronize)
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len

        log.info(
            "model %s: %.2fM parameters (%.2fM active), %.3g training FLOPs/token; data: %s; %d train / %d val "
            "sequences; layout %s; %s, compute %s; MFU peak %s per device (%s)",
            cfg.model.name, num_params(cfg.model) / 1e6, num_params(cfg.model, active_only=True) / 1e6,
            self.flops_per_token, self.data.description, len(self.data.train), len(self.data.val), dims,
            f"{device}, {self.kernels.describe()}", dtype,
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

    def train_step(self) -> Optional[StepOutput]:
        """One optimizer step, guarded (train/guard.py); None when the step was rolled back."""
        # The first step of a process also builds kernels, compiles and connects: the watch gives it longer.
        self.progress(self.step + 1, "train step" if self._warm else "first step")
        batches = self._rank_batches(self.data.train, self.sampler.next_batch())
        lr = self.lr_schedule.rate(self.step)
        output = self.engine.train_step(batches, lr, self.cfg.train.grad_clip, self.guard.check)
        action = self.guard.after_step(self.step + 1, lr)  # raises Diverged where the policy says stop
        if action == "rollback":
            self._rollback()
            return None
        self.step += 1
        self._warm = True
        if action == "skip":
            log.warning("step %d: %s: its update was dropped (train.nonfinite=skip)", self.step, self.guard.last.reason)
            self.logger.log({"event": "skipped", "reason": self.guard.last.reason}, self.step)
        return output

    def evaluate(self) -> float:
        total = 0.0
        for b in range(self.cfg.train.eval_batches):
            self.progress(self.step, "evaluation")
            total += self.engine.evaluate(self._rank_batches(self.data.val, self._val_indices(b)))
        return total / self.cfg.train.eval_batches

    def _max_memory(self) -> int:
        # On the device: NCCL and HCCL take device tensors only.
        memory = torch.tensor(self.device.max_memory_bytes(), dtype=torch.int64, device=self.torch_device)
        if dist.is_initialized():
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        return int(memory)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _parameters_finite(self) -> bool:
        """Whether every rank's parameters are finite (agreed across ranks): a checkpoint is never written from
        non-finite state."""
        bad = torch.zeros((), device=self.torch_device)
        for part in self.engine.parts:
            for param in part.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                if local.numel():
                    bad = torch.maximum(bad, (~torch.isfinite(local.detach())).any().float())
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad)

    def save_checkpoint(self) -> Path:
        self.progress(self.step, "checkpoint save")
        if not self._parameters_finite():
            raise Diverged(f"step {self.step}: the parameters are not finite, so no checkpoint was written (the last "
                           f"one is intact): lower optim.lr")

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
            if self.hf_folder is not None:
                self._import_hf(self.hf_folder)
            return
        self._load(path)
        if self.step >= self.cfg.train.steps:
            raise ConfigError(f"train.steps={self.cfg.train.steps} is not beyond step {self.step} of the checkpoint "
                              f"{path}: raise train.steps to train on, or start afresh with checkpoint.resume=none")
        log.info("resumed from %s at step %d (saved under %s)", path, self.step,
                 ckpt.read_commit_info(path).get("layout"))

    def _import_hf(self, folder: Path) -> None:
        self.progress(self.step, "checkpoint load")
        report = load_hf_weights(self.engine.parts, self.cfg.model, folder)
        log.info("started from the Hugging Face checkpoint %s: %d tensors, %.3g GB read by rank %d in %.1fs%s", folder,
                 report.tensors, report.bytes_read / 1e9, self.rank, report.seconds,
                 f"; left alone: {len(report.ignored)} tensors of modules not modelled (e.g. {report.ignored[0]})"
                 if report.ignored else "")

    def export_hf(self, out: Optional[Path] = None) -> Path:
        """Write the model as a Hugging Face folder (default run.dir/hf). A collective: every rank calls it."""
        self.progress(self.step, "checkpoint")
        out = out or self.run_dir / "hf"
        export_hf(self.engine.parts, self.cfg.model, out, self.cfg.checkpoint.export_hf_dtype, self.hf_folder)
        log.info("exported the model at step %d to %s (Hugging Face format, %s)", self.step, out,
                 self.cfg.checkpoint.export_hf_dtype)
        return out

    def _started_cleanly(self, resumed_at: int) -> None:
        """After the first step of this start: only now does the run folder change (config.yaml, the metrics rows
        after the checkpoint), so a start that fails on its checkpoint, its data or its first step leaves an existing
        run as it was."""
        if self.rank == 0:
            write_config(self.run_dir, to_plain_dict(self.cfg))
        if self.resume_path is not None:
            self.logger.rewind(resumed_at)  # the steps after the checkpoint are logged again as they are run again
            self.logger.log({"event": "resume", "from": str(self.resume_path)}, resumed_at)

    def _rollback(self) -> None:
        """Reload the newest intact checkpoint, and leave out from then on the batch that just failed."""
        failed_step, reason = self.step + 1, self.guard.last.reason
        self.left_out.add(self.sampler.last_position)
        path = ckpt.newest_intact(self.run_dir / "checkpoints")
        if path is None:
            raise Diverged(f"step {failed_step}: {reason}, and there is no checkpoint to roll back to: lower optim.lr, "
                           f"or save earlier (checkpoint.every)")
        self._load(path)
        self.sampler.leave_out(self.left_out)
        self.guard.forget_losses()
        epoch, offset = self.sampler.last_position
        log.warning("step %d: %s: rolled back to %s (step %d); that batch is left out from now on", failed_step,
                    reason, path.name, self.step)
        self.logger.rewind(self.step)
        self.logger.log({"event": "rollback", "failed_step": failed_step, "reason": reason, "to": str(path),
                         "left_out": sorted(self.left_out)}, self.step)

    def _load(self, path: Path) -> None:
        self.progress(self.step, "checkpoint load")
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

    def _stop_for_preemption(self) -> None:
        """Every rank agreed at this step that a stop signal arrived: save here (unless just saved) and stop."""
        signal_name = self.notice.received[0] if self.notice and self.notice.received else "a stop signal"
        path = self.run_dir / "checkpoints" / f"step_{self.step}"
        if not ckpt.is_committed(path):
            path = self.save_checkpoint()
        if self.notice is not None:
            self.notice.saved()
        self.logger.log({"event": "preempted", "signal": signal_name}, self.step)
        self.logger.finish()
        raise Preempted(f"{signal_name} received: saved {path} at step {self.step}; run the same command again to "
                        f"resume from it")

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        if every == 0:
            return False
        return self.step % every == 0 or (self.cfg.checkpoint.final and self.step == self.cfg.train.steps)

    # ---- loop -----------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        self.resume()
        resumed_at, first = self.step, True
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
            if output is None:  # rolled back: the step counter went back with the checkpoint
                progress = _progress_bar(self.rank, self.step, total) if self.rank == 0 else progress
                self.throughput.restart()
                continue
            if first:
                self._started_cleanly(resumed_at)
                first = False
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
            if self.guard.last.preempt:
                self._stop_for_preemption()
            if paused:
                self.throughput.restart()
        progress.close()
        if cfg.checkpoint.export_hf:
            self.export_hf()
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

