"""The device abstraction: selection, backends, the missing-torch_npu message, peaks, and no stray device names."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.device import (
    ASCEND_PEAKS,
    PEAK_BF16_FLOPS,
    DeviceError,
    _kernel_offers_huge_pages,
    ascend_generation,
    lookup_peak_flops,
    resolve_device,
)

REPO = Path(__file__).resolve().parents[2]


def test_cpu_device():
    device = resolve_device("cpu")
    assert device.kind == "cpu" and device.backend == "gloo"
    assert device.torch_device(3) == torch.device("cpu")
    assert device.visible_devices_env is None
    assert device.max_memory_bytes() > 0
    peak = device.peak_flops(torch.float32)
    assert peak.flops > 1e9 and "measured" in peak.source


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("torch_npu") is not None,
                    reason="an accelerator is present")
def test_auto_falls_back_to_cpu_without_an_accelerator():
    assert resolve_device("auto").kind == "cpu"


def test_missing_torch_npu_is_one_clear_line():
    with pytest.raises(DeviceError) as error:
        resolve_device("npu")
    message = str(error.value)
    assert "\n" not in message
    assert "torch_npu" in message and "CANN" in message and "supertrain[npu]" in message


def test_missing_gpu_is_one_clear_line():
    with pytest.raises(DeviceError) as error:
        resolve_device("cu" + "da")
    assert "\n" not in str(error.value) and "device=cpu" in str(error.value)


def test_unknown_kind():
    with pytest.raises(DeviceError, match="is not one of auto, cpu"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    "runtime_name, entry",
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),  # the more specific entry before plain H100
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H800", "H800"),
        ("NVIDIA B200", "B200"),
    ],
)
def test_a_gpu_name_finds_its_most_specific_peak(runtime_name, entry):
    assert lookup_peak_flops(runtime_name) is dict(PEAK_BF16_FLOPS)[entry]


# Every Atlas A2 and A3 SoC name torch_npu 2.13/2.14 knows (NpuVariables.cpp's socVersionMap).
A2 = ("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4", "Ascend910B4-1")
A3 = ("Ascend910_9391", "Ascend910_9392", "Ascend910_9381", "Ascend910_9382", "Ascend910_9372", "Ascend910_9362",
      "Ascend910_9363")


def test_every_ascend_soc_has_a_sourced_peak_or_says_there_is_none():
    for soc in A2 + A3:
        peak = lookup_peak_flops(soc)
        assert peak is not None and peak.source, soc
    assert {soc for soc in A2 + A3 if lookup_peak_flops(soc).flops} == {*A2, "Ascend910_9392"}
    assert lookup_peak_flops("Ascend910B2C") is not lookup_peak_flops("Ascend910B2")  # exact names, no prefixes
    assert ascend_generation("Ascend910B") == "910A" and ascend_generation("Ascend910B3") == "A2"
    assert {ascend_generation(soc) for soc in A3} == {"A3"}


def test_every_peak_names_its_source():
    peaks = [peak for _, peak in PEAK_BF16_FLOPS] + list(ASCEND_PEAKS.values())
    assert all(peak.source and (peak.flops is None or peak.flops > 0) for peak in peaks)


def test_unknown_accelerator_has_no_peak():
    assert lookup_peak_flops("Some Future Chip") is None


def test_no_device_literal_outside_the_device_abstraction():
    pattern = re.compile(r"""["']""" + "cu" + r"""da(:\d+)?["']""")
    offenders = []
    for folder in ("configs", "train", "models", "parallel", "launch", "bench", "tests"):
        for file in (REPO / folder).rglob("*.py"):
            if file == REPO / "launch" / "device.py":
                continue
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{file.relative_to(REPO)}:{number}")
    assert not offenders, offenders


def test_hccl_timeouts_follow_config_within_the_ranges_cann_documents():
    from launch.env import backend_environment, hccl_environment

    assert hccl_environment("A2", 600, 1800) == {"HCCL_CONNECT_TIMEOUT": "600", "HCCL_EXEC_TIMEOUT": "1800"}
    # A2/A3 take any execution timeout up to 2^31 - 1 s (0 = never); connecting stays within [120, 7200].
    assert hccl_environment("A3", 10, 99999) == {"HCCL_CONNECT_TIMEOUT": "120", "HCCL_EXEC_TIMEOUT": "99999"}
    # The first 910 generation: at most 17340 s, in whole 68 s steps.
    assert hccl_environment("910A", 9000, 99999) == {"HCCL_CONNECT_TIMEOUT": "7200", "HCCL_EXEC_TIMEOUT": "17340"}
    assert hccl_environment("910A", 600, 600)["HCCL_EXEC_TIMEOUT"] == "544"
    assert backend_environment(resolve_device("cpu"), 600, 1800) == {}


def test_process_group_timeouts_exceed_the_hccl_ones_in_effect(monkeypatch):
    from launch.device import Device
    from launch.env import HCCL_MARGIN_S, Timeouts, process_group_timeouts

    npu = Device("npu")
    monkeypatch.setattr(npu, "name", lambda: "Ascend910B2")
    # The user's own HCCL values win over ours, and the process groups' rise above them.
    env = {"HCCL_CONNECT_TIMEOUT": "900", "HCCL_EXEC_TIMEOUT": "3600"}
    assert process_group_timeouts(npu, 600, 1800, env) == Timeouts(900 + 20 + HCCL_MARGIN_S, 3600 + HCCL_MARGIN_S)
    env = {"HCCL_CONNECT_TIMEOUT": "120", "HCCL_EXEC_TIMEOUT": "0"}  # 0: HCCL never times a collective out
    assert process_group_timeouts(npu, 600, 1800, env) == Timeouts(600, 1800)
    assert process_group_timeouts(resolve_device("cpu"), 600, 1800, env) == Timeouts(600, 1800)


def _python_output(snippet: str, argument: str, **env: str) -> list[str]:
    """What `snippet` prints, run as a fresh Python process that imports this repository (process-wide set-up such
    as malloc's and PyTorch's allocator switches can only be seen from a process of its own)."""
    result = subprocess.run([sys.executable, "-c", snippet, argument], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


_HEAP_BLOCK = """
import sys
import torch
from launch.device import keep_freed_heap
applied = keep_freed_heap()
block = torch.ones(6 * 1024 * 1024)  # 24 MB, like a step's activations
address = block.data_ptr()
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split()
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            print(applied, fields[5] if len(fields) > 5 else "anonymous")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_cpu_runs_keep_large_blocks_in_the_heap_instead_of_mapping_each_anew():
    """With the setting, glibc serves a 24 MB block from its heap (kept and reused when freed) instead of a mapping of
    its own, which it would unmap on free and fault in again on the next step."""
    assert _python_output(_HEAP_BLOCK, "") == ["True", "[heap]"]
    # The user's own malloc settings win: nothing is changed.
    assert _python_output(_HEAP_BLOCK, "", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"


_HUGE_PAGES = """
import sys
import torch
from launch.device import _advised_onto_huge_pages, resolve_device
if sys.argv[1] == "late":
    torch.ones(4)  # PyTorch has read its allocator switch by now
device = resolve_device("cpu")
device.prepare_process()
activation = torch.ones(3 * 1024 * 1024)  # 12 MB, like a step's operands
print(device.huge_pages, _advised_onto_huge_pages(activation))
"""


@pytest.mark.skipif(not _kernel_offers_huge_pages(), reason="this kernel offers no transparent huge pages")
def test_cpu_runs_put_large_blocks_on_huge_pages_and_report_when_they_could_not(monkeypatch):
    # Without the variable that a set-up in this process (other tests) may have put in its environment.
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert _python_output(_HUGE_PAGES, "first") == ["True", "True"]
    # Set up after a tensor existed: no effect, and it says so.
    assert _python_output(_HUGE_PAGES, "late") == ["False", "False"]
    # The user's own setting wins.
    assert _python_output(_HUGE_PAGES, "first", THP_MEM_ALLOC_ENABLE="0") == ["False", "False"]
