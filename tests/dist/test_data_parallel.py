"""Data parallelism on real gloo ranks: DDP, FSDP2, HSDP and DeepSpeed ZeRO 1-3 reproduce the single-process run.

Same seed, same global batch (8 sequences), fp32, 10 steps. Per-step loss and gradient norm match the
single-process run within RTOL; after training every replica holds bit-identical weights, close to the
single-process ones. Checkpoints resume exactly under every engine, DCP checkpoints reshard to another world size,
and checkpoints that cannot load under an engine are refused with one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import HAS_DEEPSPEED, needs_deepspeed
from harness import run_ranks
from workers import SMALL, expect_error, train_run, train_runs

# Tens of seconds to minutes: real ranks (or a build) per layout.
pytestmark = pytest.mark.slow

# Relative tolerance reached in practice is ~1e-7 (float summation order); the bar is 1e-5.
RTOL = 1e-5

ENGINES = {
    "ddp": ["parallel.dp_engine=ddp"],
    "fsdp": ["parallel.dp_engine=fsdp"],
    **({
        "zero1": ["parallel.dp_engine=deepspeed", "parallel.zero_stage=1"],
        "zero2": ["parallel.dp_engine=deepspeed", "parallel.zero_stage=2"],
        "zero3": ["parallel.dp_engine=deepspeed", "parallel.zero_stage=3"],
    } if HAS_DEEPSPEED else {}),
}
HSDP = ["parallel.dp_engine=fsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2"]


def _config(base: Path, name: str, engine: list[str], *extra: str) -> list[str]:
    return [*SMALL, *engine, f"run.dir={base / name}", "checkpoint.every=5", *extra]


def _resume_copy(base: Path, source: str, target: str, step: int = 5) -> None:
    (base / target / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / source / "checkpoints" / f"step_{step}", base / target / "checkpoints" / f"step_{step}")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dp")


@pytest.fixture(scope="module")
def reference(base) -> dict:
    return train_run(_config(base, "single", []))


@pytest.fixture(scope="module")
def world2(base) -> dict[str, dict]:
    configs = {name: _config(base, f"w2_{name}", engine) for name, engine in ENGINES.items()}
    results = run_ranks(train_runs, 2, args=(list(configs.values()),))
    by_name = {name: [rank[i] for rank in results] for i, name in enumerate(configs)}
    # Resume each engine's run from its step-5 checkpoint in a fresh folder.
    resumed = {}
    for name in configs:
        _resume_copy(base, f"w2_{name}", f"w2_{name}_resumed")
        resumed[name] = _config(base, f"w2_{name}_resumed", ENGINES[name])
    results = run_ranks(train_runs, 2, args=(list(resumed.values()),))
    for i, name in enumerate(resumed):
        by_name[f"{name}_resumed"] = [rank[i] for rank in results]
    return by_name


@pytest.fixture(scope="module")
def world4(base, world2) -> dict[str, dict]:
    configs = {name: _config(base, f"w4_{name}", engine) for name, engine in ENGINES.items()}
    configs["hsdp"] = _config(base, "w4_hsdp", HSDP)
    # DCP checkpoints are layout-free: continue the 2-rank FSDP run on 4 ranks, under FSDP and under DDP.
    for name in ("fsdp", "ddp"):
        _resume_copy(base, "w2_fsdp", f"w4_{name}_from_w2_fsdp")
        configs[f"{name}_from_w2_fsdp"] = _config(base, f"w4_{name}_from_w2_fsdp", ENGINES[name])
    results = run_ranks(train_runs, 4, args=(list(configs.values()),))
    return {name: [rank[i] for rank in results] for i, name in enumerate(configs)}


def _assert_steps_match(got: dict, want: dict, steps, rtol: float = RTOL) -> None:
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=rtol), (step, key, got[step], want[step])


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_ranks_match_single_process(world2, reference, name):
    ranks = world2[name]
    _assert_steps_match(ranks[0]["steps"], reference["steps"], range(1, 11))
    assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(value, reference["weights"][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", [*ENGINES, "hsdp"])
def test_four_ranks_match_single_process(world4, reference, name):
    ranks = world4[name]
    _assert_steps_match(ranks[0]["steps"], reference["steps"], range(1, 11))
    assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"


@pytest.mark.parametrize("name", list(ENGINES))
def test_resume_is_exact_under_every_engine(world2, name):
    full, resumed = world2[name][0]["steps"], world2[f"{name}_resumed"][0]["steps"]
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step in resumed:
        assert resumed[step] == full[step], step  # bitwise
    assert world2[name][0]["digest"] == world2[f"{name}_resumed"][0]["digest"]


@pytest.mark.parametrize("name", ["fsdp_from_w2_fsdp", "ddp_from_w2_fsdp"])
def test_dcp_checkpoint_reshards_to_another_world_size(world4, world2, name):
    _assert_steps_match(world4[name][0]["steps"], world2["fsdp"][0]["steps"], range(6, 11))


@needs_deepspeed
def test_incompatible_checkpoints_are_refused(base, world2):
    native = base / "w2_fsdp" / "checkpoints" / "step_5"
    deepspeed = base / "w2_zero2" / "checkpoints" / "step_5"
    messages = run_ranks(_refusals, 2, args=(base, native, deepspeed))[0]
    assert "written by the deepspeed engine and cannot load under dp_engine=fsdp" in messages[0]
    assert "written by the native engine and cannot load under dp_engine=deepspeed" in messages[1]
    assert "saved with zero_stage=2" in messages[2]
    assert all("\n" not in m for m in messages)
    # A DeepSpeed checkpoint needs the world size it was saved with.
    message = run_ranks(expect_error, 4, args=([*_config(base, "w4_bad", ENGINES["zero2"]),
                                                f"checkpoint.resume={deepspeed}"],))[0]
    assert "saved with world_size=2" in message and "(this run: 4)" in message


def _refusals(base: Path, native: Path, deepspeed: Path) -> list[str]:
    return [
        expect_error([*_config(base, "bad1", ENGINES["fsdp"]), f"checkpoint.resume={deepspeed}"]),
        expect_error([*_config(base, "bad2", ENGINES["zero1"]), f"checkpoint.resume={native}"]),
        expect_error([*_config(base, "bad3", ENGINES["zero3"]), f"checkpoint.resume={deepspeed}"]),
    ]


# Big enough that every projection takes the oneDNN route on CPU (models/kernels/cpu/linear.py): with a sequence of 128 and
# 2 sequences per forward, 256 tokens x 256 x 256 is 2^24 multiply-adds, the threshold. FSDP hands the op unsharded
# parameters and ZeRO-3 swaps parameter storage around it, the two engines where that could go wrong. The route is
# forced, in this process and (through the environment) in the ranks, since `auto` keeps F.linear on some CPUs.
ONEDNN_SIZED = ["model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden=768",
                "train.seq_len=128", "train.steps=4"]


@needs_deepspeed
def test_onednn_projections_match_single_process_under_fsdp_and_zero3(base, monkeypatch):
    from models.kernels.cpu import linear as cpu_linear

    assert 2 * 128 * 256 * 256 >= cpu_linear.MIN_FORWARD_MACS
    monkeypatch.setattr(cpu_linear, "ONEDNN_PREFERRED", True)
    monkeypatch.setenv(cpu_linear.LINEAR_ROUTE_VARIABLE, "onednn")
    reference = train_run(_config(base, "onednn_single", [], *ONEDNN_SIZED))
    configs = [_config(base, f"onednn_{name}", ENGINES[name], *ONEDNN_SIZED) for name in ("fsdp", "zero3")]
    for ranks in zip(*run_ranks(train_runs, 2, args=(configs,))):
        _assert_steps_match(ranks[0]["steps"], reference["steps"], range(1, 5))
        assert len({r["digest"] for r in ranks}) == 1, "replicas diverged"
