"""`python -m bench smoke` on CPU, cut down to its cheapest layout: the PASS line and the figures behind it, and a
failing or hanging layout reported as a FAIL line rather than an exception."""

import re

from bench.smoke import LAYOUTS, Layout, layouts_for, run
from launch.device import resolve_device

CPU = resolve_device("cpu")


def test_cpu_stands_in_for_four_devices():
    assert layouts_for(CPU) == list(LAYOUTS)


def test_one_device_tiny_passes(capsys):
    results = run(steps=6, layouts=[LAYOUTS[0]], device=CPU)
    figures = results["tiny"]
    assert figures["passed"] and "error" not in figures, figures
    assert figures["nproc"] == 1 and figures["last_loss"] < figures["first_loss"]
    assert figures["tokens_per_s"] > 0 and figures["mfu"] > 0
    assert results["passed"] == "1/1"
    out = capsys.readouterr().out
    line = r"^PASS tiny +loss \d+\.\d\d -> \d+\.\d\d  [\d,]+ tok/s  mfu \d+\.\d%  \(\d+\.\d s\)$"
    assert re.search(line, out, re.M), out


def test_a_failing_layout_is_a_fail_line(capsys):
    results = run(steps=6, layouts=[Layout("tiny tp3", "tiny", 1, ("parallel.tp=3",))], device=CPU)
    assert results["tiny tp3"]["passed"] is False and results["passed"] == "0/1"
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL"))
    assert line.startswith("FAIL tiny tp3") and "exit code 2: supertrain: error:" in line and "tp=3" in line


def test_a_hang_is_a_fail_line(capsys):
    results = run(steps=6, layouts=[Layout("tiny fsdp2", "tiny", 2, ("parallel.dp_shard=2",))], device=CPU,
                  timeout_s=1)
    assert results["tiny fsdp2"] == {**results["tiny fsdp2"], "passed": False, "error": "timed out after 1 s"}
    assert "FAIL tiny fsdp2" in capsys.readouterr().out
