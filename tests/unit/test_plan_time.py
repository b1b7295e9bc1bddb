"""The time model: collectives, pipeline bubbles, and what a step adds up to."""

from __future__ import annotations

import pytest

from parallel.plan.config import load_plan_config
from parallel.plan.estimate import Estimator, Workload
from parallel.layout import Layout
from parallel.plan.pipeline import bubble_time, simulate
from parallel.plan.time import all_gather, all_reduce, all_to_all
from parallel.plan.topology import LinkTier, build_cluster

LINK = LinkTier("link", 8, bandwidth=100e9, latency=5e-6, efficiency=0.5)


def test_alpha_beta_collectives() -> None:
    n = 1e9
    assert all_reduce(n, 1, LINK) == 0.0
    assert all_reduce(n, 8, LINK) == pytest.approx(2 * 7 / 8 * n / 50e9 + 14 * 5e-6)
    assert all_gather(n, 8, LINK) == pytest.approx(7 / 8 * n / 50e9 + 7 * 5e-6)
    assert all_to_all(n, 4, LINK) == pytest.approx(3 / 4 * n / 50e9 + 3 * 5e-6)


@pytest.mark.parametrize("schedule, vpp, tolerance", [
    ("gpipe", 1, 1e-9), ("1f1b", 1, 1e-9), ("interleaved_1f1b", 2, 1e-9), ("interleaved_1f1b", 4, 1e-9),
    ("zero_bubble", 2, 0.1), ("dualpipev", 2, 0.05),
])
def test_bubble_formulas_agree_with_the_simulated_schedule(schedule: str, vpp: int, tolerance: float) -> None:
    pp, m, forward, backward = 4, 16, 1.0, 2.0
    ops = simulate(schedule, pp, vpp, m, forward, backward)
    simulated = max(op.end for op in ops)
    passes = 3 if schedule in ("zero_bubble", "dualpipev") else 2  # F, B (and W when it is split off)
    assert len(ops) == pp * vpp * m * passes
    formula = m * (forward + backward) + bubble_time(schedule, pp, vpp, forward, backward)
    assert simulated == pytest.approx(formula, rel=tolerance)


def _estimator(model: str, cluster: str, devices: int, seq: int = 4096, batch: int = 256, *more: str) -> Estimator:
    cfg = load_plan_config([f"model={model}", f"cluster={cluster}", f"cluster.num_devices={devices}", *more])
    return Estimator(Workload(cfg.model, seq, batch), build_cluster(cfg.cluster))


def test_tensor_parallel_across_nodes_costs_more_than_inside_one() -> None:
    layout = Layout(tp=8, dp_shard=2, micro_batch=1, sequence_parallel=True)
    inside = _estimator("llama3_8b", "h100", 16).evaluate(layout)
    # The same layout where NVLink joins only 4 GPUs: the tp group now crosses InfiniBand.
    across = _estimator("llama3_8b", "h100", 16, 4096, 256, "cluster.tiers.0.span=4").evaluate(layout)
    assert across.time.tp > 5 * inside.time.tp
    assert across.time.compute == pytest.approx(inside.time.compute)
    a100 = _estimator("llama3_8b", "a100_80g", 16).evaluate(layout)
    assert a100.time.tp > inside.time.tp  # NVLink 3 is slower than NVLink 4


def test_step_accounting_is_consistent() -> None:
    est = _estimator("llama3_70b", "h100", 64, seq=8192, batch=512)
    e = est.evaluate(Layout(tp=8, pp=4, dp_shard=2, micro_batch=1, recompute="full", sequence_parallel=True))
    tokens = 512 * 8192
    assert e.tokens_per_s_per_device * e.step_time * 64 == pytest.approx(tokens)
    assert 0 < e.mfu < e.hfu <= 1  # full recompute adds a forward pass of hardware FLOPs
    assert e.hfu == pytest.approx(e.mfu * 4 / 3, rel=0.05)
    assert e.step_time >= e.time.compute + e.time.bubble
    slower = est.evaluate(Layout(tp=8, pp=4, dp_shard=2, micro_batch=1, recompute="full", sequence_parallel=True,
                                 schedule="gpipe"))
    assert slower.step_time == pytest.approx(e.step_time)  # same bubble, more memory
    assert slower.memory.activations > e.memory.activations


def test_dualpipev_hides_expert_all_to_all() -> None:
    est = _estimator("deepseek_v3", "cloudmatrix384", 768, batch=1536)
    base = Layout(pp=4, vpp=2, ep=64, dp_shard=192, micro_batch=1, recompute="full")
    zb = est.evaluate(base.with_(schedule="zero_bubble"))
    dual = est.evaluate(base.with_(schedule="dualpipev"))
    assert zb.time.ep > 0 and dual.time.ep < zb.time.ep
