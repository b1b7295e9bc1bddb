"""Dry run: build one rank's real sharded model and optimizer for a layout, on the meta device, under a fake
process group of the full world size, and compare its parameter and optimizer-state bytes with the prediction.

Nothing is allocated (meta tensors) and nothing is sent (torch's "fake" backend answers every collective
locally), so a 768-rank layout is checked on a laptop. What is built is the same code path `train` runs:
parallel/pipeline.py cuts the stage, parallel/apply.parallelize applies TP and FSDP2 on the mesh of
parallel/dims.py, and AdamW's state is created on meta by one step with zero gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from configs.schema import ParallelConfig, Precision, TrainConfig
from parallel.layout import Layout
from parallel.plan.estimate import Estimator
from parallel.plan.memory import GIB, shard_numel
from parallel.plan.software import state_bytes


@dataclass(frozen=True)
class DryRunReport:
    rank: int
    world_size: int
    predicted: dict[str, float]
    built: dict[str, float]
    note: str = ""
    # Elements this rank draws when it initialises its parameters (its own blocks only: parallel/materialize.py),
    # and the most of them in one parameter.
    init_elements: int = 0
    init_largest: int = 0


def _configs_for(estimator: Estimator, layout: Layout) -> tuple[ParallelConfig, TrainConfig]:
    wl = estimator.workload
    counts = estimator.stage_split(layout.stages) if layout.pp > 1 else ()
    train = TrainConfig(seq_len=wl.seq_len, global_batch=wl.global_batch, micro_batch=layout.micro_batch,
                        mixed_precision=Precision(wl.precision))
    return layout.to_parallel_config(counts), train


def _state_bytes(modules: list[Any], optimizer: Any) -> dict[str, float]:
    """Bytes this rank holds as parameters (local shards) and optimizer state, counted from tensor metadata."""

    def local(tensor: Any) -> Any:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    params = {id(p): p for module in modules for p in module.parameters()}
    param_bytes = sum(local(p).numel() * local(p).element_size() for p in params.values())
    optim_bytes = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "numel"):
                optim_bytes += local(value).numel() * local(value).element_size()
    return {"parameters": float(param_bytes), "optimizer": float(optim_bytes)}


def dry_run(estimator: Estimator, layout: Layout, rank: int = 0) -> DryRunReport:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from models.transformer import build_model
    from parallel.apply import parallelize, pipeline_plan
    from parallel.dims import ParallelDims
    from parallel.pipeline import build_stage

    model = estimator.workload.model
    parallel, train = _configs_for(estimator, layout)
    world = layout.world_size
    dims = ParallelDims.from_config(parallel, world, model, train)
    if dist.is_initialized():
        raise RuntimeError("dry run needs a process without a process group (it creates a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        meshes = dims.build_mesh("cpu")
        dtype = torch.bfloat16 if estimator.workload.precision == "bf16" else None
        if layout.pp > 1:
            plan = pipeline_plan(model, parallel, dims)
            pp_rank = meshes["pp"].get_local_rank()
            stage_ids = plan.stages_of_rank(pp_rank)
            modules = [parallelize(build_stage(model, plan, s), model, parallel, dims, meshes, dtype)
                       for s in stage_ids]
        else:
            pp_rank = 0
            modules = [parallelize(build_model(model, device="meta"), model, parallel, dims, meshes, dtype)]
        params = [p for module in modules for p in module.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        built = _state_bytes(modules, optimizer)
        locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        init_elements = sum(t.numel() for t in locals_)
        init_largest = max((t.numel() for t in locals_), default=0)
    finally:
        dist.destroy_process_group()
    plan = estimator.rank_plans(layout)[pp_rank]
    index = layout.shard_index(rank)
    states = estimator.rank_states(layout, plan, index)[0]
    # Meta tensors have shapes, not storage: compare the elements each rank holds (FSDP2 pads each shard's
    # storage to the ceil-sized chunk; that padded figure is what the memory model plans with).
    policy = state_bytes(layout, estimator.software, estimator.workload.precision)
    tensors = estimator.rank_tensors(plan, layout)
    held = shard_numel(tensors, layout, layout.state_shards, index).held if policy.param_sharded else tensors.numel
    predicted = {"parameters": float(held * policy.param), "optimizer": float(states.optimizer)}
    note = f"parameter storage with FSDP padding: {states.parameters / GIB:.4f} GiB"
    return DryRunReport(rank, world, predicted, built, note, init_elements, init_largest)


def format_dry_run(report: DryRunReport, seconds: float) -> str:
    lines = [f"dry run: rank {report.rank} of {report.world_size} built on meta under a fake process group "
             f"in {seconds:.1f}s"]
    for key in ("parameters", "optimizer"):
        predicted, built = report.predicted[key], report.built[key]
        diff = (predicted - built) / built if built else 0.0
        lines.append(f"  {key:<10} predicted {predicted / GIB:10.4f} GiB   built {built / GIB:10.4f} GiB   "
                     f"({diff:+.2%})")
    if report.note:
        lines.append(f"  ({report.note})")
    drawn = report.init_elements
    lines.append(f"  initialisation: this rank draws {drawn:,} elements ({drawn * 4 / GIB:.2f} GiB in fp32), at most "
                 f"{report.init_largest:,} for one parameter, and no other rank's")
    return "\n".join(lines)
