"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine (or linear, or constant) LR schedule.

The schedule is a function of this run's config and the step alone: the trainer computes each step's rate and the
engine sets it, so a resumed run follows its own config's schedule and no scheduler state is checkpointed.
"""

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
    """LR multiplier at a 0-based step: linear warmup to 1, then decay to min_lr_ratio at total_steps.
    `rate(step)` is the learning rate of that step."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.warmup = cfg.warmup_steps
        self.total = total_steps
        self.floor = cfg.min_lr_ratio
        self.kind = cfg.schedule.value
        self.base = cfg.lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == LRSchedule.constant.value or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == LRSchedule.cosine.value else 1 - progress
        return self.floor + (1 - self.floor) * shape

    def rate(self, step: int) -> float:
        return self.base * self(step)
