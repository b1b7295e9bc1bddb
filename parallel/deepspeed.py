"""DeepSpeed ZeRO 1-3 as a data-parallel engine, configured from the Hydra config (no hand-written JSON).

We hand DeepSpeed our own model, AdamW and LR schedule, so the optimizer math is the same as under DDP/FSDP and the
runs can be compared step for step. DeepSpeed owns gradient accumulation (it scales the loss by 1/accumulation and
steps at the boundary) and clipping. Checkpoints use DeepSpeed's own format, which loads only under DeepSpeed with
the same world size and ZeRO stage; the commit marker records both, so a mismatch is refused up front.

The model is materialized whole on every rank before ZeRO partitions it: fine up to models that fit one device;
larger models belong to FSDP2, which shards on the meta device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from launch.device import Device
from models.moe import set_aux_loss_scale, update_load_balance
from train.optim import restore_scheduler
from parallel.engine import Batch, token_cross_entropy


def _sum_over_world(stats: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(stats)  # ZeRO is data parallel over every rank
    return stats


def deepspeed_config(
    global_batch: int, micro_batch: int, accumulation: int, grad_clip: float, zero_stage: int,
    bf16: bool,
) -> dict[str, Any]:
    """The DeepSpeed config for one run, derived from ours."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # Our trainer logs; DeepSpeed's own periodic prints would duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: Device,
        config: dict[str, Any],
    ) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.scheduler = scheduler
        self.device = device
        self.config = config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.model = self.engine.module
        self.torch_device = self.engine.device
        self.autocast_dtype: Optional[torch.dtype] = None  # DeepSpeed's bf16 mode casts the model itself
        self._routing_metrics: dict[str, Any] = {}

    def _loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = (t.to(self.torch_device) for t in batch)
        return token_cross_entropy(self.engine(inputs), targets)

    def train_step(self, batches: list[Batch], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.engine.train()
        # DeepSpeed divides each micro-batch loss by the accumulation steps; the MoE auxiliary gradient must match.
        set_aux_loss_scale(self.model, 1.0 / len(batches))
        total = torch.zeros((), device=self.torch_device)
        for batch in batches:
            loss = self._loss(batch)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.engine.step()  # a real optimizer step only at the accumulation boundary
            total += loss.detach() / len(batches)
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        self._routing_metrics = update_load_balance(self.model, _sum_over_world)
        return total / dist.get_world_size(), norm

    def routing_metrics(self) -> dict[str, Any]:
        return self._routing_metrics

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        self.engine.eval()
        total = sum((self._loss(batch) for batch in batches), torch.zeros((), device=self.torch_device))
        return total / (len(batches) * dist.get_world_size())

    def reduce_loss(self, local: torch.Tensor) -> float:
        local = local.clone()
        dist.all_reduce(local)
        return float(local)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            from train.checkpoint import CheckpointError

            raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}: it holds no DeepSpeed files")

    def extra_state(self) -> dict[str, Any]:
        return {"lr_scheduler": self.scheduler.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        restore_scheduler(self.scheduler, state["lr_scheduler"])

    def checkpoint_info(self) -> dict[str, Any]:
        """DeepSpeed's files load only into the same world size and ZeRO stage."""
        return {"world_size": dist.get_world_size(), "zero_stage": self.config["zero_optimization"]["stage"]}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on every rank (gathering ZeRO-3 partitions)."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.config["zero_optimization"]["stage"] == 3):
            return {name: p.detach().clone() for name, p in self.model.named_parameters()}
