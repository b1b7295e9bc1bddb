"""The chosen layout as a picture: memory per pipeline rank by kind, and the pipeline schedule timeline.

Drawn with matplotlib, which the `plot` extra installs (`pip install 'supertrain[plot]'`); without it the planner
says so in one line and carries on.
"""

from __future__ import annotations

from pathlib import Path

from parallel.plan.estimate import Estimate
from parallel.plan.memory import GIB, USABLE_MEMORY_FRACTION
from parallel.plan.pipeline import V_SCHEDULES, simulate

# Enough micro-batches to show warm-up, steady state and cool-down ...
SHOWN_MICRO_BATCHES_PER_STAGE = 3
# ... but never more simulated operations than this (a 64-stage ZB-V pipeline has 384 per micro-batch): the
# simulation and the drawing stay well under a second for any layout.
MAX_TIMELINE_OPS = 10_000
# Micro-batch numbers are written inside the boxes only when there are few enough to read.
MAX_LABELLED_OPS = 300
COLOURS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
           "transient": "#8172b3", "buffers": "#937860", "F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}


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
    for kind in ("parameters", "gradients", "optimizer", "activations", "transient", "buffers"):
        values = [getattr(m, kind) / GIB for m in ranks]
        left.bar(range(len(ranks)), values, bottom=bottom, color=COLOURS[kind], label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.axhline(capacity_bytes / GIB, color="black", linewidth=1, label="device memory")
    left.axhline(capacity_bytes * USABLE_MEMORY_FRACTION / GIB, color="black", linestyle="--", linewidth=1,
                 label="planning limit")
    left.set_xticks(range(len(ranks)) if len(ranks) <= 32 else range(0, len(ranks), max(1, len(ranks) // 16)))
    left.set_xlabel("pipeline rank")
    left.set_ylabel("GiB per device")
    left.set_ylim(0, capacity_bytes / GIB * 1.25)
    left.set_title("memory at peak, per pipeline rank")
    left.legend(fontsize=7, loc="upper center", ncol=3)

    if layout.pp > 1:
        timeline(right, layout.schedule, layout.pp, layout.vpp, micro_batches, estimate.forward, estimate.backward,
                 estimate.p2p)
    else:
        forward, backward = estimate.forward, estimate.backward
        shown = min(micro_batches, 8)
        right.broken_barh([(i * (forward + backward), forward) for i in range(shown)], (-0.4, 0.8),
                          facecolors=COLOURS["F"])
        right.broken_barh([(i * (forward + backward) + forward, backward) for i in range(shown)], (-0.4, 0.8),
                          facecolors=COLOURS["B"])
        right.set_ylim(-1, 1)
        right.set_yticks([0])
        right.set_title(f"no pipeline: {micro_batches} micro-batch(es) per step, forward then backward")
    right.set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def shown_micro_batches(schedule: str, pp: int, vpp: int, micro_batches: int) -> int:
    """How many of the step's micro-batches the timeline simulates and draws: 3 per stage, bounded by
    MAX_TIMELINE_OPS (interleaved: at least one whole round of pp, which may exceed the bound up to 4 pp vpp ops
    per rank, still a fixed-order simulation well under a second)."""
    kinds = 3 if schedule in V_SCHEDULES else 2
    per_micro_batch = pp * vpp * kinds
    budget = max(1, MAX_TIMELINE_OPS // per_micro_batch)
    shown = max(1, min(micro_batches, SHOWN_MICRO_BATCHES_PER_STAGE * pp, budget))
    if schedule == "interleaved_1f1b" and shown < micro_batches:
        # Megatron's interleaved order needs whole rounds of pp micro-batches (the step itself has them).
        shown = min(micro_batches, max(pp, shown // pp * pp))
    return shown


def timeline(ax, schedule: str, pp: int, vpp: int, micro_batches: int, forward: float, backward: float,  # noqa: ANN001
             p2p: float = 0.0) -> int:
    """Draw the simulated schedule on `ax`: one horizontal bar collection per (pipeline rank, kind), so the number
    of artists is at most 3 pp (plus MAX_LABELLED_OPS labels) however many micro-batches the step has. Returns the
    number of simulated operations drawn."""
    import matplotlib.pyplot as plt

    shown = shown_micro_batches(schedule, pp, vpp, micro_batches)
    ops = simulate(schedule, pp, vpp, shown, forward, backward, p2p)
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for op in ops:
        if op.end > op.start:
            bars.setdefault((op.rank, op.kind), []).append((op.start, op.end - op.start))
    for (rank, kind), spans in bars.items():
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=COLOURS[kind], edgecolors="white", linewidth=0.3)
    if len(ops) <= MAX_LABELLED_OPS:
        for op in ops:
            if op.end > op.start:
                ax.text((op.start + op.end) / 2, op.rank, str(op.micro_batch), ha="center", va="center",
                        fontsize=6, color="white")
    ax.set_ylim(pp - 0.5, -0.5)
    ax.set_yticks(range(pp) if pp <= 32 else range(0, pp, max(1, pp // 16)))
    ax.set_ylabel("pipeline rank")
    kinds = sorted({op.kind for op in ops})
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in kinds],
              labels=[{"F": "forward", "B": "backward", "W": "weight gradient"}[k] for k in kinds],
              fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    note = f" (first {shown} of {micro_batches} micro-batches)" if shown < micro_batches else ""
    ax.set_title(f"{schedule} schedule, pp={pp}, {vpp} chunk(s) per rank{note}", fontsize=9)
    return len(ops)
