"""A training engine owns the (parallelized) model, its optimizer and LR schedule, and runs one optimizer step over
a list of micro-batches. The trainer talks only to this interface, so DDP, FSDP2, TP, PP and DeepSpeed differ
here and not in the loop.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from launch.device import Device
from models.moe import set_aux_loss_scale, suspend_statistics_for_next_forward, update_load_balance
from train.config import OptimConfig
from train.optim import build_optimizer, build_scheduler, restore_scheduler

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

    def routing_metrics(self) -> dict[str, Any]:
        """MoE expert load of the last step (empty for a dense model); a collective under pipelines."""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor scalar (the loss under loss_parallel) as an ordinary tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _loss_parallel() -> contextlib.AbstractContextManager:
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns when it runs without a process group; for a one-process run that is exactly what we want."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, stage_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Norm of all gradients as if the model were on one device, then scale them so it is at most max_norm (> 0).

    Gradients may mix DTensors on different meshes and placements (TP shards, FSDP shards, replicated norm weights
    under TP) with plain tensors; torch's clip_grad_norm_ refuses such a mix, so each kind is normed on its own
    (a DTensor norm counts each shard once and replicas once) and the squares are added. With pipeline stages,
    `stage_group` adds the other stages' squares.
    """
    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for param in parameters:
        grad = param.grad
        if grad is not None:
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups[key].append(grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        squares.append(_plain(norm).float() ** 2)
    total_sq = torch.stack(squares).sum() if squares else torch.zeros(())
    if stage_group is not None:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, scale.to(local[0].device))
    return total


class NativeEngine:
    """Plain torch modules and optimizers; DDP / FSDP2 / TP wrappers are applied to the model before it gets here.

    The model may come in parts (a pipeline rank's stages), each with its own optimizer; the parts' state dicts
    are merged under their canonical parameter names, so checkpoints do not depend on how the model was cut.
    """

    kind = "native"

    def __init__(
        self,
        parts: list[nn.Module],
        optim_cfg: OptimConfig,
        total_steps: int,
        device: Device,
        autocast_dtype: Optional[torch.dtype],
        loss_group: Optional[dist.ProcessGroup] = None,
        vocab_parallel_loss: bool = False,
        stage_group: Optional[dist.ProcessGroup] = None,
        data_group: Optional[dist.ProcessGroup] = None,
        expert_grad_divisor: int = 1,
    ) -> None:
        self.parts = parts
        self.optimizers = [build_optimizer(part, optim_cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, optim_cfg, total_steps) for opt in self.optimizers]
        self.device = device
        self.autocast_dtype = autocast_dtype
        # Ranks whose loss shares add up to the global loss (data-parallel, and pipeline, ranks); None = alone.
        self.loss_group = loss_group
        # Pipeline ranks: each holds different parameters, so gradient norms add across them.
        self.stage_group = stage_group
        # Ranks that see different tokens (data parallel): MoE token counts add up across them.
        self.data_group = data_group
        self._routing_metrics: dict[str, Any] = {}
        # Expert-parallel gradients arrive summed over the ep group (parallel/expert.py): divide them by ep.
        self.expert_grad_divisor = expert_grad_divisor
        self.torch_device = next(parts[0].parameters()).device
        # Under TP the logits stay sharded over the vocabulary; loss_parallel computes the loss (and its backward)
        # from the shards without gathering them.
        self.loss_context = _loss_parallel if vocab_parallel_loss else contextlib.nullcontext

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def parameters(self) -> Iterator[torch.Tensor]:
        for part in self.parts:
            yield from part.parameters()

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

    def _forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Gradients of the mean loss over `batches`; returns that mean (this rank's micro-batches)."""
        total = torch.zeros((), device=self.torch_device)
        for i, batch in enumerate(batches):
            with self._no_grad_sync(last=i == len(batches) - 1), self.loss_context():
                loss = self._loss(batch) / len(batches)
                loss.backward()
            total += _plain(loss.detach())
        return total

    def train_step(self, batches: list[Batch], grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        for part in self.parts:
            part.train()
            # Each micro-batch's loss enters backward scaled like this; the MoE auxiliary loss must be too.
            set_aux_loss_scale(part, self._aux_loss_scale(len(batches)))
        mean_loss = self._forward_backward(batches)
        if self.expert_grad_divisor > 1:
            from parallel.expert import expert_parameters

            for part in self.parts:
                for param in expert_parameters(part):
                    if param.grad is not None:
                        param.grad.div_(self.expert_grad_divisor)
        grad_norm = clip_grad_norm_(self.parameters(), grad_clip, self.stage_group)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # Every step, so the expert biases follow each step's load; identical on all data-parallel replicas.
        self._routing_metrics = {}
        for part in self.parts:
            self._routing_metrics.update(update_load_balance(part, self._sum_over_data_ranks))
        return mean_loss / self._loss_ranks(), grad_norm

    def _aux_loss_scale(self, micro_batches: int) -> float:
        return 1.0 / micro_batches

    def _sum_over_data_ranks(self, stats: torch.Tensor) -> torch.Tensor:
        if self.data_group is not None:
            dist.all_reduce(stats, group=self.data_group)  # SUM
        return stats

    def routing_metrics(self) -> dict[str, Any]:
        return self._routing_metrics

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        self.model.eval()
        total = torch.zeros((), device=self.torch_device)
        with self.loss_context():
            for batch in batches:
                total += _plain(self._loss(batch))
        return total / (len(batches) * self._loss_ranks())

    def _loss_ranks(self) -> int:
        """Ranks holding a loss share: data-parallel ranks (a pipeline's last stage computes the loss)."""
        return dist.get_world_size(self.loss_group) if self.loss_group is not None else 1

    def reduce_loss(self, local: torch.Tensor) -> float:
        if self.loss_group is not None:
            local = local.clone()
            dist.all_reduce(local, group=self.loss_group)  # SUM: gloo has no AVG
        return float(local)

    def lr(self) -> float:
        return float(self.schedulers[0].get_last_lr()[0])

    # ---- checkpoint -----------------------------------------------------------------------------------------

    def _state(self) -> dict[str, dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Optimizer state keyed by parameter name (not by param-group index), so it loads under any cut.
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        model_state: dict[str, Any] = {}
        optim_state: dict[str, Any] = {}
        for part, optimizer in zip(self.parts, self.optimizers):
            part_model, part_optim = get_state_dict(part, optimizer, options=options)
            model_state.update(part_model)
            optim_state.update(part_optim)
        return {"model": model_state, "optim": optim_state}

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with _single_process_is_intended():
            dcp.save(self._state(), checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder))
        options = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
        for part, optimizer in zip(self.parts, self.optimizers):
            set_state_dict(part, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=options)

    def extra_state(self) -> dict[str, Any]:
        return {"lr_scheduler": self.schedulers[0].state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            restore_scheduler(scheduler, state["lr_scheduler"])

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint must match to load under this engine: nothing, DCP reshards to any layout."""
        return {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter this rank's parts hold, whole (a collective under FSDP/TP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        merged: dict[str, torch.Tensor] = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
        return merged


class PipelineEngine(NativeEngine):
    """A pipeline rank: its stages run under a torch.distributed.pipelining schedule over the step's micro-batches.

    Only the last stage sees the loss; its share is added over the pipeline and data-parallel ranks.
    """

    def __init__(self, stages: dict[int, nn.Module], schedule: Any, plan: Any, pp_rank: int,
                 pp_group: dist.ProcessGroup, dp_size: int, **kwargs: Any) -> None:
        super().__init__([stages[s] for s in sorted(stages)], **kwargs)
        self.stages = stages
        self.schedule = schedule
        self.plan = plan
        self.pp_rank = pp_rank
        self.pp_group = pp_group
        self.has_first = 0 in stages
        self.has_last = plan.n_stages - 1 in stages
        self.dp_size = dp_size
        # torch's pipeline stages run one forward of their own before the first training step to learn tensor
        # shapes; its routing is not training data, so MoE statistics skip it.
        for stage in stages.values():
            suspend_statistics_for_next_forward(stage)

    def _aux_loss_scale(self, micro_batches: int) -> float:
        return 1.0  # the pipeline schedule divides gradients by the micro-batch count itself

    def routing_metrics(self) -> dict[str, Any]:
        """Every stage's MoE layers, gathered so that rank 0 can log them."""
        gathered: list[Optional[dict[str, Any]]] = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(gathered, self._routing_metrics, group=self.pp_group)
        merged: dict[str, Any] = {}
        totals: dict[str, list[float]] = defaultdict(list)
        for stage_metrics in gathered:
            for key, value in (stage_metrics or {}).items():
                if key.count("/") == 1:  # a stage's total over its own layers
                    totals[key].append(value)
                else:
                    merged[key] = value
        # Worst layer of any stage; auxiliary losses add up; the dropped fraction of the worst stage.
        combine = {"moe/max_mean_load": max, "moe/aux_loss": sum, "moe/dropped_fraction": max}
        merged.update({key: combine[key](values) for key, values in totals.items()})
        return merged

    def _mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        if not self.has_last:
            return torch.zeros((), device=self.torch_device)
        return torch.stack([_plain(loss.detach()) for loss in losses]).mean()

    def _whole_batch(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's micro-batches as one batch: the schedule splits it again into n_microbatches chunks."""
        return (torch.cat([b[0] for b in batches]).to(self.torch_device),
                torch.cat([b[1] for b in batches]).to(self.torch_device))

    def _forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        inputs, targets = self._whole_batch(batches)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        with self.loss_context(), self.device.autocast(self.autocast_dtype):
            self.schedule.step(*args, **kwargs)
        return self._mean(losses)

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        from parallel.pipeline import forward_only_losses

        for part in self.parts:
            part.eval()
        inputs, targets = self._whole_batch(batches)
        with self.loss_context(), self.device.autocast(self.autocast_dtype):
            losses = forward_only_losses(self.plan, self.stages, self.pp_rank, self.pp_group, inputs, targets,
                                         len(batches), token_cross_entropy)
        return self._mean(losses) / self.dp_size

    def _loss_ranks(self) -> int:
        return self.dp_size
