"""Check the planner against published training runs (`parallel/plan/data/published_runs.csv`, shipped with the
package; each row names its source).

Each row gives a model shape, a cluster, the layout the authors used and a measured figure. We evaluate that
layout (the search fills in what the source does not state, e.g. the micro-batch) with the software the run used,
convert our predicted step time into the row's metric with the row's own FLOP convention, and report the error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from configs.errors import ConfigError
from configs.schema import ModelConfig
from models.counts import num_params
from parallel.plan.estimate import Estimate, Estimator, Workload
from parallel.plan.search import Constraints, search
from parallel.plan.software import MEGATRON_2021, MEGATRON_CORE, SUPERTRAIN, Software
from parallel.plan.topology import Cluster

PUBLISHED_RUNS = Path(__file__).resolve().parent / "data" / "published_runs.csv"
METRICS = ("tflops_per_device_incl_recompute", "mfu", "tokens_per_s_per_device", "step_time_s")


@dataclass(frozen=True)
class Check:
    row: dict[str, str]
    estimate: Optional[Estimate]
    predicted: float
    published: float

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def error(self) -> float:
        """Relative error of the prediction, (predicted - published) / published."""
        return (self.predicted - self.published) / self.published


def read_rows(path: Path = PUBLISHED_RUNS) -> list[dict[str, str]]:
    with path.open() as f:
        return [row for row in csv.DictReader(f)]


def software_for(source: str) -> Software:
    """The software a published run used, from its source: Megatron-LM as of Narayanan et al. 2021, later
    Megatron(-Core) runs, or a modern stack like ours for anything else."""
    text = source.lower()
    if "narayanan" in text or "2021" in text:
        return MEGATRON_2021
    if "megatron" in text:
        return MEGATRON_CORE
    return SUPERTRAIN


def _int(row: dict[str, str], key: str) -> Optional[int]:
    value = (row.get(key) or "").strip()
    return int(value) if value else None


def row_model(row: dict[str, str]) -> ModelConfig:
    return ModelConfig(
        name=row["id"], n_layers=int(row["n_layers"]), d_model=int(row["d_model"]), n_heads=int(row["n_heads"]),
        n_kv_heads=int(row["n_kv_heads"]), ffn_hidden=int(row["ffn_hidden"]), activation=row["activation"],
        vocab_size=int(row["vocab_size"]), max_seq_len=int(row["seq_len"]),
    )


def row_constraints(row: dict[str, str], software: Software) -> Constraints:
    recompute = (row.get("recompute") or "").strip() or None
    fixed = dict(tp=_int(row, "tp"), pp=_int(row, "pp"), vpp=_int(row, "vpp"), cp=_int(row, "cp"),
                 ep=_int(row, "ep"), micro_batch=_int(row, "micro_batch"), recompute=recompute)
    if software is MEGATRON_2021:
        # Megatron-LM 2021 predates sequence parallelism (Korthikanti et al. 2022).
        fixed.update(sequence_parallel=False)
    if software.megatron_states:
        # Megatron runs 1F1B unless told to interleave (--virtual-pipeline-model-parallel-size): a source that
        # does not state vpp ran the default.
        vpp = fixed["vpp"] or 1
        fixed.update(vpp=vpp, schedule="interleaved_1f1b" if vpp > 1 else "1f1b")
    return Constraints(**fixed)


def metric_value(row: dict[str, str], estimate: Estimate, model: ModelConfig) -> float:
    """The row's metric computed from our prediction, with the FLOP convention the source used."""
    metric = row["metric"]
    seq, batch, devices = int(row["seq_len"]), int(row["global_batch"]), int(row["num_devices"])
    if metric == "tflops_per_device_incl_recompute":
        # Narayanan et al. 2021, eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh) per step, which counts one extra
        # forward pass for full recomputation (72 without it).
        h, layers, vocab = model.d_model, model.n_layers, model.vocab_size
        passes = 4 if estimate.layout.recompute == "full" else 3
        flops = 24 * passes * batch * seq * layers * h * h * (1 + seq / (6 * h) + vocab / (16 * layers * h))
        return flops / estimate.step_time / devices / 1e12
    if metric == "mfu":
        # 6 N FLOPs per token with N the (active) parameter count: FlagPerf's convention
        # (training/benchmarks/llama3_70B/megatron/run_pretraining.py: tokens/s x 70e9 x 6 / peak).
        return estimate.tokens_per_s_per_device * 6 * num_params(model, active_only=True) / _peak(row, estimate)
    if metric == "tokens_per_s_per_device":
        return estimate.tokens_per_s_per_device
    if metric == "step_time_s":
        return estimate.step_time
    raise ConfigError(f"published run {row['id']}: metric {metric!r} is not one of {', '.join(METRICS)}")


def _peak(row: dict[str, str], estimate: Estimate) -> float:
    return estimate.tflops_per_device * 1e12 / estimate.mfu


def check_row(row: dict[str, str], cluster: Cluster) -> Check:
    software = software_for(row.get("source", ""))
    model = row_model(row)
    workload = Workload(model, int(row["seq_len"]), int(row["global_batch"]), "bf16")
    estimator = Estimator(workload, cluster, software, even_split=software is not SUPERTRAIN)
    result = search(estimator, int(row["num_devices"]), row_constraints(row, software), keep=1)
    best = result.best
    if best is None:
        return Check(row, None, float("nan"), float(row["value"]))
    return Check(row, best, metric_value(row, best, model), float(row["value"]))


def markdown_table(checks: list[Check]) -> str:
    """The README table: each published row, our prediction and the error."""
    lines = ["| id | cluster | devices | layout (tp/pp/dp, mb) | metric | published | predicted | error |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        r = c.row
        e = c.estimate
        layout = f"{e.layout.tp}/{e.layout.pp}/{e.layout.dp}, {e.layout.micro_batch}" if e else "does not fit"
        lines.append(f"| {c.id} | {r['cluster']} | {r['num_devices']} | {layout} | {r['metric']} | {c.published:g} | "
                     f"{c.predicted:.3g} | {c.error:+.1%} |")
    return "\n".join(lines)


def check_all(path: Path = PUBLISHED_RUNS) -> list[Check]:
    from parallel.plan.config import load_plan_config
    from parallel.plan.topology import build_cluster

    checks = []
    for row in read_rows(path):
        cfg = load_plan_config(["model=tiny", f"cluster={row['cluster']}", f"cluster.num_devices={row['num_devices']}"])
        checks.append(check_row(row, build_cluster(cfg.cluster)))
    return checks


if __name__ == "__main__":
    print(markdown_table(check_all()))
