"""Pipeline parallelism on real gloo ranks: every schedule, alone and composed with TP and FSDP into 3-D.

A 4-layer fp32 model; per-step loss, gradient norm and evaluation loss match the single-process run (RTOL).
A checkpoint saved at pp=2 x tp=2 continues at pp=1 x tp=4 and at pp=4 with the losses of the unchanged run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import run_ranks
from workers import SMALL, train_run, train_runs

# Tens of seconds to minutes: real ranks (or a build) per layout.
pytestmark = pytest.mark.slow

RTOL = 1e-5
MODEL = ["model.n_layers=4", "train.eval_every=5"]

TWO = {
    "gpipe": ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "1f1b_full_recompute": ["parallel.pp=2", "parallel.recompute=full"],
    "interleaved_1f1b": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"],
    "zero_bubble": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=zero_bubble"],
    "dualpipev": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=dualpipev"],
}
FOUR = {
    "pp4_gpipe": ["parallel.pp=4", "parallel.pp_schedule=gpipe"],
    "pp4_1f1b": ["parallel.pp=4", "parallel.pp_schedule=1f1b"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
    "pp2_fsdp2": ["parallel.pp=2", "parallel.dp_shard=2"],
}
EIGHT = {"pp2_tp2_fsdp2": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2"]}


def _config(base: Path, name: str, layout: list[str], *extra: str) -> list[str]:
    return [*SMALL, *MODEL, *layout, f"run.dir={base / name}", *extra]


def _group(base: Path, world: int, configs: dict[str, list[str]]) -> dict:
    results = run_ranks(train_runs, world, args=([_config(base, n, c) for n, c in configs.items()],), timeout=600)
    return {name: results[0][i] for i, name in enumerate(configs)}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pp")


@pytest.fixture(scope="module")
def reference(base) -> dict:
    return train_run(_config(base, "single", []))


@pytest.fixture(scope="module")
def runs(base) -> dict:
    results = _group(base, 2, TWO)
    saver = {"pp2_tp2_saver": ["parallel.pp=2", "parallel.tp=2", "checkpoint.every=5"]}
    results.update(_group(base, 4, {**FOUR, **saver}))
    resumed = {"tp4_from_pp2_tp2": ["parallel.tp=4"], "pp4_from_pp2_tp2": ["parallel.pp=4"]}
    for name in resumed:
        (base / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(base / "pp2_tp2_saver" / "checkpoints" / "step_5", base / name / "checkpoints" / "step_5")
    results.update(_group(base, 4, resumed))
    results.update(_group(base, 8, EIGHT))
    return results


def _assert_matches(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in want[step]:
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key, got[step], want[step])


@pytest.mark.parametrize("name", [*TWO, *FOUR, *EIGHT])
def test_pipeline_matches_single_process(runs, reference, name):
    assert {5, 10} <= {s for s, v in reference["steps"].items() if "val_loss" in v}
    _assert_matches(runs[name]["steps"], reference["steps"], range(1, 11))


@pytest.mark.parametrize("name", ["tp4_from_pp2_tp2", "pp4_from_pp2_tp2"])
def test_checkpoint_moves_between_pipeline_layouts(runs, name):
    assert sorted(runs[name]["steps"]) == [6, 7, 8, 9, 10]
    _assert_matches(runs[name]["steps"], runs["pp2_tp2_saver"]["steps"], range(6, 11))
