"""The harness's NPU code path, run on this CPU machine: `device=npu` with a stand-in torch_npu that installs the fake
npu device and a strict "hccl" backend (tests/accel/fake_npu), which fails, as HCCL does, when a collective is handed
a tensor that is not on an npu.

What runs through the real code: device selection, bf16 and the peak per SoC, `init_process_group` (backend, device
binding, timeouts), the HCCL environment, the timeout of every mesh group, and training with FSDP and with a pipeline
(evaluation included), whose collectives must all carry npu tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, clean_env

pytestmark = pytest.mark.accel

HERE = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=f"{HERE / 'fake_torch_npu'}:{HERE}:{REPO}", **extra)


def _python(snippet: str, **env: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, env=_env(**env), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


DEVICE = """
from launch.device import resolve_device
device = resolve_device("npu")
peak = device.peak_flops()
print(device.kind, device.backend, device.name(), device.supports_bf16(), device.supports_compile(), peak.flops,
      device.peak_flops(override_tflops=100.0).flops)
"""


def test_the_npu_device_reports_its_chip_bf16_and_peak() -> None:
    assert _python(DEVICE) == ["npu", "hccl", "Ascend910B2", "True", "False", "353894400000000.0", "100000000000000.0"]
    # The first 910 generation has no BF16 (torch_npu's is_bf16_supported); a 910C bin without a published peak has
    # none rather than a guess.
    assert _python(DEVICE, FAKE_NPU_SOC="Ascend910A")[3] == "False"
    assert _python(DEVICE, FAKE_NPU_SOC="Ascend910_9391")[5] == "None"


def _torchrun(args: list[str], report: Path, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    report.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "npu_train.py"), "device=npu", *[a for a in FAST if not a.startswith("device=")], *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(NPU_REPORT=str(report), **env), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("layout", [
    ["parallel.dp_shard=2"],  # FSDP: every logged step all-reduces the peak memory
    ["parallel.pp=2", "train.eval_every=2", "train.eval_batches=1"],  # evaluation sends activations stage to stage
    ["parallel.tp=2", "parallel.sequence_parallel=true"],  # DTensor's collectives, the vocabulary-parallel loss
    ["model=tiny_moe", "parallel.ep=2"],  # token counts and tokens all-to-all, expert load summed over ranks
    ["parallel.cp=2"],  # ring attention: batched point-to-point K/V blocks and their gradients
    ["parallel.cp=2", "parallel.cp_impl=allgather", "data.reset_attention_at_eod=true"],  # gather, reduce-scatter
    ["parallel.cp=2", "parallel.cp_impl=ulysses"],  # all-to-all of heads and sequence
], ids=["fsdp2", "pp2_eval", "tp2_sp", "ep2", "cp2_ring", "cp2_allgather_docs", "cp2_ulysses"])
def test_training_hands_hccl_only_npu_tensors(layout: list[str], tmp_path: Path) -> None:
    result = _torchrun([*layout, "train.steps=2", f"run.dir={tmp_path / 'run'}"], tmp_path / "report")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "HCCL takes npu tensors only" not in result.stderr
    reports = [json.loads((tmp_path / "report" / f"rank_{r}.json").read_text()) for r in range(2)]
    for report in reports:
        # HCCL's own timeouts come from parallel.init_timeout_s / step_timeout_s (600 / 1800 by default), and every
        # group, the mesh's included, ends with the step timeout, which exceeds HCCL's execution timeout.
        assert report["env"] == {"HCCL_CONNECT_TIMEOUT": "600", "HCCL_EXEC_TIMEOUT": "1800"}
        assert report["group_timeouts"] and all(t[-1] == 1800 + 60 for t in report["group_timeouts"])
        # torch_npu's HCCL (like the fake) cannot split communicators: the binding is dropped, mesh groups are new.
        assert report["bound_device_id"] == "None"
    assert "cannot split communicators" in result.stderr


def test_compile_is_refused_on_npu_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "train", "device=npu", "parallel.compile=true", "train.steps=1",
                             f"run.dir={tmp_path}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "parallel.compile=true is not supported on npu" in lines[0]


def test_a_chip_without_a_peak_names_itself_and_logs_no_mfu(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "train", "device=npu", *[a for a in FAST if "device=" not in a],
                             "train.steps=1", f"run.dir={tmp_path}"], cwd=REPO, env=_env(FAKE_NPU_SOC="Ascend910_9391"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU peak unknown" in result.stderr and "Ascend910_9391" in result.stderr
    assert "device.peak_tflops" in result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("mfu" not in m for m in metrics if "loss" in m)
