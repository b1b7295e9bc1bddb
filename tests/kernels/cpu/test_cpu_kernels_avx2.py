"""The AVX2 build of the C++ CPU kernels, which hosts without AVX-512 get: built and checked against ATen here too,
by asking ATen for its AVX2 code (ATEN_CPU_CAPABILITY), so that an AVX-512 CI host does not leave it untested."""

import subprocess
import sys

import pytest

from models.kernels.cpu import native as cpu_native
from conftest import REPO, clean_env

# Tens of seconds to minutes: real ranks (or a build) per layout.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not cpu_native.NATIVE_EXPECTED, reason="no C++ kernels are built on this CPU")
def test_avx2_build_matches_aten():
    env = clean_env(ATEN_CPU_CAPABILITY="avx2")
    probe = subprocess.run([sys.executable, "-c", "from models.kernels.cpu import native as cpu_native; cpu_native.load(); "
                            "print(cpu_native.description())"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith("fused AVX2 kernels"), probe.stdout
    checks = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/cpu/test_cpu_native.py",
         "-k", "matches or rotates or side_by_side or equal_the_aten_route"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert checks.returncode == 0, checks.stdout[-3000:]
    assert " passed" in checks.stdout and " failed" not in checks.stdout
