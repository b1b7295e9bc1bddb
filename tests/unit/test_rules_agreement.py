"""The planner and the trainer agree on what can run, because both use parallel/rules.py: for small worlds, every
layout the planner emits passes the trainer's validation and is cut into the same stages, and every layout the
trainer accepts is one the planner finds and scores when all its choices are fixed.

The trainer's side is `ParallelDims.from_config` on a `ParallelConfig` (what `python -m train` runs before any
process group); the planner's is `search`, on a cluster with memory to spare so that nothing is pruned for size.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from configs.errors import ConfigError
from configs.schema import (PP_SCHEDULES, ContextParallelImpl, DPEngine, ModelConfig, ParallelConfig, Precision,
                            TrainConfig)
from parallel.apply import pipeline_plan
from parallel.dims import ParallelDims
from parallel.layout import Layout
from parallel.plan.config import load_plan_config
from parallel.plan.estimate import Estimator, Workload
from parallel.plan.search import Constraints, divisors, search
from parallel.plan.topology import build_cluster

# 24 sequences: data-parallel degrees 1, 2, 3, 4, 6 and 8 all split it, with several micro-batch sizes each.
GLOBAL_BATCH = 24
SEQ_LEN = 256
WORLDS = (1, 2, 3, 4, 6, 8)
MODELS = {
    # 8 heads over 4 kv heads: tp=8 replicates kv heads; 6 layers split unevenly over 4 or 5 stages.
    "gqa_6_layers": ["model=tiny", "model.n_layers=6"],
    # MLA attention, a dense layer then MoE layers of 8 experts: expert parallelism.
    "mla_moe": ["model=tiny_moe"],
}


def _model(overrides: list[str]) -> ModelConfig:
    return load_plan_config([*overrides, "cluster=h100"]).model


def _estimator(model: ModelConfig, world: int) -> Estimator:
    cluster = build_cluster(load_plan_config(["model=tiny", "cluster=h100", f"cluster.num_devices={world}",
                                              "cluster.device.memory_gib=100000"]).cluster)
    # The trainer's own split (no pp_layers given) is the even one.
    return Estimator(Workload(model, SEQ_LEN, GLOBAL_BATCH, "bf16"), cluster, even_split=True)


def _train() -> TrainConfig:
    return TrainConfig(seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, micro_batch=1, mixed_precision=Precision.bf16)


def _trainer_stage_layers(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, world: int) -> list[int]:
    """Layers per stage as the trainer cuts them; raises ConfigError where the trainer refuses the layout."""
    dims = ParallelDims.from_config(parallel, world, model, train)
    if dims.pp == 1:
        return [model.n_layers]
    return [len(layers) for layers in pipeline_plan(model, parallel, dims).layers]


def _trainer_configs(model: ModelConfig, world: int):
    """Every ParallelConfig of this world worth asking the trainer about (choices that cannot matter, such as a
    schedule without a pipeline, are left at their defaults), with its micro-batch size."""
    for dp_replicate, dp_shard, cp, tp in itertools.product(divisors(world), repeat=4):
        if world % (dp_replicate * dp_shard * cp * tp) or cp > 2:
            continue
        pp = world // (dp_replicate * dp_shard * cp * tp)
        dp = dp_replicate * dp_shard
        pipelines = [("1f1b", 1)] if pp == 1 else [(s, v) for s in PP_SCHEDULES for v in (1, 2, 3, 4)]
        engines = [(DPEngine.fsdp, 1), (DPEngine.ddp, 1)] + [(DPEngine.deepspeed, z) for z in (1, 2, 3)]
        impls = ("ring", "allgather", "ulysses") if cp > 1 else ("ring",)
        for (schedule, vpp), (engine, zero), ep, sp, micro_batch, cp_impl in itertools.product(
                pipelines, engines, divisors(dp_shard), (False, True) if tp > 1 else (False,), divisors(GLOBAL_BATCH),
                impls):
            if GLOBAL_BATCH % (dp * micro_batch):
                continue
            parallel = ParallelConfig(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp, vpp=vpp,
                                      ep=ep, dp_engine=engine, zero_stage=zero, sequence_parallel=sp,
                                      pp_schedule=schedule, cp_impl=ContextParallelImpl(cp_impl))
            yield parallel, micro_batch


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", MODELS)
def test_planner_and_trainer_accept_the_same_layouts(name: str, world: int) -> None:
    model = _model(MODELS[name])
    estimator = _estimator(model, world)

    # The planner's emissions, each run through the trainer's validation with the planner's own split.
    planned = search(estimator, world, Constraints(), keep=0).ranked
    assert planned, f"{name} on {world} ranks: the planner found nothing"
    for estimate in planned:
        parallel = estimate.layout.to_parallel_config(estimate.stage_layers)
        train = replace(_train(), micro_batch=estimate.layout.micro_batch)
        try:
            stages = _trainer_stage_layers(model, parallel, train, world)
        except ConfigError as error:
            pytest.fail(f"{name}, {world} ranks: the planner emitted {estimate.layout}, which the trainer refuses: "
                        f"{error}")
        assert stages == list(estimate.stage_layers), estimate.layout

    # Every layout the trainer accepts, scored by the planner with all its choices fixed, and cut the same way.
    accepted = 0
    for parallel, micro_batch in _trainer_configs(model, world):
        train = replace(_train(), micro_batch=micro_batch)
        try:
            stages = _trainer_stage_layers(model, parallel, train, world)
        except ConfigError:
            continue
        accepted += 1
        layout = Layout.of(parallel, parallel.dp_shard, micro_batch).canonical()
        fixed = {key: getattr(layout, key) for key in ("tp", "pp", "vpp", "cp", "cp_impl", "ep", "dp_replicate",
                                                      "dp_shard",
                                                      "micro_batch", "recompute", "dp_engine", "zero_stage",
                                                      "sequence_parallel")}
        found = search(estimator, world, Constraints(schedule=layout.schedule, **fixed), keep=0).ranked
        assert [e.layout for e in found] == [layout], f"{name}, {world} ranks: the trainer accepts {parallel}"
        assert list(found[0].stage_layers) == stages, layout
    assert accepted >= len({e.layout for e in planned}) > 0
