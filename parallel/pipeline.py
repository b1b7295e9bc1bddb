"""Pipeline parallelism: cut the model into pp * vpp stages by layers and run them with torch.distributed.pipelining.

A stage is the same `Transformer` class with the layers it does not own deleted (names stay `layers.<i>...`, so
checkpoints are the same whatever the cut); the first stage keeps the embedding, the last the final norm and
output head. Stages go to pipeline ranks in loop order (rank r holds r, r + pp, ...) for gpipe / 1f1b /
interleaved_1f1b, and in V order (rank r holds r and 2 pp - 1 - r) for zero_bubble (ZB-V) and dualpipev.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from models.config import ModelConfig
from models.transformer import build_model
from parallel.dims import LayoutError

# schedule -> (torch class in torch.distributed.pipelining.schedules, stage placement over ranks)
SCHEDULES: dict[str, tuple[str, str]] = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}
_SINGLE_STAGE = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipelinePlan:
    """Which layers each stage holds and which stages this build of the schedule puts on each rank."""

    schedule: str
    pp: int
    vpp: int
    layers: tuple[tuple[int, ...], ...]  # layers[stage] = layer indices

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        if SCHEDULES[self.schedule][1] == "v":
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + k * self.pp for k in range(self.vpp)]


def split_layers(n_layers: int, n_stages: int, counts: list[int]) -> tuple[tuple[int, ...], ...]:
    """Consecutive layer ranges per stage: `counts` if given (the first and last stage may hold none), else as even
    as possible with the spare layers in the middle stages, which carry neither embedding nor head."""
    if counts:
        if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 0:
            raise LayoutError(
                f"parallel.pp_layers={counts} must list {n_stages} non-negative layer counts (pp*vpp) "
                f"adding up to n_layers={n_layers}"
            )
        if any(c == 0 for c in counts[1:-1]):
            raise LayoutError(f"parallel.pp_layers={counts}: only the first and last stage may hold no layers")
    else:
        base, spare = divmod(n_layers, n_stages)
        order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))  # middle stages first
        extra = set(order[:spare])
        counts = [base + (s in extra) for s in range(n_stages)]
    starts = [sum(counts[:s]) for s in range(n_stages)]
    return tuple(tuple(range(start, start + count)) for start, count in zip(starts, counts))


def plan_pipeline(cfg: ModelConfig, pp: int, vpp: int, schedule: str, counts: list[int], n_microbatches: int) -> PipelinePlan:
    """Check the schedule against pp, vpp and the micro-batch count, and cut the layers. Errors are one line."""
    where = f"parallel.pp_schedule={schedule} with pp={pp} vpp={vpp} and {n_microbatches} micro-batches per step"
    if schedule in _SINGLE_STAGE and vpp != 1:
        raise LayoutError(f"{where}: {schedule} runs one stage per rank; set vpp=1 or use interleaved_1f1b")
    if schedule == "interleaved_1f1b" and vpp < 2:
        raise LayoutError(f"{where}: interleaved_1f1b needs vpp >= 2 (vpp=1 is plain 1f1b)")
    if SCHEDULES[schedule][1] == "v" and vpp != 2:
        raise LayoutError(f"{where}: {schedule} is a V schedule with exactly two stages per rank; set vpp=2")
    stages = pp * vpp
    if schedule == "1f1b" and n_microbatches < pp:
        raise LayoutError(f"{where}: 1f1b needs at least pp micro-batches; raise train.global_batch or lower train.micro_batch")
    if schedule == "interleaved_1f1b":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise LayoutError(f"{where}: interleaved_1f1b needs a micro-batch count that is a multiple of pp "
                              f"(or below it); change train.global_batch or train.micro_batch")
    if schedule == "dualpipev" and n_microbatches < stages:
        raise LayoutError(f"{where}: dualpipev needs at least 2*pp micro-batches; raise train.global_batch "
                          f"or lower train.micro_batch")
    return PipelinePlan(schedule, pp, vpp, split_layers(cfg.n_layers, stages, counts))


def build_stage(cfg: ModelConfig, plan: PipelinePlan, stage: int) -> nn.Module:
    """The meta-device model of one stage: its layers, plus the embedding (first) or norm and head (last)."""
    model = build_model(cfg, device="meta")
    keep = {str(i) for i in plan.layers[stage]}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != plan.n_stages - 1:
        model.norm = None
        model.output = None
    return model


def build_schedule(plan: PipelinePlan, stage_modules: dict[int, nn.Module], device: torch.device,
                   group: dist.ProcessGroup, n_microbatches: int, loss_fn: Callable) -> Any:
    """PipelineStage objects for this rank's stages and the torch schedule that runs them."""
    import torch.distributed.pipelining.schedules as schedules
    from torch.distributed.pipelining import PipelineStage

    stages = [
        PipelineStage(module, stage, plan.n_stages, device, group=group)
        for stage, module in sorted(stage_modules.items())
    ]
    schedule_class = getattr(schedules, SCHEDULES[plan.schedule][0])
    if plan.schedule in _SINGLE_STAGE:
        return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


# ---- evaluation -------------------------------------------------------------------------------------------------
# torch's V schedules cannot run forward-only (ScheduleZBVZeroBubble.eval still issues backward actions), so
# evaluation walks the stages in order with plain send/recv, one micro-batch at a time: slow, but evaluation is rare
# and this is the same for every schedule.

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send(tensor: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    header = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape], dtype=torch.int64)
    dist.send(torch.tensor([len(header)], dtype=torch.int64), group_dst=peer, group=group)
    dist.send(header, group_dst=peer, group=group)
    dist.send(tensor.contiguous(), group_dst=peer, group=group)


def _recv(peer: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    length = torch.empty(1, dtype=torch.int64)
    dist.recv(length, group_src=peer, group=group)
    header = torch.empty(int(length), dtype=torch.int64)
    dist.recv(header, group_src=peer, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    tensor = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(tensor, group_src=peer, group=group)
    return tensor


@torch.no_grad()
def forward_only_losses(
    plan: PipelinePlan, stages: dict[int, nn.Module], pp_rank: int, group: dist.ProcessGroup,
    inputs: torch.Tensor, targets: torch.Tensor, n_microbatches: int, loss_fn: Callable,
) -> list[torch.Tensor]:
    """Per-micro-batch losses on the rank holding the last stage (an empty list elsewhere)."""
    owner = {stage: rank for rank in range(plan.pp) for stage in plan.stages_of_rank(rank)}
    last = plan.n_stages - 1
    losses = []
    for inp, tgt in zip(inputs.chunk(n_microbatches), targets.chunk(n_microbatches)):
        hidden = inp
        for stage in range(plan.n_stages):
            if owner[stage] != pp_rank:
                continue
            if stage > 0 and owner[stage - 1] != pp_rank:
                hidden = _recv(owner[stage - 1], group, inp.device)
            hidden = stages[stage](hidden)
            if stage == last:
                losses.append(loss_fn(hidden, tgt))
            elif owner[stage + 1] != pp_rank:
                _send(hidden, owner[stage + 1], group)
    return losses
