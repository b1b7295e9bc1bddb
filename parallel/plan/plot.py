"""The chosen layout as a picture: memory per pipeline rank by kind, and the pipeline schedule timeline.

Drawn with matplotlib, which the `plot` extra installs (`pip install 'supertrain[plot]'`); without it the planner
says so in one line and carries on.
"""

from __future__ import annotations

from pathlib import Path

from parallel.plan.estimate import Estimate
from parallel.plan.memory import GIB, USABLE_MEMORY_FRACTION
from parallel.plan.pipeline import simulate

# Enough micro-batches to show warm-up, steady state and cool-down without drawing thousands of boxes.
SHOWN_MICRO_BATCHES_PER_STAGE = 3
COLOURS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
           "transient": "#8172b3", "F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_plan(estimate: Estimate, capacity_bytes: float, micro_batches: int, title: str, path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install 'supertrain[plot]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = estimate.layout
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 2.2]})
    ranks = estimate.per_rank_memory or (estimate.memory,)
    bottom = [0.0] * len(ranks)
    for kind in ("parameters", "gradients", "optimizer", "activations", "transient"):
        values = [getattr(m, kind) / GIB for m in ranks]
        left.bar(range(len(ranks)), values, bottom=bottom, color=COLOURS[kind], label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.axhline(capacity_bytes / GIB, color="black", linewidth=1, label="device memory")
    left.axhline(capacity_bytes * USABLE_MEMORY_FRACTION / GIB, color="black", linestyle="--", linewidth=1,
                 label="planning limit")
    left.set_xticks(range(len(ranks)))
    left.set_xlabel("pipeline rank")
    left.set_ylabel("GiB per device")
    left.set_ylim(0, capacity_bytes / GIB * 1.25)
    left.set_title("memory at peak, per pipeline rank")
    left.legend(fontsize=7, loc="upper center", ncol=3)

    if layout.pp > 1:
        shown = min(micro_batches, SHOWN_MICRO_BATCHES_PER_STAGE * layout.pp)
        ops = simulate(layout.schedule, layout.pp, layout.vpp, shown, estimate.forward, estimate.backward,
                       estimate.p2p)
        for op in ops:
            right.barh(op.rank, op.end - op.start, left=op.start, color=COLOURS[op.kind], edgecolor="white",
                       linewidth=0.3)
            if op.end - op.start > 0:
                right.text((op.start + op.end) / 2, op.rank, str(op.micro_batch), ha="center", va="center",
                           fontsize=6, color="white")
        right.set_yticks(range(layout.pp))
        right.invert_yaxis()
        right.set_ylabel("pipeline rank")
        kinds = sorted({op.kind for op in ops})
        right.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in kinds],
                     labels=[{"F": "forward", "B": "backward", "W": "weight gradient"}[k] for k in kinds],
                     fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
        note = f" (first {shown} of {micro_batches} micro-batches)" if shown < micro_batches else ""
        right.set_title(f"{layout.schedule} schedule, pp={layout.pp}, {layout.vpp} chunk(s) per rank{note}")
    else:
        forward, backward = estimate.forward, estimate.backward
        for i in range(min(micro_batches, 8)):
            start = i * (forward + backward)
            right.barh(0, forward, left=start, color=COLOURS["F"])
            right.barh(0, backward, left=start + forward, color=COLOURS["B"])
        right.set_yticks([0])
        right.set_title(f"no pipeline: {micro_batches} micro-batch(es) per step, forward then backward")
    right.set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
