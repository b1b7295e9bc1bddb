"""The project installs like a package: the wheel carries the configs, the C++ source and the planner's data, and
from it `python -m train` and `python -m parallel.plan` run in an empty folder and write only under it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, clean_env

PACKAGES = ("configs", "launch", "models", "parallel", "train")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (setuptools' build folder stays out of the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in (*PACKAGES, "pyproject.toml", "README.md", "LICENSE"):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("supertrain-*.whl"))


def test_the_wheel_carries_every_file_the_packages_read(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*")
              if p.is_file() and p.suffix in (".py", ".yaml", ".cpp", ".csv") and "__pycache__" not in p.parts}
    assert wanted - names == set()


def test_installed_commands_run_in_an_empty_folder_and_write_only_there(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(PYTHONPATH=str(site))
    before = {p: p.stat().st_mtime for p in site.rglob("*") if p.is_file()}

    where = subprocess.run([sys.executable, "-c", "import train, configs; print(train.__file__, configs.CONFIG_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() and all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout

    train = subprocess.run([sys.executable, "-m", "train", "train.steps=2", "logging.mode=disabled", "device=cpu",
                            "train.mixed_precision=fp32", "train.seq_len=64", "data.max_bytes=2000000",
                            "train.eval_every=0"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    plan = subprocess.run([sys.executable, "-m", "parallel.plan", "model=tiny", "cluster=local",
                           "cluster.num_devices=2", "plan.name=mine"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert (work / "configs" / "parallel" / "mine.yaml").is_file()
    assert list((work / "outputs").glob("tiny-*/checkpoints/step_2/COMMITTED"))
    # From the same folder the trainer finds the planner's config among its own groups.
    listed = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=60)
    assert "mine" in next(line for line in listed.stdout.splitlines() if line.strip().startswith("parallel"))
    after = {p: p.stat().st_mtime for p in site.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert after == {p: t for p, t in before.items() if "__pycache__" not in p.parts}
