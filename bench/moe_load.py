"""Expert-load benchmark: `tiny_moe` on the embedded corpus for 150 steps with the auxiliary-loss-free balancing bias
on (model.moe.bias_update_rate=0.01, the model's default) and off (0), and the worst layer's max/mean tokens per
expert over training. Writes docs/moe_load_balance.png (the README's figure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIGURE = REPO / "docs" / "moe_load_balance.png"
RATES = (0.01, 0.0)
STEPS = 150


def _train(rate: float, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "train", "model=tiny_moe", f"model.moe.bias_update_rate={rate}",
           f"train.steps={STEPS}", "logging.every=5", "logging.mode=disabled", "checkpoint.every=0",
           "train.eval_every=0", f"run.dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ), check=True, capture_output=True, timeout=3600)


def load_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["moe/max_mean_load"]) for r in records if "moe/max_mean_load" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot(curves: dict[float, tuple[list[int], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for rate, (steps, load) in curves.items():
        label = f"balancing bias on (rate {rate})" if rate else "balancing bias off"
        ax.plot(steps, load, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert\n(worst layer)")
    ax.set_title("tiny_moe on the standard-library corpus: 8 routed experts, top-2")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run() -> dict[str, Any]:
    curves = {}
    for rate in RATES:
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-moe-{rate}-"))
        _train(rate, run_dir)
        curves[rate] = load_curve(run_dir)
    plot(curves, FIGURE)
    figures: dict[str, Any] = {"figure": str(FIGURE)}
    for rate, (steps, load) in curves.items():
        tail = load[-6:]
        figures[f"rate_{rate}"] = {"first_max_mean": load[0], "last_30_steps_mean": sum(tail) / len(tail)}
    return figures
