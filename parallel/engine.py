"""A training engine owns the parallelized model and its optimizers, and runs one optimizer step over a list of
micro-batches. The loop (train/trainer.py) talks only to the `Engine` protocol: a step, its metrics, evaluation and
checkpoint state. So DDP, FSDP2, TP, PP and DeepSpeed differ here and not in the loop.

The loop owns the training recipe: it hands in how to build an optimizer for a module (one per pipeline stage) and
gives every step its learning rate, so the schedule is a function of the step alone and nothing but the optimizer
state needs checkpointing. What all engines share (the loss, evaluation, reductions over ranks, MoE balancing after
each optimizer step) is `EngineBase`; DeepSpeed (parallel/deepspeed.py) builds on it too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from configs.errors import CheckpointError
from launch.device import Device
from models.moe import reset_statistics, suspend_statistics_for_next_forward, update_load_balance
from parallel.context import BatchSplit
from parallel.expert import expert_parameters
from parallel.pipeline import PipelinePlan, forward_only_losses

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (micro_batch, seq_len)
# Builds the optimizer for one module (the whole model, or one pipeline stage); supplied by the trainer.
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
# Asked after backward and clipping, before the update: (this rank's loss share, global gradient norm) -> apply it?
StepCheck = Callable[[torch.Tensor, torch.Tensor], bool]


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer step leaves, still on the device (reading it needs no host sync until it is logged)."""

    # This rank's share of the global-batch mean loss: the shares of the loss ranks add up to it.
    loss_share: torch.Tensor
    # Norm of all gradients before clipping, as if the model were on one device.
    grad_norm: torch.Tensor
    # Whether the optimizer stepped (the step's check can drop the update).
    applied: bool = True


class Engine(Protocol):
    kind: str

    def train_step(self, batches: list[Batch], lr: float, grad_clip: float,
                   check: Optional[StepCheck] = None) -> StepOutput:
        """Forward and backward over this rank's micro-batches, clip to grad_clip (0: off), then, unless `check`
        says no (it must answer the same on every rank), step at `lr`."""

    def step_metrics(self, output: StepOutput) -> dict[str, Any]:
        """The step's global loss, gradient norm and MoE expert load. A collective: every rank calls it."""

    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss of the global batch whose micro-batches on this rank are `batches`. A collective."""

    def global_loss(self, loss_share: torch.Tensor) -> torch.Tensor:
        """The global-batch mean loss from this rank's share, on the device. A collective."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint must match to load under this engine (recorded in its commit marker)."""


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


@contextlib.contextmanager
def _checkpoint_errors(doing: str) -> Iterator[None]:
    """DCP's CheckpointException derives from BaseException (an `except Exception` misses it) and lists every rank's
    failure: turn it into one line naming the first."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        failures = getattr(error, "failures", {}) or {}
        first = ""
        if failures:
            rank = min(failures)
            cause = failures[rank]
            cause = cause[0] if isinstance(cause, tuple) else getattr(cause, "exc", cause)  # (error, traceback)
            first = f"rank {rank}: {type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
        raise CheckpointError(f"{doing} failed ({first or error}): check the folder's disk (space, permissions, a "
                              f"truncated file); checkpoints already saved are untouched") from None


def _saved_model_tensors(folder: Path) -> dict[str, Any]:
    """The checkpoint's model tensors (name -> DCP metadata entry), read from its .metadata file alone."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key[len("model."):]: entry for key, entry in saved.items() if key.startswith("model.")}


def _shape_problem(folder: Path, saved: dict[str, Any], model_state: dict[str, Any]) -> Optional[str]:
    """The first tensor this rank holds whose saved shape differs, as one line; None when all agree."""
    for name, value in model_state.items():
        entry = saved.get(name)
        size = tuple(getattr(entry, "size", ()))
        if entry is not None and isinstance(value, torch.Tensor) and size != tuple(value.shape):
            return (f"{folder}: {name} was saved with shape {size} and this model's is {tuple(value.shape)}: resume "
                    f"with the model it was saved with (model.*), or checkpoint.resume=none")
    return None


def _check_same_model(folder: Path, saved: dict[str, Any], model_names: set[str],
                      shape_problems: list[Optional[str]]) -> None:
    """The checkpoint holds exactly the whole model's tensors, each with its shape, else one line naming a tensor (the
    load itself is not strict, for the optimizer's sake, and would drop a saved layer this model lacks). Every rank
    decides on the same facts, so all raise together instead of some entering the load's collectives alone."""
    missing = sorted(model_names - set(saved))
    legacy = [name for name in missing if "w13" in name and name.replace("w13", "w3") in saved]
    if legacy:
        raise CheckpointError(f"{folder} holds {legacy[0].replace('w13', 'w1')} and w3: SwiGLU's gate and up "
                              f"projections as two tensors, saved before they became one (w13); export it to Hugging "
                              f"Face with the version that wrote it and start from that (checkpoint.init_from_hf=DIR), "
                              f"or checkpoint.resume=none")
    if missing:
        raise CheckpointError(f"{folder} has no tensor {missing[0]}: it holds another model; resume a checkpoint of "
                              f"this model, or checkpoint.resume=none")
    problem = next((line for line in shape_problems if line), None)
    if problem:
        raise CheckpointError(problem)
    extra = sorted(set(saved) - model_names)
    if extra:
        more = f" and {len(extra) - 1} more tensors" if len(extra) > 1 else ""
        raise CheckpointError(f"{folder} holds {extra[0]}{more} that this model does not have: it holds another "
                              f"model; resume with the model it was saved with (model.*), or checkpoint.resume=none")


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, stage_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Norm of all gradients as if the model were on one device, then scale them so it is at most max_norm (> 0).

    Gradients may mix DTensors on different meshes and placements (TP shards, FSDP shards, replicated norm weights
    under TP) with plain tensors; torch's clip_grad_norm_ refuses such a mix, so each kind is normed on its own
    (a DTensor norm counts each shard once and replicas once) and the squares are added. With pipeline stages,
    `stage_group` adds the other stages' squares; a rank without gradients contributes zero, made on `device` (the
    rank's), since NCCL and HCCL take device tensors only.
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
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if stage_group is not None:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, scale.to(local[0].device))
    return total


def set_learning_rate(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


class EngineBase:
    """What every engine shares: the loss of a micro-batch, evaluation, sums over ranks, and the MoE balancing hook
    that runs once after each optimizer step.

    `loss_group`: the ranks whose loss shares add up to the global loss (data-parallel, context-parallel, and
    pipeline, ranks); `data_group`: the ranks that see different tokens, over which MoE token counts add up. None =
    this process alone. `split`: what of each micro-batch this rank runs, with which positions
    (parallel/context.py: context parallelism, document masks).
    """

    kind: str

    def __init__(
        self,
        parts: list[nn.Module],
        device: Device,
        torch_device: torch.device,
        autocast_dtype: Optional[torch.dtype],
        loss_group: Optional[dist.ProcessGroup] = None,
        data_group: Optional[dist.ProcessGroup] = None,
        vocab_parallel_loss: bool = False,
        split: BatchSplit = BatchSplit(),
    ) -> None:
        self.parts = parts
        self.split = split
        self.device = device
        self.torch_device = torch_device
        self.autocast_dtype = autocast_dtype
        self.loss_group = loss_group
        self.data_group = data_group
        self._routing_metrics: dict[str, Any] = {}
        # Under TP the logits stay sharded over the vocabulary; loss_parallel computes the loss (and its backward)
        # from the shards without gathering them.
        self.loss_context = _loss_parallel if vocab_parallel_loss else contextlib.nullcontext

    @property
    def model(self) -> nn.Module:
        return self.parts[0]

    def parameters(self) -> Iterator[torch.Tensor]:
        for part in self.parts:
            yield from part.parameters()

    # ---- loss and evaluation --------------------------------------------------------------------------------

    def _forward(self, inputs: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, **extra)

    def _train_mode(self, training: bool) -> None:
        for part in self.parts:
            part.train(training)

    def _loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = (t.to(self.torch_device, non_blocking=True) for t in batch)
        inputs, targets, extra = self.split(inputs, targets)
        with self.device.autocast(self.autocast_dtype):
            logits = self._forward(inputs, **extra)
        return token_cross_entropy(logits, targets)

    def _loss_ranks(self) -> int:
        """Ranks holding a loss share."""
        return dist.get_world_size(self.loss_group) if self.loss_group is not None else 1

    def _sum_over(self, value: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        if group is not None:
            value = value.clone()
            dist.all_reduce(value, group=group)  # SUM: gloo has no AVG
        return value

    @torch.no_grad()
    def _eval_loss_share(self, batches: list[Batch]) -> torch.Tensor:
        self._train_mode(False)
        total = torch.zeros((), device=self.torch_device)
        with self.loss_context():
            for batch in batches:
                total += _plain(self._loss(batch))
        return total / (len(batches) * self._loss_ranks())

    def evaluate(self, batches: list[Batch]) -> float:
        return float(self._sum_over(self._eval_loss_share(batches), self.loss_group))

    def global_loss(self, loss_share: torch.Tensor) -> torch.Tensor:
        return self._sum_over(loss_share.detach(), self.loss_group)

    # ---- after each optimizer step --------------------------------------------------------------------------

    def _after_optimizer_step(self) -> None:
        """The one hook into the model after an optimizer step: MoE expert biases move towards even load, from
        token counts summed over the data-parallel ranks (identically on every replica)."""
        self._routing_metrics = {}
        for part in self.parts:
            self._routing_metrics.update(update_load_balance(part, self._sum_over_data_ranks))

    def _sum_over_data_ranks(self, stats: torch.Tensor) -> torch.Tensor:
        return self._sum_over(stats, self.data_group)

    def _routing(self) -> dict[str, Any]:
        return self._routing_metrics

    def step_metrics(self, output: StepOutput) -> dict[str, Any]:
        return {
            "loss": float(self.global_loss(output.loss_share)),
            "grad_norm": float(output.grad_norm),
            **self._routing(),
        }


class NativeEngine(EngineBase):
    """Plain torch modules and optimizers; DDP / FSDP2 / TP wrappers are applied to the model before it gets here.

    The model may come in parts (a pipeline rank's stages), each with its own optimizer; the parts' state dicts
    are merged under their canonical parameter names, so checkpoints do not depend on how the model was cut.
    `expert_grad_divisor`: expert-parallel gradients arrive summed over the ep group (parallel/expert.py) and are
    divided by it; `expert_grad_group`: the context-parallel ranks, over which expert-parallel gradients are added
    here (their FSDP group leaves cp out: parallel/apply.py), the divisor counting them. `stage_group`: pipeline
    ranks, whose gradient norms add up.
    """

    kind = "native"

    def __init__(
        self,
        parts: list[nn.Module],
        make_optimizer: OptimizerFactory,
        device: Device,
        autocast_dtype: Optional[torch.dtype],
        loss_group: Optional[dist.ProcessGroup] = None,
        data_group: Optional[dist.ProcessGroup] = None,
        vocab_parallel_loss: bool = False,
        stage_group: Optional[dist.ProcessGroup] = None,
        expert_grad_divisor: int = 1,
        expert_grad_group: Optional[dist.ProcessGroup] = None,
        split: BatchSplit = BatchSplit(),
    ) -> None:
        torch_device = next(parts[0].parameters()).device
        super().__init__(parts, device, torch_device, autocast_dtype, loss_group, data_group, vocab_parallel_loss,
                         split)
        self.optimizers = [make_optimizer(part) for part in parts]
        self.stage_group = stage_group
        self.expert_grad_divisor = expert_grad_divisor
        self.expert_grad_group = expert_grad_group

    def _no_grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Gradients of the mean loss over `batches`; returns that mean (this rank's micro-batches). Each loss is
        divided by the micro-batch count before backward, as the MoE auxiliary loss expects (parallel/apply.py)."""
        total = torch.zeros((), device=self.torch_device)
        for i, batch in enumerate(batches):
            with self._no_grad_sync(last=i == len(batches) - 1), self.loss_context():
                loss = self._loss(batch) / len(batches)
                loss.backward()
            total += _plain(loss.detach())
        return total

    def train_step(self, batches: list[Batch], lr: float, grad_clip: float,
                   check: Optional[StepCheck] = None) -> StepOutput:
        self._train_mode(True)
        mean_loss = self._forward_backward(batches)
        if self.expert_grad_divisor > 1:
            for part in self.parts:
                for param in expert_parameters(part):
                    if param.grad is not None:
                        if self.expert_grad_group is not None:
                            grad = param.grad
                            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad,
                                            group=self.expert_grad_group)
                        param.grad.div_(self.expert_grad_divisor)
        grad_norm = clip_grad_norm_(self.parameters(), grad_clip, self.stage_group, self.torch_device)
        output = StepOutput(mean_loss / self._loss_ranks(), grad_norm)
        applied = check is None or check(output.loss_share, grad_norm)
        if applied:
            set_learning_rate(self.optimizers, lr)
            for optimizer in self.optimizers:
                optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if applied:
            self._after_optimizer_step()
        else:
            for part in self.parts:
                reset_statistics(part)  # a dropped step's routing moves no expert bias
        return StepOutput(output.loss_share, grad_norm, applied)

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

        with _single_process_is_intended(), _checkpoint_errors(f"saving {folder.name.removesuffix('.tmp')}"):
            dcp.save(self._state(), checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        saved = _saved_model_tensors(folder)
        views = self._over_stages((sorted(state["model"]), _shape_problem(folder, saved, state["model"])))
        _check_same_model(folder, saved, {name for names, _ in views for name in names},
                          [problem for _, problem in views])
        with _single_process_is_intended(), _checkpoint_errors(f"loading {folder}"):
            dcp.load(state, checkpoint_id=str(folder))
        options = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
        for part, optimizer in zip(self.parts, self.optimizers):
            set_state_dict(part, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=options)

    def _over_stages(self, local: Any) -> list[Any]:
        """`local` from every pipeline stage of this rank's pipeline (only this rank's without pipelining)."""
        return [local]

    def checkpoint_info(self) -> dict[str, Any]:
        """Nothing to match: DCP reshards to any layout."""
        return {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter this rank's parts hold, whole (a collective under FSDP/TP); for tests and inspection."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        merged: dict[str, torch.Tensor] = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
        return merged


class PipelineEngine(NativeEngine):
    """A pipeline rank: its stages run under a torch.distributed.pipelining schedule over the step's micro-batches.

    Only the last stage sees the loss; its share is added over the pipeline and data-parallel ranks. The schedule
    divides gradients by the micro-batch count itself, after backward (the model is built for that: apply.py).
    """

    def __init__(self, stages: dict[int, nn.Module], schedule: Any, plan: PipelinePlan, pp_rank: int,
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

    def _routing(self) -> dict[str, Any]:
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

    def _over_stages(self, local: Any) -> list[Any]:
        """A stage holds only its own layers: what the checkpoint checks need is gathered from every stage."""
        gathered: list[Any] = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(gathered, local, group=self.pp_group)
        return gathered

    def _mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        if not self.has_last:
            return torch.zeros((), device=self.torch_device)
        return torch.stack([_plain(loss.detach()) for loss in losses]).mean()

    def _whole_batch(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's micro-batches as one batch: the schedule splits it again into n_microbatches chunks."""
        return (torch.cat([b[0] for b in batches]).to(self.torch_device),
                torch.cat([b[1] for b in batches]).to(self.torch_device))

    def _forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        inputs, targets, extra = self.split(*self._whole_batch(batches))
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        # Positions and documents go to every stage: the schedule cuts them into micro-batches with the inputs.
        kwargs: dict[str, Any] = dict(extra)
        if self.has_last:
            kwargs.update(target=targets, losses=losses)
        with self.loss_context(), self.device.autocast(self.autocast_dtype):
            self.schedule.step(*args, **kwargs)
        return self._mean(losses)

    @torch.no_grad()
    def _eval_loss_share(self, batches: list[Batch]) -> torch.Tensor:
        self._train_mode(False)
        inputs, targets, extra = self.split(*self._whole_batch(batches))
        with self.loss_context(), self.device.autocast(self.autocast_dtype):
            losses = forward_only_losses(self.plan, self.stages, self.pp_rank, self.pp_group, inputs, targets,
                                         len(batches), token_cross_entropy, extra)
        return self._mean(losses) / self.dp_size

    def _loss_ranks(self) -> int:
        return self.dp_size
