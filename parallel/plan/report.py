"""What the planner hands back: the ranked table, the JSON of candidates, and the chosen layout as a
`configs/parallel/<name>.yaml` that `python -m train parallel=<name>` accepts unchanged (the trainer's own
`ParallelConfig`, from `Layout.to_parallel_config`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parallel.plan.estimate import Estimate, Workload

COLUMNS = ("#", "layout", "mb", "recompute", "engine", "schedule", "mem GiB (params/grads/optim/act/transient)",
           "step s", "tok/s/dev", "TFLOP/s/dev", "MFU", "HFU")


def candidate(estimate: Estimate) -> dict[str, Any]:
    """One JSON record: the fields the issue names, plus the data-parallel split and the breakdowns."""
    layout = estimate.layout
    memory = estimate.memory.gib()
    return {
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "cp_impl": layout.cp_impl, "ep": layout.ep,
        "dp": layout.dp,
        "micro_batch": layout.micro_batch, "recompute": layout.recompute,
        "zero_stage": layout.zero_stage, "schedule": layout.schedule if layout.pp > 1 else "none",
        "memory_gib_per_device": round(memory["total"], 3),
        "step_time_s": estimate.step_time,
        "tokens_per_s_per_device": estimate.tokens_per_s_per_device,
        "tflops_per_device": estimate.tflops_per_device,
        "mfu": estimate.mfu, "hfu": estimate.hfu, "fits": estimate.fits,
        "dp_engine": layout.dp_engine, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
        "sequence_parallel": layout.sequence_parallel,
        "memory_breakdown_gib": {k: round(v, 3) for k, v in memory.items() if k != "total"},
        "time_breakdown_s": dict(vars(estimate.time)),
        "stage_layers": list(estimate.stage_layers),
    }


def write_json(path: Path, estimates: list[Estimate], header: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "candidates": [candidate(e) for e in estimates]}, indent=1) + "\n")


def table(estimates: list[Estimate]) -> str:
    # Collective-library buffers (HCCL) get a sixth figure where the cluster has them.
    buffers = any(e.memory.buffers > 0 for e in estimates)
    columns = tuple(c.replace("transient)", "transient/comm)") if buffers else c for c in COLUMNS)
    rows = [columns]
    for i, e in enumerate(estimates, 1):
        g = e.memory.gib()
        layout = e.layout
        memory = (f"{g['total']:5.1f} ({g['parameters']:.1f}/{g['gradients']:.1f}/{g['optimizer']:.1f}/"
                  f"{g['activations']:.1f}/{g['transient']:.1f}" + (f"/{g['buffers']:.1f})" if buffers else ")"))
        schedule = f"{layout.schedule}" + (f" v{layout.vpp}" if layout.vpp > 1 else "") if layout.pp > 1 else "-"
        rows.append((str(i), layout.short() + ("" if layout.sequence_parallel or layout.tp == 1 else " no-sp"),
                     str(layout.micro_batch), layout.recompute, layout.engine_label(), schedule, memory,
                     f"{e.step_time:.3g}", f"{e.tokens_per_s_per_device:,.0f}", f"{e.tflops_per_device:.1f}",
                     f"{e.mfu:.1%}", f"{e.hfu:.1%}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown(estimate: Estimate) -> str:
    t = estimate.time
    parts = [f"{name} {getattr(t, name):.3g}s" for name in ("compute", "recompute", "bubble", "tp", "cp", "ep", "pp",
                                                              "dp", "optimizer") if getattr(t, name) > 0]
    counts = estimate.stage_layers
    stages = f"; layers per stage {list(counts)}" if len(counts) > 1 else ""
    line = f"step {estimate.step_time:.4g}s = " + " + ".join(parts) + f" (recompute is inside compute){stages}"
    if estimate.memory.buffers > 0:
        from parallel.plan.memory import GIB, communicator_groups

        groups = communicator_groups(estimate.layout)
        line += (f"\ncommunicator buffers {estimate.memory.buffers / GIB:.2f} GiB per device: {len(groups)} groups "
                 f"({', '.join(groups)}) x 2 x HCCL_BUFFSIZE")
    return line


def parallel_config(estimate: Estimate, workload: Workload, note: str) -> str:
    """YAML of a parallel config group file. `# @package _global_` lets it set train.* too."""
    from omegaconf import OmegaConf

    layout = estimate.layout
    # The planner's split (balanced for the output head's cost), stated so train cuts the same stages; the
    # trainer reports its measured step time next to predicted_step_s.
    parallel = layout.to_parallel_config(estimate.stage_layers, predicted_step_s=float(f"{estimate.step_time:.6g}"))
    fields = ("dp_replicate", "dp_shard", "cp", "cp_impl", "tp", "pp", "vpp", "ep", "dp_engine", "zero_stage",
              "sequence_parallel", "recompute", "pp_schedule", "pp_layers", "predicted_step_s")
    as_dict = OmegaConf.to_container(OmegaConf.structured(parallel), enum_to_str=True)
    written = {
        "parallel": {key: as_dict[key] for key in fields},
        "train": {"seq_len": workload.seq_len, "global_batch": workload.global_batch,
                  "micro_batch": layout.micro_batch, "mixed_precision": workload.precision},
    }
    header = f"# @package _global_\n# Written by the planner: {note}\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(written))


def write_parallel_config(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path
