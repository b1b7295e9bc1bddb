"""A training engine owns the (parallelized) model, its optimizer and LR schedule, and runs one optimizer step over
a list of micro-batches. The trainer talks only to this interface, so DDP, FSDP2, TP, PP and DeepSpeed differ
here and not in the loop.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from launch.device import Device
from train.optim import restore_scheduler

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (micro_batch, seq_len)


class Engine(Protocol):
    kind: str
    model: nn.Module

    def train_step(self, batches: list[Batch], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over every micro-batch, clip, step. Returns (this rank's loss share, grad norm):
        the loss share summed over the ranks of `loss_group` is the global-batch mean loss."""

    def eval_loss(self, batches: list[Batch]) -> torch.Tensor: ...

    def reduce_loss(self, local: torch.Tensor) -> float: ...

    def lr(self) -> float: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...

    def checkpoint_info(self) -> dict[str, Any]: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns when it runs without a process group; for a one-process run that is exactly what we want."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class NativeEngine:
    """Plain torch model and optimizer; DDP / FSDP2 / TP wrappers are applied to the model before it gets here."""

    kind = "native"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: Device,
        autocast_dtype: Optional[torch.dtype],
        loss_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.autocast_dtype = autocast_dtype
        # Ranks whose loss shares add up to the global loss (the data-parallel group); None = this process alone.
        self.loss_group = loss_group
        self.torch_device = next(model.parameters()).device

    def _loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = (t.to(self.torch_device, non_blocking=True) for t in batch)
        with self.device.autocast(self.autocast_dtype):
            logits = self.model(inputs)
        return token_cross_entropy(logits, targets)

    def _no_grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, batches: list[Batch], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train()
        total = torch.zeros((), device=self.torch_device)
        for i, batch in enumerate(batches):
            with self._no_grad_sync(last=i == len(batches) - 1):
                loss = self._loss(batch) / len(batches)
                loss.backward()
            total += loss.detach()
        grad_norm = self.clip_grad_norm(grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self._loss_ranks(), grad_norm

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (DTensor gradients are reduced across their mesh), clipped to max_norm if > 0."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        self.model.eval()
        total = sum((self._loss(batch) for batch in batches), torch.zeros((), device=self.torch_device))
        return total / (len(batches) * self._loss_ranks())

    def _loss_ranks(self) -> int:
        return dist.get_world_size(self.loss_group) if self.loss_group is not None else 1

    def reduce_loss(self, local: torch.Tensor) -> float:
        if self.loss_group is not None:
            local = local.clone()
            dist.all_reduce(local, group=self.loss_group)  # SUM: gloo has no AVG
        return float(local)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoint -----------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def extra_state(self) -> dict[str, Any]:
        return {"lr_scheduler": self.scheduler.state_dict()}

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint must match to load under this engine: nothing, DCP reshards to any layout."""
        return {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole, on every rank (a collective under FSDP/TP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))

    def load_extra_state(self, state: dict[str, Any]) -> None:
        restore_scheduler(self.scheduler, state["lr_scheduler"])
