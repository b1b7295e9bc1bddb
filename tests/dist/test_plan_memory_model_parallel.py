"""The memory model against real model-parallel ranks (gloo, fp32, 2 ranks): tensor parallelism with and without
sequence parallelism, a 2-stage pipeline, and expert parallelism on an MLA + MoE model. Parameter, gradient and
optimizer bytes per rank equal the prediction exactly; one micro-batch's activations are within 10%."""

from __future__ import annotations

from harness import run_ranks
from parallel.plan.measure import measure_cases
from test_plan_memory_data_parallel import check

TINY, TINY_MOE = ["model=tiny"], ["model=tiny_moe"]
CASES = [
    (TINY, {"tp": 2}, 64, 2, 2),
    (TINY, {"tp": 2, "sequence_parallel": True}, 64, 2, 2),
    (TINY, {"tp": 2, "sequence_parallel": True, "recompute": "full"}, 64, 2, 2),
    (TINY, {"pp": 2, "dp_shard": 1, "pp_layers": [2, 2]}, 64, 2, 4),
    (TINY_MOE, {"ep": 2, "dp_shard": 2}, 64, 2, 4),
]
WORLD = 2


def test_tp_pp_ep_memory_per_rank_matches_the_model() -> None:
    check(CASES, run_ranks(measure_cases, WORLD, args=(CASES,), timeout=240), WORLD)
