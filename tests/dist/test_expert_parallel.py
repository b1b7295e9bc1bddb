"""Expert parallelism on real gloo ranks: a small DeepSeek-style MoE (MLA, shared + routed experts, balancing
bias on, no token dropping) reproduces the single-process run per step, alone and composed with FSDP, TP and PP;
a checkpoint saved at ep=4 continues at ep=2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import run_ranks
from workers import SMALL, train_run, train_runs

# Tens of seconds to minutes: real ranks (or a build) per layout.
pytestmark = pytest.mark.slow

RTOL = 1e-5
MOE = [
    "model=tiny_moe", "model.d_model=64", "model.n_heads=4", "model.ffn_hidden=128", "model.q_lora_rank=32",
    "model.kv_lora_rank=16", "model.qk_rope_head_dim=8", "model.qk_nope_head_dim=8", "model.v_head_dim=8",
    "model.moe_ffn_hidden=32",
]
# SMALL's dense shape overrides come first; MOE (later) wins where they overlap.
BASE = [o for o in SMALL if not o.startswith("model.")]

LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep2_fsdp4": (4, ["parallel.ep=2", "parallel.dp_shard=4"]),
    "ep2_tp2": (4, ["parallel.ep=2", "parallel.tp=2"]),
    "ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2"]),
}


def _config(base: Path, name: str, layout: list[str], *extra: str) -> list[str]:
    return [*BASE, *MOE, *layout, f"run.dir={base / name}", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ep")


@pytest.fixture(scope="module")
def reference(base) -> dict:
    return train_run(_config(base, "single", []))


@pytest.fixture(scope="module")
def runs(base) -> dict:
    results = {}
    for world in (2, 4):
        names = [n for n, (w, _) in LAYOUTS.items() if w == world]
        extra = ["checkpoint.every=5"] if world == 4 else []
        configs = [_config(base, n, LAYOUTS[n][1], *(extra if n == "ep4" else [])) for n in names]
        output = run_ranks(train_runs, world, args=(configs,), timeout=600)
        results.update({name: output[0][i] for i, name in enumerate(names)})
    (base / "ep2_from_ep4" / "checkpoints").mkdir(parents=True)
    shutil.copytree(base / "ep4" / "checkpoints" / "step_5", base / "ep2_from_ep4" / "checkpoints" / "step_5")
    results["ep2_from_ep4"] = run_ranks(train_runs, 2, args=([_config(base, "ep2_from_ep4", ["parallel.ep=2"])],))[0][0]
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_matches_single_process(runs, reference, name):
    for step in range(1, 11):
        for key in ("loss", "grad_norm"):
            want = reference["steps"][step][key]
            assert runs[name]["steps"][step][key] == pytest.approx(want, rel=RTOL), (step, key)


def test_checkpoint_moves_from_ep4_to_ep2(runs):
    resumed, saver = runs["ep2_from_ep4"]["steps"], runs["ep4"]["steps"]
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(saver[step]["loss"], rel=RTOL)
