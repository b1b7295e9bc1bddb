"""The memory model against real context-parallel ranks (gloo, fp32): parameter, gradient and optimizer bytes per
rank equal the prediction exactly, one micro-batch's activations are within 10%, for each implementation at cp=2
and ring attention at cp=4; and those activations fall with cp as the planner says."""

from __future__ import annotations

from harness import run_ranks
from parallel.plan.measure import measure_cases, predict_rank
from test_plan_memory_data_parallel import check

TINY, TINY_MOE = ["model=tiny"], ["model=tiny_moe"]
SEQ, MICRO = 256, 2
CASES_2 = [
    (TINY, {"cp": 2, "cp_impl": "ring"}, SEQ, MICRO, MICRO),
    (TINY, {"cp": 2, "cp_impl": "allgather"}, SEQ, MICRO, MICRO),
    (TINY, {"cp": 2, "cp_impl": "ulysses"}, SEQ, MICRO, MICRO),
    (TINY_MOE, {"cp": 2, "cp_impl": "ring"}, SEQ, MICRO, MICRO),
]
CASES_4 = [(TINY, {"cp": 4, "cp_impl": "ring"}, SEQ, MICRO, MICRO)]


def test_context_parallel_memory_per_rank_matches_the_model() -> None:
    check(CASES_2, run_ranks(measure_cases, 2, args=(CASES_2,), timeout=240), 2)
    check(CASES_4, run_ranks(measure_cases, 4, args=(CASES_4,), timeout=240), 4)


def test_activations_fall_with_cp() -> None:
    """The planner's activation figure for one rank at cp = 2 and 4 against cp = 1 (the measured figures are held
    to it above): the share of the sequence each rank keeps."""
    whole = predict_rank(TINY, {}, SEQ, MICRO, MICRO, 0, 1)["activations"]
    for cp in (2, 4):
        part = predict_rank(TINY, {"cp": cp, "cp_impl": "ring"}, SEQ, MICRO, MICRO, 0, cp)["activations"]
        assert part < whole / cp * 1.25, (cp, part, whole)
