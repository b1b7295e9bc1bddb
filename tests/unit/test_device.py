"""The device abstraction: selection, backends, the missing-torch_npu message, peaks, and no stray device names."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.device import PEAK_BF16_FLOPS, DeviceError, _kernel_offers_huge_pages, lookup_peak_flops, resolve_device

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
        ("Ascend910_9392", "Ascend910_93"),  # 910C, one die
        ("Ascend910B2", "Ascend910B"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),  # the more specific entry before plain H100
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H800", "H800"),
        ("NVIDIA B200", "B200"),
    ],
)
def test_the_name_a_runtime_reports_finds_its_most_specific_peak(runtime_name, entry):
    assert lookup_peak_flops(runtime_name) is dict(PEAK_BF16_FLOPS)[entry]


def test_every_peak_names_its_source():
    assert all(peak.flops > 0 and peak.source for _, peak in PEAK_BF16_FLOPS)


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


def test_hccl_timeouts_follow_config_within_cann_ranges():
    from launch.device import Device
    from launch.env import backend_environment

    npu = Device("npu")  # the environment is pure arithmetic: no torch_npu needed
    assert backend_environment(npu, 600, 1800) == {"HCCL_CONNECT_TIMEOUT": "600", "HCCL_EXEC_TIMEOUT": "1800"}
    assert backend_environment(npu, 10, 99999) == {"HCCL_CONNECT_TIMEOUT": "120", "HCCL_EXEC_TIMEOUT": "17340"}
    assert backend_environment(resolve_device("cpu"), 600, 1800) == {}


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
