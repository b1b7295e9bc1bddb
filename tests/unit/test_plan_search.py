"""The layout search: valid, fitting, ranked, honouring fixed fields (its speed: `python -m parallel.plan` prints
how long it searched)."""

from __future__ import annotations

import pytest

from configs.errors import ConfigError
from configs.schema import TrainConfig
from parallel.dims import ParallelDims
from parallel.plan.config import load_plan_config
from parallel.plan.estimate import Estimator, Workload
from parallel.plan.memory import USABLE_MEMORY_FRACTION
from parallel.plan.search import Constraints, search
from parallel.plan.topology import build_cluster


def run(model: str, cluster: str, devices: int, seq: int, batch: int, **fixed):
    cfg = load_plan_config([f"model={model}", f"cluster={cluster}", f"cluster.num_devices={devices}"])
    estimator = Estimator(Workload(cfg.model, seq, batch), build_cluster(cfg.cluster))
    return cfg, estimator, search(estimator, devices, Constraints(**fixed), keep=0)


def test_every_candidate_is_a_valid_fitting_layout_ranked_by_time() -> None:
    cfg, estimator, result = run("llama3_8b", "h100", 16, 4096, 64)
    assert result.ranked
    times = [e.step_time for e in result.ranked]
    assert times == sorted(times)
    capacity = estimator.cluster.device.memory_bytes * USABLE_MEMORY_FRACTION
    for e in result.ranked[:200]:
        layout = e.layout
        assert e.fits and e.memory.total <= capacity
        parallel = layout.to_parallel_config(e.stage_layers)
        train = TrainConfig(seq_len=4096, global_batch=64, micro_batch=layout.micro_batch)
        ParallelDims.from_config(parallel, 16, cfg.model, train)  # raises if the layout cannot run


def test_fixed_degrees_stay_fixed() -> None:
    _, _, result = run("llama3_8b", "h100", 16, 4096, 64, tp=2, pp=2, recompute="full", schedule="1f1b")
    assert result.ranked
    assert {(e.layout.tp, e.layout.pp, e.layout.recompute, e.layout.schedule) for e in result.ranked} == {
        (2, 2, "full", "1f1b")}


def test_nothing_fits_gives_an_empty_result_with_the_smallest_state() -> None:
    _, estimator, result = run("llama3_405b", "h100", 8, 4096, 8)
    assert not result.ranked
    assert result.smallest_state > estimator.cluster.device.memory_bytes


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deepseek_v3", "llama3_405b"])
def test_full_search_on_cloudmatrix384_finds_a_layout(model: str) -> None:
    _, _, result = run(model, "cloudmatrix384", 768, 4096, 1536)
    best = result.best
    assert best is not None and best.layout.world_size == 768 and 0 < best.mfu < 1
    if model == "deepseek_v3":
        assert best.layout.ep > 1


@pytest.mark.parametrize("field, value", [("tp", 0), ("recompute", "some"), ("schedule", "2f2b"), ("zero_stage", 5)])
def test_bad_fixed_fields_are_one_line_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        Constraints(**{field: value})
    assert f"plan.{field}" in str(error.value) and "\n" not in str(error.value)
