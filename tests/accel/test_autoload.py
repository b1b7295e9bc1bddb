"""A broken Ascend stack cannot stop a run that does not use it: with a torch_npu installed whose import fails (CANN
missing, as on a machine with the package but not the driver), `import torch` alone fails by torch's device-backend
autoloading; `python -m train device=cpu` still runs, `device=auto` falls back with one warning, and `device=npu` stops
with one line naming the cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, clean_env

pytestmark = pytest.mark.accel

REASON = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture(scope="module")
def broken_torch_npu(tmp_path_factory) -> Path:
    """A site folder holding a torch_npu whose import fails as it does without CANN, registered, as the real one is,
    as a `torch.backends` entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "torch_npu").mkdir()
    (site / "torch_npu" / "__init__.py").write_text(f"raise ImportError({REASON!r})\n")
    info = site / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return site


def _run(args: list[str], site: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=f"{site}:{REPO}")
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_the_fake_breaks_import_torch_as_a_missing_cann_does(broken_torch_npu: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-c", "import torch"], broken_torch_npu, tmp_path)
    assert result.returncode != 0 and "Failed to load the backend extension: torch_npu" in result.stderr


def test_cpu_and_auto_runs_train_and_npu_stops_with_one_line(broken_torch_npu: Path, tmp_path: Path) -> None:
    train = [sys.executable, "-m", "train", *FAST, "train.steps=1"]
    cpu = _run([*train, "device=cpu", f"run.dir={tmp_path / 'cpu'}"], broken_torch_npu, tmp_path)
    assert cpu.returncode == 0, cpu.stderr[-3000:]

    auto = _run([*train[:3], *[a for a in FAST if not a.startswith("device=")], "train.steps=1", "device=auto",
                 f"run.dir={tmp_path / 'auto'}"], broken_torch_npu, tmp_path)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "torch_npu is installed but unusable" in auto.stderr and REASON in auto.stderr

    npu = _run([*train, "device=npu", f"run.dir={tmp_path / 'npu'}"], broken_torch_npu, tmp_path)
    lines = npu.stderr.strip().splitlines()
    assert npu.returncode == 2 and len(lines) == 1, npu.stderr
    assert "torch_npu and Ascend CANN" in lines[0] and REASON in lines[0]
