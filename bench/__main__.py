"""python -m bench [name ...]: run benchmarks, print their figures and write bench/results/<name>.json.

With no names it runs every benchmark but the on-demand ones (`smoke`, the end-to-end check for a lent
accelerator; `init`, initialisation's cost per rank; `faults`, the fault-injection trials; `bad_inputs`, the
bad-input table; `hf_import`, a Hugging Face import on 1, 2 and 4 ranks; `context_parallel`, tokens/s per context-parallel
implementation), which run only when named:
`python -m bench smoke`. The exit code is 1 when a benchmark reports failures (`failed` > 0 in its figures)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from launch.autoload import defer_device_backends

# Before anything imports torch (the benchmarks are imported lazily): see launch/autoload.py.
defer_device_backends()

BENCHMARKS = ("trunk", "pipeline", "moe_load", "versus_hf", "smoke", "init", "faults", "bad_inputs", "hf_import",
              "context_parallel")
ON_DEMAND = ("smoke", "init", "faults", "bad_inputs", "hf_import", "context_parallel")
RESULTS = Path(__file__).resolve().parent / "results"


def _print(name: str, figures: dict, indent: str = "  ") -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(name, value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key}: {value:.4g}")
        else:
            print(f"{indent}{key}: {value}")


def main(argv: list[str]) -> int:
    names = argv or [name for name in BENCHMARKS if name not in ON_DEMAND]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    failures = 0
    for name in names:
        started = time.time()
        figures = importlib.import_module(f"bench.{name}").run()
        figures["wall_time_s"] = time.time() - started
        print(f"{name}:")
        _print(name, figures)
        (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2))
        print(f"  -> {RESULTS / f'{name}.json'}")
        failures += int(figures.get("failed", 0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
