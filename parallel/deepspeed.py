"""DeepSpeed ZeRO 1-3 as a data-parallel engine, configured from the Hydra config (no hand-written JSON).

We hand DeepSpeed our own model and AdamW, and set each step's learning rate on it, so the optimizer math is the same
as under DDP/FSDP and the runs can be compared step for step. DeepSpeed owns gradient accumulation (it scales the loss
by 1/accumulation and steps at the boundary) and clipping. Checkpoints use DeepSpeed's own format, which loads only under DeepSpeed with
the same world size and ZeRO stage; the commit marker records both, so a mismatch is refused up front.

The model is materialized whole on every rank before ZeRO partitions it: fine up to models that fit one device;
larger models belong to FSDP2, which shards on the meta device.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from configs.errors import CheckpointError, ConfigError
from launch.device import Device
from parallel.context import BatchSplit
from parallel.engine import Batch, EngineBase, StepCheck, StepOutput, set_learning_rate


def require_deepspeed() -> None:
    """DeepSpeed is an optional extra: say how to get it, in one line, before any process group starts."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.dp_engine=deepspeed needs DeepSpeed, which is not installed: "
                          "pip install 'supertrain[deepspeed]', or use parallel.dp_engine=fsdp")


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


class DeepSpeedEngine(EngineBase):
    """ZeRO over every rank: the loss, evaluation, reductions and MoE balancing are `EngineBase`'s; DeepSpeed runs
    backward, accumulation, clipping and the optimizer step. It divides each micro-batch's loss by the accumulation
    steps before backward, as the MoE auxiliary loss expects (parallel/apply.py)."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: Device,
                 config: dict[str, Any], split: BatchSplit = BatchSplit()) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.config = config
        self.optimizer = optimizer
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                    dist_init_required=False)
        world = dist.group.WORLD
        # DeepSpeed's bf16 mode casts the model itself: no autocast.
        super().__init__([self.engine.module], device, self.engine.device, autocast_dtype=None, loss_group=world,
                         data_group=world, split=split)

    def _forward(self, inputs: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.engine(inputs, **extra)

    def _train_mode(self, training: bool) -> None:
        self.engine.train(training)

    def train_step(self, batches: list[Batch], lr: float, grad_clip: float,
                   check: Optional[StepCheck] = None) -> StepOutput:
        """DeepSpeed steps inside its engine, so `check` sees the step after it was applied: it can stop the run or
        roll it back, not drop the update (train.nonfinite=skip is refused with DeepSpeed)."""
        self._train_mode(True)
        set_learning_rate([self.optimizer], lr)
        total = torch.zeros((), device=self.torch_device)
        for batch in batches:
            loss = self._loss(batch)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.engine.step()  # a real optimizer step only at the accumulation boundary; clips to grad_clip
            total += loss.detach() / len(batches)
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm), device=self.torch_device)
        output = StepOutput(total / self._loss_ranks(), norm)
        if check is not None:
            check(output.loss_share, norm)
        self._after_optimizer_step()
        return output

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}: it holds no DeepSpeed files")

    def checkpoint_info(self) -> dict[str, Any]:
        """DeepSpeed's files load only into the same world size and ZeRO stage."""
        return {"world_size": dist.get_world_size(), "zero_stage": self.config["zero_optimization"]["stage"]}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on every rank (gathering ZeRO-3 partitions); for tests and inspection."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.config["zero_optimization"]["stage"] == 3):
            return {name: p.detach().clone() for name, p in self.model.named_parameters()}
