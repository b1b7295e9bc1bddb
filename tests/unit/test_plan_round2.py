"""The planner's second round: bounded timeline pictures, plan.software, any published-runs CSV, the Atlas A2 and
CloudMatrix 384 presets with launch/device.py's peaks, and HCCL's per-communicator buffers in memory."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from launch.device import ASCEND_PEAKS
from parallel.layout import Layout
from parallel.plan.__main__ import main as plan_main
from parallel.plan.config import load_plan_config
from parallel.plan.estimate import Estimator, Workload
from parallel.plan.memory import communicator_groups
from parallel.plan.search import Constraints, search
from parallel.plan.software import MEGATRON_2021, MEGATRON_2022, MEGATRON_CORE, SUPERTRAIN, software_named
from parallel.plan.topology import build_cluster
from parallel.plan.validation import check_row, main as validation_main

MIB = 2**20


def _cluster(name: str, devices: int):  # noqa: ANN202
    return build_cluster(load_plan_config(["model=tiny", f"cluster={name}", f"cluster.num_devices={devices}"]).cluster)


def _model(name: str, *overrides: str):  # noqa: ANN202
    return load_plan_config([f"model={name}", *overrides]).model


def test_a_long_timeline_draws_a_bounded_number_of_artists() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from parallel.plan.plot import MAX_LABELLED_OPS, MAX_TIMELINE_OPS, timeline

    for schedule, vpp in (("zero_bubble", 2), ("1f1b", 1), ("interleaved_1f1b", 2)):
        fig, ax = plt.subplots()
        drawn = timeline(ax, schedule, 64, vpp, 3000, 1.0, 2.0, 0.01)
        assert 0 < drawn <= max(MAX_TIMELINE_OPS, 64 * 64 * vpp * 2)
        assert len(ax.collections) <= 3 * 64  # one bar collection per (rank, kind)
        assert len(ax.texts) <= MAX_LABELLED_OPS and not ax.patches
        assert "of 3000 micro-batches" in ax.get_title()
        plt.close(fig)


def test_a_short_timeline_is_drawn_whole_and_labelled() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from parallel.plan.plot import timeline

    fig, ax = plt.subplots()
    assert timeline(ax, "1f1b", 4, 1, 8, 1.0, 2.0) == 4 * 8 * 2
    assert len(ax.texts) == 4 * 8 * 2
    plt.close(fig)


def test_plan_software_names_and_rejects_unknown() -> None:
    assert software_named("megatron-lm-2022") is MEGATRON_2022
    assert software_named("supertrain", host=True).name == "supertrain-cpu"
    with pytest.raises(Exception, match="megatron-core"):
        load_plan_config(["model=tiny", "plan.software=megatron-lm-2099"])


def test_megatron_2022_has_sequence_parallelism_and_attention_core_recompute() -> None:
    model = _model("gpt", "model.n_layers=8", "model.d_model=4096", "model.n_heads=32", "model.ffn_hidden=16384")
    cluster = _cluster("a100_80g", 8)
    layout = Layout(tp=8, dp_replicate=1, dp_shard=1, micro_batch=1, recompute="selective", dp_engine="ddp",
                    zero_stage=0, sequence_parallel=True)
    estimates = {s.name: Estimator(Workload(model, 2048, 8), cluster, s, even_split=True).evaluate(layout)
                 for s in (MEGATRON_2022, MEGATRON_CORE)}
    # No flash attention: the selective recompute runs the attention core again (Korthikanti et al. 2022) ...
    assert estimates["megatron-lm 2022"].time.recompute > 2 * estimates["megatron-core 0.6"].time.recompute
    # ... and keeps none of its seq x seq tensors: the same activations as with flash attention, give or take the
    # dropout masks.
    ratio = estimates["megatron-lm 2022"].memory.activations / estimates["megatron-core 0.6"].memory.activations
    assert 1.0 <= ratio < 1.2
    # 2021 had neither sequence parallelism nor selective recompute; 2022 may choose both.
    for software, allowed in ((MEGATRON_2021, False), (MEGATRON_2022, True)):
        found = search(Estimator(Workload(model, 2048, 64), cluster, software, even_split=True), 8,
                       Constraints(tp=8, allowed_schedules=software.schedules), keep=0).ranked
        assert found
        assert any(e.layout.sequence_parallel for e in found) is allowed
        assert any(e.layout.recompute == "selective" for e in found) is allowed
        assert all(e.layout.schedule in ("1f1b", "interleaved_1f1b") for e in found)


def test_the_cli_plans_for_published_software_without_writing_a_supertrain_config(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["model=gpt", "cluster=a100_80g", "cluster.num_devices=16", "plan.seq_len=2048", "plan.top=2",
            "plan.plot="]
    assert plan_main([*args, "plan.software=megatron-lm-2022"]) == 0
    printed = capsys.readouterr().out
    assert "software megatron-lm 2022" in printed and "wrote" not in printed
    assert not (tmp_path / "configs").exists()
    assert plan_main([*args, "plan.software=megatron-core", "plan.schedule=zero_bubble"]) == 2


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_validation_cli_checks_any_csv_with_a_moe_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    row = {"id": "moe", "source": "test", "software": "megatron-core", "cluster": "h100", "num_devices": 8,
           "model": "tiny_moe", "n_layers": 4, "seq_len": 256, "global_batch": 16, "tp": 1, "pp": 2, "ep": 2,
           "micro_batch": 1, "recompute": "none", "metric": "step_time_s", "value": 1.0}
    predicted = check_row({k: str(v) for k, v in row.items()}).predicted
    assert predicted > 0
    within = _write(tmp_path / "within.csv", [{**row, "value": predicted * 1.05}])
    assert validation_main([str(within), "--tol", "0.1"]) == 0
    assert "| moe | h100 | 8 | megatron-core | 1/2/4 ep2, 1 |" in capsys.readouterr().out
    outside = _write(tmp_path / "outside.csv", [{**row, "value": predicted * 2}])
    assert validation_main([str(outside), "--tol", "0.1"]) == 1
    # A layout the planner cannot express is shown with its note and not held to the tolerance.
    noted = _write(tmp_path / "noted.csv", [{**row, "value": predicted * 2, "unexpressed": "MoE parallel folding"}])
    assert validation_main([str(noted), "--tol", "0.1"]) == 0
    assert "not checked: MoE parallel folding" in capsys.readouterr().out
    missing = _write(tmp_path / "missing.csv", [{k: v for k, v in row.items() if k != "software"}])
    assert validation_main([str(missing)]) == 2


def test_validation_metrics_mfu_and_tokens() -> None:
    base = {"id": "d", "source": "test", "software": "megatron-core", "cluster": "h100", "num_devices": "8",
            "model": "tiny", "seq_len": "256", "global_batch": "16", "tp": "1", "pp": "1", "micro_batch": "1",
            "recompute": "none", "value": "1"}
    tokens = check_row({**base, "metric": "tokens_per_s_per_device"})
    mfu = check_row({**base, "metric": "mfu", "flops": "model"})
    assert tokens.predicted == pytest.approx(tokens.estimate.tokens_per_s_per_device)
    assert mfu.predicted == pytest.approx(tokens.estimate.mfu)
    halved = check_row({**base, "metric": "mfu", "flops": "model", "peak_tflops": str(2 * 989)})
    assert halved.predicted == pytest.approx(mfu.predicted / 2, rel=1e-3)


def test_ascend_presets_use_launch_device_peaks_and_hccl_buffers() -> None:
    a2 = _cluster("atlas_a2", 32)
    assert a2.devices_per_node == 8 and a2.num_nodes == 4 and [t.name for t in a2.tiers] == ["hccs", "roce"]
    assert a2.device.peak_flops == pytest.approx(ASCEND_PEAKS["Ascend910B2"].flops)
    cm = _cluster("cloudmatrix384", 768)
    assert cm.device.peak_flops == pytest.approx(ASCEND_PEAKS["Ascend910_9392"].flops)
    for cluster in (a2, cm):
        assert cluster.comm_buffer_bytes == 2 * 200 * MIB  # 2 x HCCL_BUFFSIZE, CANN's default 200 MB
    assert _cluster("a100_80g", 8).comm_buffer_bytes == 0


def test_communicator_groups_are_the_distinct_groups_a_rank_joins() -> None:
    assert communicator_groups(Layout(tp=8, dp_replicate=1, dp_shard=1)) == ["tp"]  # the world is the tp group
    assert communicator_groups(Layout(tp=1, dp_replicate=1, dp_shard=1)) == []
    # tp2 x ep2 (efsdp 2) x pp2: tp, ep, efsdp, pp, dp_shard (= efsdp x ep, also dp, dp_shard_cp, dp_cp), pp_dp,
    # world.
    layout = Layout(tp=2, pp=2, ep=2, dp_replicate=1, dp_shard=4)
    assert communicator_groups(layout) == ["tp", "ep", "efsdp", "pp", "dp_shard", "pp_dp", "world"]


@pytest.mark.parametrize("cluster, per_group", [("atlas_a2", 400 * MIB), ("h100", 0)])
def test_hccl_buffers_appear_in_the_memory_breakdown(cluster: str, per_group: float) -> None:
    model = _model("llama3_8b")
    layout = Layout(tp=2, pp=2, dp_replicate=1, dp_shard=4, micro_batch=1, recompute="full", schedule="1f1b")
    estimator = Estimator(Workload(model, 4096, 64), _cluster(cluster, 16), SUPERTRAIN)
    memory = estimator.evaluate(layout).memory
    groups = communicator_groups(layout)
    assert len(groups) >= 3
    assert memory.buffers == pytest.approx(len(groups) * per_group)
    assert memory.total == pytest.approx(memory.states + memory.activations + memory.transient + memory.buffers)
