"""The step guard: decides once per step, identically on every rank, whether the step's update may be applied, and
carries the preemption notice to every rank at the same step.

After backward and clipping, before the optimizer steps, the engine hands the guard the step's gradient norm (the
norm of all gradients as if on one device: the same value on every rank). The guard sends one small all-reduce over
the world, [norm not finite, preemption asked], and reads it back: the step's one host synchronisation. With loss-spike
detection on (train.spike_sigmas > 0) it also sums the step's loss over the ranks that hold it and compares it with the
mean and spread of the previous train.spike_window losses.

A bad step is never applied. What happens then is train.nonfinite: stop (Diverged, exit 3), skip (the update is
dropped; more than max_skips in a row stop the run), or rollback (the trainer reloads the newest checkpoint and leaves
the batch out; more than max_rollbacks stop the run).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from configs.schema import NonFinite, TrainConfig
from train.failures import Diverged
from train.preempt import PreemptionNotice


@dataclass
class Verdict:
    apply: bool = True
    reason: str = ""  # why not
    preempt: bool = False


class StepGuard:
    def __init__(self, cfg: TrainConfig, notice: Optional[PreemptionNotice], device: torch.device,
                 world: Optional[dist.ProcessGroup], global_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.cfg = cfg
        self.notice = notice
        self.device = device
        self.world = world
        self.global_loss = global_loss
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.skips_in_a_row = 0
        self.rollbacks = 0
        self.last: Verdict = Verdict()

    def check(self, loss_share: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether to apply this step's update (the engine's callback); the verdict is kept in `last`."""
        preempt = 1.0 if self.notice is not None and self.notice.requested() else 0.0
        flags = torch.stack([(~torch.isfinite(grad_norm.detach().float())).float(),
                             torch.tensor(preempt, device=grad_norm.device)]).to(self.device)
        if self.world is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.world)
        nonfinite, preempt_agreed = (bool(v) for v in flags.tolist())
        reason = f"the gradient norm is {grad_norm.item():g}" if nonfinite else ""
        if not reason and self.cfg.spike_sigmas > 0:
            reason = self._spike(float(self.global_loss(loss_share)))
        self.last = Verdict(not reason, reason, preempt_agreed)
        return self.last.apply

    def _spike(self, loss: float) -> str:
        if not math.isfinite(loss):
            return f"the loss is {loss:g}"
        if len(self.losses) == self.losses.maxlen:
            mean, spread = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            limit = mean + self.cfg.spike_sigmas * spread
            if loss > limit:
                return (f"the loss spiked to {loss:.4g} (the last {len(self.losses)} steps: mean {mean:.4g}, standard "
                        f"deviation {spread:.3g}; limit {limit:.4g} at train.spike_sigmas={self.cfg.spike_sigmas:g})")
        self.losses.append(loss)
        return ""

    def after_step(self, step: int, lr: float) -> str:
        """What the trainer does with the verdict of the step just run: "" (go on), "skip" (dropped, go on) or
        "rollback"; raises Diverged when the policy, or its bound, says stop."""
        verdict = self.last
        if verdict.apply:
            self.skips_in_a_row = 0
            return ""
        what = f"step {step}: {verdict.reason} (lr {lr:.3g})"
        policy = self.cfg.nonfinite
        if policy == NonFinite.skip:
            self.skips_in_a_row += 1
            if self.skips_in_a_row > self.cfg.max_skips:
                raise Diverged(f"{what}, the {self.skips_in_a_row}th step in a row without an update "
                               f"(train.max_skips={self.cfg.max_skips}): lower optim.lr or train.grad_clip")
            return "skip"
        if policy == NonFinite.rollback:
            self.rollbacks += 1
            if self.rollbacks > self.cfg.max_rollbacks:
                raise Diverged(f"{what}, after {self.cfg.max_rollbacks} rollbacks (train.max_rollbacks): lower "
                               f"optim.lr or train.grad_clip")
            return "rollback"
        raise Diverged(f"{what}: the update was not applied and no checkpoint was written from it; lower optim.lr or "
                       f"train.grad_clip, or set train.nonfinite=skip or rollback")

    def forget_losses(self) -> None:
        """After a rollback the losses before it are not this run's recent history any more."""
        self.losses.clear()
