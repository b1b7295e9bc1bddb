"""Cluster presets and which link a process group uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs.errors import ConfigError
from parallel.plan.config import load_plan_config
from parallel.plan.topology import GIB, build_cluster

CLUSTERS = Path(__file__).resolve().parents[2] / "configs" / "cluster"
PRESETS = ("cloudmatrix384", "a100_80g", "h100", "h800", "gb200_nvl72", "local")


def cluster(*overrides: str):
    return build_cluster(load_plan_config(["model=tiny", *overrides]).cluster)


def test_cloudmatrix384_is_768_dies_on_one_unified_bus() -> None:
    c = cluster("cluster=cloudmatrix384")
    assert c.num_devices == 768 and c.devices_per_node == 16 and c.num_nodes == 48
    assert c.device.peak_flops == pytest.approx(353.8944e12)  # launch/device.py ASCEND_PEAKS["Ascend910_9392"]
    assert c.device.memory_bytes == 64 * GIB
    ub = c.tier_for_group(768, 1)
    assert ub.name == "ub" and ub.bandwidth == pytest.approx(196e9)
    # Inside one supernode every group, however strided, stays on the Unified Bus.
    assert c.tier_for_group(2, 384).name == "ub"


def test_more_than_one_supernode_uses_the_scale_out_tier() -> None:
    c = cluster("cluster=cloudmatrix384", "cluster.num_devices=1536")
    assert c.num_nodes == 96
    assert c.tier_for_group(768, 1).name == "ub"
    assert c.tier_for_group(2, 768).name == "roce"
    assert c.tier_for_group(1536, 1).name == "roce"


def test_dgx_groups_inside_a_node_use_nvlink_and_across_nodes_infiniband() -> None:
    c = cluster("cluster=a100_80g", "cluster.num_devices=64")
    assert c.tier_for_group(8, 1).name == "nvlink"
    assert c.tier_for_group(4, 2).name == "nvlink"
    assert c.tier_for_group(8, 8).name == "ib"
    # A group of 3 consecutive ranks straddles node boundaries somewhere in the mesh.
    assert c.tier_for_group(3, 1).name == "ib"


@pytest.mark.parametrize("name", PRESETS)
def test_every_hardware_figure_has_a_source_comment(name: str) -> None:
    lines = (CLUSTERS / f"{name}.yaml").read_text().splitlines()
    assert lines[0].startswith("#")
    for i, line in enumerate(lines):
        if re.match(r"\s*(peak_tflops|memory_gib|memory_bandwidth_gbs|matmul_efficiency|bandwidth_gbs|efficiency):", line):
            above = lines[max(0, i - 6):i]
            assert any(l.strip().startswith("#") for l in above), f"{name}.yaml: no comment above {line.strip()!r}"
    c = cluster(f"cluster={name}")
    assert c.device.peak_flops > 0 and c.device.memory_bytes > 0 and c.tiers


def test_local_measures_this_host_and_shares_it_among_ranks() -> None:
    two = cluster("cluster=local", "cluster.num_devices=2")
    eight = cluster("cluster=local", "cluster.num_devices=8")
    assert two.host and eight.num_devices == 8 and eight.devices_per_node == 8
    assert eight.device.memory_bytes == pytest.approx(two.device.memory_bytes / 4)
    assert eight.tiers[0].bandwidth < two.tiers[0].bandwidth


@pytest.mark.parametrize("override, words", [
    ("cluster.num_devices=-1", "cluster.num_devices=-1"),
    ("cluster.tiers.0.efficiency=0", "efficiency=0"),
    ("cluster=nope", "nope"),
])
def test_bad_cluster_values_are_one_line_errors(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as error:
        cluster("cluster=h100", override)
    assert words in str(error.value) and "\n" not in str(error.value)
