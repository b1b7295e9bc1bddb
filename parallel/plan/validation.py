"""Check the planner against published training runs: `python -m parallel.plan.validation [FILE.csv] [--tol 0.15]`.

Without a file it checks the table shipped with the package (`parallel/plan/data/published_runs.csv`, each row with
its source). Each row gives a model (a `model` column naming a configs/model/<name>.yaml, shape columns overriding
it; or the shape columns alone for a dense model), a cluster preset, the layout the authors used, the software they
ran (`software`: supertrain, megatron-core, megatron-lm-2021 or megatron-lm-2022, as `plan.software`) and a
measured figure. We evaluate that layout (the search fills in what the source does not state, e.g. the
micro-batch) with that software, convert the predicted step time into the row's metric with the row's FLOP
convention, print the table and exit 1 if any checked row is off by more than --tol.

Columns (empty cell = not stated):
  id, source, software, cluster, num_devices, seq_len, global_batch, metric, value   required
  model, and any ModelConfig field (n_layers d_model n_heads n_kv_heads ffn_hidden activation vocab_size
  n_routed_experts top_k moe_ffn_hidden n_shared_experts n_dense_layers ...)       the model
  tp pp vpp cp ep micro_batch recompute sequence_parallel                          the published layout
  flops         FLOP convention for mfu: 6n (default: 6 x active parameters per token, FlagPerf's and most
                reports') or model (models.counts.flops_per_token: attention scores included)
  peak_tflops   the per-device peak the source divided by for mfu (default: the cluster preset's)
  tolerance     this row's own tolerance instead of --tol (a documented, known gap of the model: see the
                README's table)
  unexpressed   what of the published layout the planner cannot express (e.g. MoE parallel folding): the row is
                evaluated at the nearest layout it can express, shown with this note and not held to --tol
Metrics: mfu, tflops_per_device_incl_recompute (Narayanan et al. 2021 eq. 3, GPT-style dense models),
tokens_per_s_per_device, step_time_s.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

from launch.autoload import defer_device_backends

# Before anything imports torch (as parallel/plan/__main__.py does): see launch/autoload.py.
defer_device_backends()

from configs.errors import ConfigError  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402
from models.counts import num_params  # noqa: E402
from parallel.plan.estimate import Estimate, Estimator, Workload  # noqa: E402
from parallel.plan.search import Constraints, search  # noqa: E402
from parallel.plan.software import Software, software_named  # noqa: E402
from parallel.plan.topology import Cluster  # noqa: E402

PUBLISHED_RUNS = Path(__file__).resolve().parent / "data" / "published_runs.csv"
METRICS = ("tflops_per_device_incl_recompute", "mfu", "tokens_per_s_per_device", "step_time_s")
REQUIRED = ("id", "software", "cluster", "num_devices", "seq_len", "global_batch", "metric", "value")
LAYOUT_COLUMNS = ("tp", "pp", "vpp", "cp", "ep", "micro_batch", "recompute", "sequence_parallel")
# ModelConfig fields a row may set (scalars only; `name` comes from the row id or the model file).
SHAPE_COLUMNS = tuple(f.name for f in fields(ModelConfig)
                      if f.name not in ("name", "max_seq_len", "rope_scaling", "moe"))
DEFAULT_TOLERANCE = 0.15


@dataclass(frozen=True)
class Check:
    row: dict[str, str]
    estimate: Optional[Estimate]
    predicted: float
    published: float
    # Why the row is shown but not held to the tolerance (the `unexpressed` column), or "".
    note: str = ""

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def error(self) -> float:
        """Relative error of the prediction, (predicted - published) / published (nan when nothing fits)."""
        return (self.predicted - self.published) / self.published

    @property
    def checked(self) -> bool:
        return not self.note

    def tolerance(self, default: float) -> float:
        return float(self.row["tolerance"]) if self.row.get("tolerance") else default

    def passes(self, tolerance: float) -> bool:
        """Within the row's own tolerance if it states one, else `tolerance` (rows with a note always pass)."""
        return not self.checked or (self.estimate is not None and abs(self.error) <= self.tolerance(tolerance))


def read_rows(path: Path = PUBLISHED_RUNS) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)
                if any((v or "").strip() for v in row.values())]
    for number, row in enumerate(rows, 2):
        missing = [key for key in REQUIRED if not row.get(key)]
        if missing:
            raise ConfigError(f"{path}: line {number} ({row.get('id') or 'no id'}) has no {', '.join(missing)}")
        if row["metric"] not in METRICS:
            raise ConfigError(f"{path}: line {number} ({row['id']}): metric {row['metric']!r} is not one of "
                              f"{', '.join(METRICS)}")
    return rows


def row_software(row: dict[str, str]) -> Software:
    """The software the row's run used, from its `software` column (plan.software's names)."""
    return software_named(row["software"])


def _int(row: dict[str, str], key: str) -> Optional[int]:
    value = row.get(key, "")
    return int(value) if value else None


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _shape(row: dict[str, str]) -> dict[str, object]:
    return {key: _value(row[key]) for key in SHAPE_COLUMNS if row.get(key)}


def row_model(row: dict[str, str]) -> ModelConfig:
    """The row's model: configs/model/<model>.yaml with the row's shape columns overriding it, or (no `model`) a
    dense model from the shape columns alone."""
    seq_len = int(row["seq_len"])
    if row.get("model"):
        from parallel.plan.config import load_plan_config

        overrides = [f"model={row['model']}", f"model.max_seq_len={seq_len}"]
        overrides += [f"model.{key}={value}" for key, value in _shape(row).items()]
        return load_plan_config(overrides).model
    return ModelConfig(name=row["id"], max_seq_len=seq_len, **_shape(row))


def row_cluster(row: dict[str, str]) -> Cluster:
    from parallel.plan.config import load_plan_config
    from parallel.plan.topology import build_cluster

    cfg = load_plan_config(["model=tiny", f"cluster={row['cluster']}", f"cluster.num_devices={row['num_devices']}"])
    return build_cluster(cfg.cluster)


def row_constraints(row: dict[str, str], software: Software) -> Constraints:
    recompute = row.get("recompute") or None
    sp = row.get("sequence_parallel", "").lower()
    fixed = dict(tp=_int(row, "tp"), pp=_int(row, "pp"), vpp=_int(row, "vpp"), cp=_int(row, "cp"),
                 ep=_int(row, "ep"), micro_batch=_int(row, "micro_batch"), recompute=recompute,
                 sequence_parallel={"true": True, "false": False}.get(sp))
    if not software.sequence_parallel:
        fixed.update(sequence_parallel=False)
    if software.megatron_states:
        # Megatron runs 1F1B unless told to interleave (--virtual-pipeline-model-parallel-size): a source that
        # does not state vpp ran the default.
        vpp = fixed["vpp"] or 1
        fixed.update(vpp=vpp, schedule="interleaved_1f1b" if vpp > 1 else "1f1b")
    return Constraints(**fixed, allowed_schedules=software.schedules)


def metric_value(row: dict[str, str], estimate: Estimate, model: ModelConfig,
                 estimator: Optional[Estimator] = None) -> float:
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
        peak = float(row["peak_tflops"]) * 1e12 if row.get("peak_tflops") else _peak(estimate)
        convention = row.get("flops") or "6n"
        if convention == "6n":
            # 6 N FLOPs per token with N the (active) parameter count: FlagPerf's convention
            # (training/benchmarks/llama3_70B/megatron/run_pretraining.py: tokens/s x 70e9 x 6 / peak).
            per_token = 6 * num_params(model, active_only=True)
        elif convention == "model" and estimator is not None:
            per_token = estimator.model_flops_per_token
        else:
            raise ConfigError(f"published run {row['id']}: flops={convention!r} must be 6n or model")
        return estimate.tokens_per_s_per_device * per_token / peak
    if metric == "tokens_per_s_per_device":
        return estimate.tokens_per_s_per_device
    if metric == "step_time_s":
        return estimate.step_time
    raise ConfigError(f"published run {row['id']}: metric {metric!r} is not one of {', '.join(METRICS)}")


def _peak(estimate: Estimate) -> float:
    return estimate.tflops_per_device * 1e12 / estimate.mfu


def check_row(row: dict[str, str], cluster: Optional[Cluster] = None) -> Check:
    software = row_software(row)
    model = row_model(row)
    cluster = cluster or row_cluster(row)
    workload = Workload(model, int(row["seq_len"]), int(row["global_batch"]), "bf16")
    estimator = Estimator(workload, cluster, software, even_split=not software.trainer_rules)
    result = search(estimator, int(row["num_devices"]), row_constraints(row, software), keep=1)
    best = result.best
    note = row.get("unexpressed", "")
    if best is None:
        return Check(row, None, math.nan, float(row["value"]), note)
    return Check(row, best, metric_value(row, best, model, estimator), float(row["value"]), note)


def check_all(path: Path = PUBLISHED_RUNS) -> list[Check]:
    return [check_row(row) for row in read_rows(path)]


def markdown_table(checks: list[Check]) -> str:
    """The README table: each published row, our prediction and the error."""
    lines = ["| id | cluster | devices | software | layout (tp/pp/dp, mb) | metric | published | predicted | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        r, e = c.row, c.estimate
        layout = f"{e.layout.tp}/{e.layout.pp}/{e.layout.dp}, {e.layout.micro_batch}" if e else "does not fit"
        if e and e.layout.ep > 1:
            layout = layout.replace(",", f" ep{e.layout.ep},", 1)
        error = f"{c.error:+.1%}" if e else "-"
        if c.note:
            error += f" (not checked: {c.note})"
        elif c.row.get("tolerance"):
            error += f" (row tolerance {c.tolerance(0):.0%})"
        lines.append(f"| {c.id} | {r['cluster']} | {r['num_devices']} | {r['software']} | {layout} | {r['metric']} | "
                     f"{c.published:g} | {c.predicted:.3g} | {error} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel.plan.validation", description=__doc__.split("\n")[0],
                                     epilog="Columns and metrics: see parallel/plan/validation.py")
    parser.add_argument("csv", nargs="?", default=str(PUBLISHED_RUNS),
                        help="published runs (default: the shipped table)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest relative error a checked row may have unless its tolerance column says "
                        f"otherwise (default {DEFAULT_TOLERANCE})")
    args = parser.parse_args(argv)
    try:
        checks = check_all(Path(args.csv))
    except (ConfigError, OSError, ValueError, KeyError) as error:
        print(f"supertrain plan validation: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(checks))
    failed = [c for c in checks if not c.passes(args.tol)]
    checked = [c for c in checks if c.checked]
    print(f"\n{len(checked) - len(failed)} of {len(checked)} checked rows within {args.tol:.0%}"
          + (f"; outside: {', '.join(c.id for c in failed)}" if failed else "")
          + (f"; {len(checks) - len(checked)} shown, not checked" if len(checked) < len(checks) else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
