"""Dry run: one rank of a large world built on the meta device under a fake process group, bytes as predicted."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from parallel.plan.config import load_plan_config
from parallel.plan.dryrun import dry_run
from parallel.plan.estimate import Estimator, Workload
from parallel.layout import Layout
from parallel.plan.topology import build_cluster


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a process without a process group")
@pytest.mark.parametrize("model, layout, rank", [
    ("llama3_8b", Layout(tp=4, pp=4, vpp=2, dp_shard=48, micro_batch=1, schedule="zero_bubble",
                         sequence_parallel=True), 700),
    ("tiny_moe", Layout(pp=2, ep=4, dp_shard=384, micro_batch=1, schedule="1f1b"), 500),
])
def test_dry_run_builds_the_predicted_bytes_at_full_scale(model: str, layout: Layout, rank: int) -> None:
    world = layout.world_size
    cfg = load_plan_config([f"model={model}", "cluster=cloudmatrix384", f"cluster.num_devices={world}"])
    estimator = Estimator(Workload(cfg.model, 1024, 2 * world), build_cluster(cfg.cluster))
    report = dry_run(estimator, layout, rank)
    assert report.world_size == world
    assert report.built["parameters"] > 0
    assert report.predicted == report.built
