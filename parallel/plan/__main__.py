"""`python -m parallel.plan model=<name> cluster=<name> [plan.global_batch=N plan.seq_len=N plan.tp=8 ...]`

Searches every layout for the cluster's device count, prints the fastest ones that fit, writes the best as
./configs/parallel/<name>.yaml under the current directory (run it from there with `python -m train
parallel=<name>`), optionally the candidates as JSON (plan.out=FILE.json), a picture (plan.plot, needs the `plot`
extra), and with plan.dry_run=true builds one rank's real sharded model and optimizer on the meta device to compare
its bytes with the prediction. Everything is written under the current directory unless a path says otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Optional

from configs.errors import ConfigError
from launch.autoload import defer_device_backends

# Before anything imports torch (the imports above do not; the rest are made lazily): see launch/autoload.py.
defer_device_backends()


def _error(message: str) -> int:
    print(f"supertrain plan: error: {message}", file=sys.stderr, flush=True)
    return 2


def launch_command(model: str, parallel: str, cluster: Any, world: int) -> str:
    """The `python -m launch` command that runs a written plan on the cluster it was planned for."""
    from launch.device import CPU, CUDA, NPU

    per_node = min(world, cluster.devices_per_node)
    device = CPU if cluster.host else NPU if "ascend" in cluster.device.name.lower() else CUDA
    nodes = -(-world // per_node)
    master = "" if nodes == 1 else " launch.master_addr=<node 0's address> launch.node_rank=<this node>"
    return (f"python -m launch model={model} parallel={parallel} device={device} launch.nodes={nodes} "
            f"launch.nproc_per_node={per_node}{master}  (or launch.scheduler=slurm|mindcluster)")


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        from configs.loading import config_groups

        groups = config_groups()
        print(__doc__.strip())
        print(f"\nmodels: {', '.join(groups['model'])}\nclusters: {', '.join(groups['cluster'])}\n"
              f"fields: parallel/plan/config.py")
        return 0
    try:
        return run(args)
    except ConfigError as error:
        return _error(str(error))


def run(args: list[str]) -> int:
    from models.counts import num_params
    from parallel.plan.config import load_plan_config
    from parallel.plan.estimate import Estimator, Workload
    from parallel.plan.report import breakdown, parallel_config, table, write_json, write_parallel_config
    from parallel.plan.search import Constraints, fixed_choice_problem, search
    from parallel.plan.topology import GIB, build_cluster, describe

    cfg = load_plan_config(args)
    model, plan = cfg.model, cfg.plan
    problem = fixed_choice_problem(model, plan)
    if problem is not None:
        raise ConfigError(f"{problem} (a degree fixed with plan.*)")
    cluster = build_cluster(cfg.cluster)
    world = cluster.num_devices
    seq_len = plan.seq_len or min(4096, model.max_seq_len)
    if seq_len > model.max_seq_len:
        raise ConfigError(f"plan.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    global_batch = plan.global_batch or 2 * world
    workload = Workload(model, seq_len, global_batch, plan.precision)
    from parallel.plan.software import software_named

    software = software_named(plan.software, cluster.host)
    ours = software.trainer_rules
    if plan.schedule is not None and plan.schedule not in software.schedules:
        raise ConfigError(f"plan.schedule={plan.schedule} is not one that {plan.software} runs "
                          f"({', '.join(software.schedules)})")
    constraints = Constraints.of(plan, allowed_schedules=software.schedules)

    print(f"model {model.name}: {num_params(model) / 1e9:.3g}B parameters ({num_params(model, True) / 1e9:.3g}B "
          f"active); seq_len {seq_len}, global batch {global_batch} sequences ({global_batch * seq_len:,} tokens), "
          f"{plan.precision}")
    print(f"cluster {describe(cluster)}")
    if not ours:
        print(f"software {software.name} (planned as that software runs; nothing is written for supertrain)")
    # Megatron splits layers evenly over the pipeline stages; our plans balance the output head's cost.
    estimator = Estimator(workload, cluster, software, even_split=not ours)
    result = search(estimator, world, constraints, keep=max(plan.keep, plan.top))
    fixed = constraints.fixed()
    print(f"searched {result.evaluated:,} layouts in {result.seconds:.2f}s ({result.pruned:,} mesh choices pruned by "
          f"training state alone; {result.notes[-1]})" + (f"; fixed: {fixed}" if fixed else ""))
    best = result.best
    if best is None:
        from parallel.plan.memory import USABLE_MEMORY_FRACTION

        usable = cluster.device.memory_bytes * USABLE_MEMORY_FRACTION
        smallest = result.smallest_state
        if smallest == float("inf"):
            why = "no layout satisfies the fixed fields and divisibility rules"
        elif smallest > usable:
            need = -(-int(world * smallest) // int(usable))
            why = (f"training state alone needs at least {smallest / GIB:.1f} GiB per device against {usable / GIB:.1f} "
                   f"GiB usable: use more devices (cluster.num_devices={max(need, world + 1)} or more)")
        else:
            why = (f"training state fits ({smallest / GIB:.1f} of {usable / GIB:.1f} GiB usable) but activations do "
                   f"not: lower plan.seq_len or plan.global_batch, or free a fixed field")
        return _error(f"no layout of {model.name} fits {world} x {cluster.device.name}"
                      f"{f' with {fixed}' if fixed else ''}: {why}")

    print()
    print(table(result.ranked[: plan.top]))
    print()
    print(f"best: {best.layout.short()}, micro-batch {best.layout.micro_batch}, recompute {best.layout.recompute}, "
          f"{best.layout.engine_label()}; {best.memory.gib()['total']:.1f} GiB per device")
    print(breakdown(best))
    if best.layout.dp_engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        print("note: this layout runs DeepSpeed, which is not installed here: pip install 'supertrain[deepspeed]' "
              "where it will run, or plan again with plan.dp_engine=fsdp")

    name = plan.name or f"plan_{model.name}_{cluster.name}_{world}"
    note = (f"{model.name} on {world} x {cluster.device.name} ({cluster.name}), predicted step "
            f"{best.step_time:.3g}s, MFU {best.mfu:.1%}, {best.memory.gib()['total']:.1f} GiB per device")
    if plan.write_config and ours:
        folder = Path(plan.config_dir or "configs/parallel")
        path = write_parallel_config(folder, name, parallel_config(best, workload, note))
        launcher = "python" if world == 1 else f"torchrun --nproc_per_node={min(world, cluster.devices_per_node)}"
        command = f"{launcher} -m train model={model.name} parallel={name}"
        if folder.name == "parallel" and folder.parent.name == "configs":
            where = folder.resolve().parent.parent
            print(f"wrote {path}; run it with: {command}" + ("" if where == Path.cwd() else f" (from {where})"))
        else:
            print(f"wrote {path}; python -m train finds it in ./configs/parallel/: copy it there, then run {command}")
        print(f"on the cluster it was planned for: {launch_command(model.name, name, cluster, world)}")
    if plan.out:
        header = {"model": model.name, "cluster": cluster.name, "num_devices": world, "seq_len": seq_len,
                  "global_batch": global_batch, "precision": plan.precision, "search_seconds": result.seconds}
        write_json(Path(plan.out), result.ranked[: plan.keep] if plan.keep else result.ranked, header)
        print(f"wrote {plan.out} ({min(len(result.ranked), plan.keep or len(result.ranked))} candidates, best first)")
    if plan.plot != "":
        from parallel.plan.plot import PlotUnavailable, plot_plan

        picture = Path(plan.plot) if plan.plot else Path("outputs") / "plan" / f"{name}.png"
        try:
            plot_plan(best, cluster.device.memory_bytes, best.layout.micro_batches(global_batch), note, picture)
            print(f"wrote {picture}")
        except PlotUnavailable as reason:
            print(f"no picture: {reason}")
    if plan.dry_run and ours:
        from parallel.plan.dryrun import dry_run, format_dry_run

        started = time.perf_counter()
        report = dry_run(estimator, best.layout, plan.dry_run_rank)
        print(format_dry_run(report, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
