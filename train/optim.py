"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine (or linear, or constant) LR schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from train.config import LRSchedule, OptimConfig


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay weight matrices (and expert weight stacks); leave norm scales and other vectors alone."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameter_groups(model.named_parameters(), cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )


class WarmupDecay:
    """LR multiplier at a 0-based step: linear warmup to 1, then decay to min_lr_ratio at total_steps."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.warmup = cfg.warmup_steps
        self.total = total_steps
        self.floor = cfg.min_lr_ratio
        self.kind = cfg.schedule.value

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == LRSchedule.constant.value or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == LRSchedule.cosine.value else 1 - progress
        return self.floor + (1 - self.floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule is a function of this run's config and the step only. Wrapping it in a plain function keeps
    LambdaLR from saving (and a resume from restoring) the schedule's settings: a run resumed with a longer
    train.steps follows the new schedule."""
    schedule = WarmupDecay(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Load the step count, then set the LR this config's schedule gives at that step (the optimizer state that was
    loaded carries the LR of the run that saved it)."""
    scheduler.load_state_dict(state)
    for group, base_lr, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
