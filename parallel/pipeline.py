"""Pipeline parallelism: cut the model into pp * vpp stages by layers and run them with torch.distributed.pipelining.

A stage is the same `Transformer` class with the layers it does not own deleted (names stay `layers.<i>...`, so
checkpoints are the same whatever the cut); the first stage keeps the embedding, the last the final norm and
output head. Stages go to pipeline ranks in loop order (rank r holds r, r + pp, ...) for gpipe / 1f1b /
interleaved_1f1b, and in V order (rank r holds r and 2 pp - 1 - r) for zero_bubble (ZB-V) and dualpipev. The split,
the placement and what each schedule needs are parallel/rules.py's, which the planner uses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from configs.schema import ModelConfig
from models.kernels import ReferenceKernels
from models.transformer import build_model
from parallel.rules import SINGLE_STAGE, rank_stages, stage_layers

# schedule -> its class in torch.distributed.pipelining.schedules
TORCH_SCHEDULES: dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


@dataclass(frozen=True)
class PipelinePlan:
    """Which layers each stage holds and which stages each pipeline rank runs."""

    schedule: str
    pp: int
    vpp: int
    layers: tuple[tuple[int, ...], ...]  # layers[stage] = layer indices

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        return rank_stages(self.schedule, self.pp, self.vpp, pp_rank)


def plan_pipeline(cfg: ModelConfig, pp: int, vpp: int, schedule: str, counts: list[int]) -> PipelinePlan:
    """Cut the layers into pp * vpp consecutive stages (`counts`, or the even split). The layout, counts included,
    has passed parallel/rules.py already (ParallelDims.from_config)."""
    per_stage = stage_layers(cfg.n_layers, pp * vpp, counts)
    starts = [sum(per_stage[:s]) for s in range(len(per_stage))]
    layers = tuple(tuple(range(start, start + count)) for start, count in zip(starts, per_stage))
    return PipelinePlan(schedule, pp, vpp, layers)


def build_stage(cfg: ModelConfig, plan: PipelinePlan, stage: int, kernels: Optional[ReferenceKernels] = None
                ) -> nn.Module:
    """The meta-device model of one stage: its layers, plus the embedding (first) or norm and head (last).

    Its MoE auxiliary-loss gradient is unscaled (aux_loss_scale 1): torch's schedules feed each micro-batch's loss to
    backward as it is and divide the gradients by the micro-batch count afterwards."""
    model = build_model(cfg, device="meta", kernels=kernels)
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
    schedule_class = getattr(schedules, TORCH_SCHEDULES[plan.schedule])
    if plan.schedule in SINGLE_STAGE:
        return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)


# ---- evaluation -------------------------------------------------------------------------------------------------
# torch's V schedules cannot run forward-only (ScheduleZBVZeroBubble.eval still issues backward actions), so
# evaluation walks the stages in order with plain send/recv, one micro-batch at a time: slow, but evaluation is rare
# and this is the same for every schedule.

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send(tensor: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    # Headers travel on the tensor's device: NCCL and HCCL take device tensors only.
    header = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape], dtype=torch.int64,
                          device=tensor.device)
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=tensor.device), group_dst=peer, group=group)
    dist.send(header, group_dst=peer, group=group)
    dist.send(tensor.contiguous(), group_dst=peer, group=group)


def _recv(peer: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    length = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(length, group_src=peer, group=group)
    header = torch.empty(int(length), dtype=torch.int64, device=device)
    dist.recv(header, group_src=peer, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    tensor = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(tensor, group_src=peer, group=group)
    return tensor


@torch.no_grad()
def forward_only_losses(
    plan: PipelinePlan, stages: dict[int, nn.Module], pp_rank: int, group: dist.ProcessGroup,
    inputs: torch.Tensor, targets: torch.Tensor, n_microbatches: int, loss_fn: Callable,
    extra: Optional[dict[str, torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Per-micro-batch losses on the rank holding the last stage (an empty list elsewhere). `extra`: keyword
    inputs of every stage (positions, documents), cut into micro-batches like the inputs."""
    owner = {stage: rank for rank in range(plan.pp) for stage in plan.stages_of_rank(rank)}
    last = plan.n_stages - 1
    losses = []
    extras = [{name: value.chunk(n_microbatches)[i] for name, value in (extra or {}).items()}
              for i in range(n_microbatches)]
    for inp, tgt, kwargs in zip(inputs.chunk(n_microbatches), targets.chunk(n_microbatches), extras):
        hidden = inp
        for stage in range(plan.n_stages):
            if owner[stage] != pp_rank:
                continue
            if stage > 0 and owner[stage - 1] != pp_rank:
                hidden = _recv(owner[stage - 1], group, inp.device)
            hidden = stages[stage](hidden, **kwargs)
            if stage == last:
                losses.append(loss_fn(hidden, tgt))
            elif owner[stage + 1] != pp_rank:
                _send(hidden, owner[stage + 1], group)
    return losses
