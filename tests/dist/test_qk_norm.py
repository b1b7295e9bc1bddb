"""Qwen3's per-head query/key norms under tensor parallelism: each rank normalises only its heads, so the shared
norm weights' gradients must be summed over the tp ranks. Per-step loss and gradient norm match the single-process
run (fp32) at tp=2 (with and without sequence parallelism) and at tp=4, where this model's 2 kv heads are replicated
(one kv head per pair of ranks), and with the weights also FSDP-sharded."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_ranks
from workers import SMALL, train_run, train_runs

pytestmark = pytest.mark.slow

RTOL = 1e-5
LAYOUTS = {
    2: {"tp2": ["parallel.tp=2"], "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]},
    4: {"tp4": ["parallel.tp=4"], "tp2_fsdp2": ["parallel.tp=2", "parallel.dp_shard=2"]},
}


def _config(base: Path, name: str, layout: list[str]) -> list[str]:
    return [*SMALL, "model.qk_norm=true", *layout, f"run.dir={base / name}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("qk_norm")
    results = {"single": [train_run(_config(base, "single", []))]}
    for world, layouts in LAYOUTS.items():
        output = run_ranks(train_runs, world, args=([_config(base, n, l) for n, l in layouts.items()],))
        results.update({name: [rank[i] for rank in output] for i, name in enumerate(layouts)})
    return results


@pytest.mark.parametrize("name", [n for layouts in LAYOUTS.values() for n in layouts])
def test_tensor_parallel_qk_norm_matches_single_process(runs, name) -> None:
    want, got = runs["single"][0]["steps"], runs[name][0]["steps"]
    for step in range(1, 11):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)
    assert len({rank["digest"] for rank in runs[name]}) == 1
