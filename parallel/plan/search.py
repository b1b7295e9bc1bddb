"""Every valid layout for a device count, pruned by memory, ranked by predicted step time.

The search walks the degrees outermost first (tp, cp, pp, engine, data-parallel split, ep) and drops a whole branch
as soon as its training state alone cannot fit; then, for each pipeline schedule and micro-batch, it takes the
cheapest recompute mode that fits (none is faster than selective, which is faster than full, with everything else
equal). Degrees the user fixes (`Constraints`) are the only values tried for them, even beyond the search's own
limits (MAX_TP, MAX_VPP, MIN_CP_CHUNK). What can run is decided by parallel/rules.py, the trainer's own rules: every
candidate passes `layout_problem` before it is scored, so every plan is runnable (published runs of other software,
whose layouts are facts, are scored under that software's constraints instead).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

from configs.errors import ConfigError
from configs.schema import ModelConfig
from parallel.layout import DP_ENGINES, RECOMPUTE, SCHEDULES, Layout
from parallel.plan.estimate import Estimate, Estimator
from parallel.plan.memory import USABLE_MEMORY_FRACTION
from parallel.plan.software import Software
from parallel.rules import (
    CP_IMPLS,
    Problem,
    context_parallel_problem,
    engine_problem,
    expert_parallel_problem,
    layout_problem,
    pipeline_problem,
    schedule_problem,
    tensor_parallel_problem,
)

# The widest tensor-parallel group we consider: beyond 16 the per-rank matmuls get thin and every layer waits on
# four collectives, whatever the link.
MAX_TP = 16
# Interleaved schedules beyond 4 chunks per rank gain little bubble and add point-to-point traffic.
MAX_VPP = 4
# Context parallel pays off for long sequences only: ring attention hides each K/V hop behind the attention of the
# chunk at hand only when chunks are long. The search keeps each rank's share at least this long (plan.cp forces
# any value).
MIN_CP_CHUNK = 4096


@dataclass
class FixedChoices:
    """Degrees and choices the user fixed (None: the search chooses); also the plan.* fields of the CLI."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    vpp: Optional[int] = None
    cp: Optional[int] = None
    # ring | allgather | ulysses (parallel/context.py); None: each is tried where cp > 1.
    cp_impl: Optional[str] = None
    ep: Optional[int] = None
    dp_replicate: Optional[int] = None
    dp_shard: Optional[int] = None
    micro_batch: Optional[int] = None
    recompute: Optional[str] = None
    schedule: Optional[str] = None
    dp_engine: Optional[str] = None
    zero_stage: Optional[int] = None
    sequence_parallel: Optional[bool] = None


@dataclass
class Constraints(FixedChoices):
    """What the search must respect: the fixed choices, checked, and the schedules the software offers."""

    # Schedules the search may choose from when `schedule` is not fixed (the software may lack some).
    allowed_schedules: tuple[str, ...] = SCHEDULES

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "cp", "ep", "dp_replicate", "dp_shard", "micro_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"plan.{name}={value} must be >= 1 (or null to let the planner choose)")
        for name, allowed in (("recompute", RECOMPUTE), ("schedule", SCHEDULES), ("dp_engine", DP_ENGINES),
                              ("cp_impl", CP_IMPLS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"plan.{name}={value!r} is not one of {', '.join(allowed)}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"plan.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")

    def fixed(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(FixedChoices) if getattr(self, f.name) is not None}

    @classmethod
    def of(cls, choices: FixedChoices, **extra: object) -> "Constraints":
        return cls(**{f.name: getattr(choices, f.name) for f in fields(FixedChoices)}, **extra)


@dataclass
class SearchResult:
    ranked: list[Estimate]
    evaluated: int
    pruned: int
    seconds: float
    # Smallest training-state footprint seen (bytes), to say how far from fitting the best attempt was.
    smallest_state: float = float("inf")
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Optional[Estimate]:
        return self.ranked[0] if self.ranked else None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(fixed: Optional[int], options: list[int]) -> list[int]:
    if fixed is None:
        return options
    return [fixed] if fixed in options else []


def tp_options(model: ModelConfig, world: int, max_tp: int, fixed: Optional[int] = None) -> list[int]:
    """Tensor-parallel degrees the rules allow, up to max_tp (a fixed degree is tried whatever its size)."""
    return [tp for tp in divisors(world)
            if (tp <= max_tp or tp == fixed) and tensor_parallel_problem(model, tp) is None]


# (dp_engine, zero_stage): FSDP2 is ZeRO-3, DDP ZeRO-0, DeepSpeed one of its stages.
ENGINES = (("fsdp", 3), ("ddp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))


def _engines(c: Constraints, software: Software) -> list[tuple[str, int]]:
    """(dp_engine, zero_stage) pairs to try; which combine with which degrees is parallel/rules.py's engine rule.
    Megatron (published runs) has one engine, described by its `Software`."""
    if software.megatron_states:
        return [("ddp", 0)]
    engines = list(ENGINES)
    if c.dp_engine is not None:
        engines = [e for e in engines if e[0] == c.dp_engine]
    if c.zero_stage is not None:
        engines = [e for e in engines if e[1] == c.zero_stage]
    return engines


def _schedules(c: Constraints, model: ModelConfig, pp: int) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs for pp pipeline ranks: one stage per rank, the V schedules' two, interleaved up to
    MAX_VPP (or the fixed vpp); what each needs of the micro-batches is checked per candidate."""
    if pp == 1:
        return [("1f1b", 1)] if c.schedule in (None, "1f1b") and c.vpp in (None, 1) else []
    interleaved = range(2, max(MAX_VPP, c.vpp or 0) + 1)
    options = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 2), ("dualpipev", 2)]
    options += [("interleaved_1f1b", v) for v in interleaved]
    options = [(s, v) for s, v in options if pipeline_problem(model, pp, v) is None]
    options = [(s, v) for s, v in options if s == c.schedule or c.schedule is None and s in c.allowed_schedules]
    if c.vpp is not None:
        options = [(s, v) for s, v in options if v == c.vpp]
    return options


def replicate_options(dp: int, inner: int, domains: list[int]) -> list[int]:
    """HSDP splits: shard within one domain of a link tier (a node, a supernode), replicate across domains.
    Plain FSDP (dp_replicate=1) is always an option; other splits are tried when a fixed dp_replicate asks."""
    options = {1}
    for span in domains:
        if span % inner == 0 and dp % (span // inner) == 0:
            options.add(dp // (span // inner))
    return sorted(options)


def meshes(model: ModelConfig, world: int, seq_len: int, global_batch: int, c: Constraints,
           max_tp: int = MAX_TP, trainer_rules: bool = True) -> Iterator[tuple[int, int, int, int]]:
    """(tp, cp, pp, dp) combinations whose product is the world size. Context parallelism is tried only where each
    rank keeps at least MIN_CP_CHUNK tokens (a fixed cp always) and, for supertrain, where the rules allow it."""
    for tp in _choices(c.tp, tp_options(model, world, max_tp, c.tp)):
        rest = world // tp
        cps = [cp for cp in divisors(rest) if cp == c.cp or seq_len % (2 * cp) == 0 and seq_len // cp >= MIN_CP_CHUNK]
        if trainer_rules:
            cps = [cp for cp in cps if context_parallel_problem(model, cp, c.cp_impl or "ring", tp, seq_len) is None]
        for cp in _choices(c.cp, cps or [1]):
            pps = [p for p in divisors(rest // cp) if pipeline_problem(model, p, 1) is None]
            for pp in _choices(c.pp, pps):
                dp = rest // (cp * pp)
                if global_batch % dp == 0:
                    yield tp, cp, pp, dp


def dp_splits(dp_engine: str, dp: int, inner: int, domains: tuple[int, ...], c: Constraints) -> list[tuple[int, int]]:
    """(dp_replicate, dp_shard) for an engine: DDP replicates over all of dp, DeepSpeed shards over all of it,
    FSDP shards (or, as HSDP, shards within a domain and replicates across)."""
    if dp_engine == "ddp":
        splits = [(dp, 1)]
    elif dp_engine == "deepspeed":
        splits = [(1, dp)]
    elif c.dp_replicate is not None or c.dp_shard is not None:
        splits = [(r, dp // r) for r in divisors(dp)]
    else:
        splits = [(r, dp // r) for r in replicate_options(dp, inner, list(domains))]
    return [(r, s) for r, s in splits
            if (c.dp_replicate is None or r == c.dp_replicate) and (c.dp_shard is None or s == c.dp_shard)]


def search(estimator: Estimator, world: int, constraints: Constraints = Constraints(), keep: int = 200,
           max_tp: Optional[int] = None) -> SearchResult:
    started = time.perf_counter()
    wl = estimator.workload
    model = wl.model
    capacity = estimator.cluster.device.memory_bytes * USABLE_MEMORY_FRACTION
    if max_tp is None:
        first = estimator.cluster.tiers[0].span or world
        max_tp = min(MAX_TP, max(first, 1))
    domains = tuple(t.span for t in estimator.cluster.tiers if 0 < t.span < world)
    found: list[Estimate] = []
    evaluated = pruned = 0
    smallest = float("inf")
    c = constraints
    sp_options = [None] if c.sequence_parallel is None else [c.sequence_parallel]
    if not estimator.software.sequence_parallel:
        sp_options = [False]
    rules = estimator.software.trainer_rules
    for tp, cp, pp, dp in meshes(model, world, wl.seq_len, wl.global_batch, c, max_tp, rules):
        for dp_engine, zero_stage in _engines(c, estimator.software):
            # Megatron's data-parallel ranks (from which it carves expert parallelism) as one dp_shard dimension;
            # its state handling is the Software's, not FSDP's.
            splits = [(1, dp)] if estimator.software.megatron_states else dp_splits(dp_engine, dp, tp * cp, domains, c)
            for dp_replicate, dp_shard in splits:
                eps = [e for e in divisors(dp_shard) if expert_parallel_problem(model, e, dp_shard) is None]
                for ep in _choices(c.ep, eps):
                    if rules and engine_problem(dp_engine, zero_stage, tp, pp, cp, ep, dp_replicate, dp) is not None:
                        continue
                    for sequence_parallel, cp_impl in itertools.product(sp_options, _cp_impls(c, cp, rules)):
                        base = Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp_replicate=dp_replicate, dp_shard=dp_shard,
                                      dp_engine=dp_engine, zero_stage=zero_stage, cp_impl=cp_impl,
                                      sequence_parallel=tp > 1 and sequence_parallel is not False)
                        floor = estimator.state_floor(base)
                        smallest = min(smallest, floor)
                        if floor > capacity:
                            pruned += 1
                            continue
                        for schedule, vpp in _schedules(c, model, pp):
                            found_here, count = _micro_batches(
                                estimator, base.with_(schedule=schedule, vpp=vpp), dp, c, capacity)
                            evaluated += count
                            found.extend(found_here)
    # Equal times: prefer the engine supertrain runs natively, then the smaller footprint.
    preference = {"fsdp": 0, "ddp": 1, "deepspeed": 2}
    found.sort(key=lambda e: (round(e.step_time, 9), preference[e.layout.dp_engine], e.memory.total))
    result = SearchResult(found[:keep] if keep else found, evaluated, pruned, time.perf_counter() - started, smallest)
    result.notes.append(f"{len(found)} layouts fit")
    return result


def _cp_impls(c: Constraints, cp: int, trainer_rules: bool) -> list[str]:
    """The context-parallel implementations to weigh: each of the trainer's where cp > 1 (other software's published
    runs: ring, the one the time model knew before)."""
    if cp == 1 or not trainer_rules:
        return [c.cp_impl or "ring"]
    return [c.cp_impl] if c.cp_impl else list(CP_IMPLS)


def _micro_batches(estimator: Estimator, base: Layout, dp: int, c: Constraints, capacity: float
                   ) -> tuple[list[Estimate], int]:
    wl = estimator.workload
    per_rank = wl.global_batch // dp
    found, evaluated = [], 0
    for micro_batch in _choices(c.micro_batch, divisors(per_rank)):
        layout = base.with_(micro_batch=micro_batch)
        if _problem(layout, estimator) is not None:
            continue
        fitted = False
        modes = estimator.software.recompute_modes
        for recompute in ([c.recompute] if c.recompute else [r for r in RECOMPUTE if r in modes]):
            candidate = layout.with_(recompute=recompute)
            memory = estimator.memory(candidate)
            evaluated += 1
            if memory[0].total <= capacity:
                found.append(estimator.evaluate(candidate, memory))
                fitted = True
                break
        if not fitted and c.micro_batch is None:
            break  # a larger micro-batch needs more memory still
    return found, evaluated


def _problem(layout: Layout, estimator: Estimator) -> Optional[Problem]:
    """Why the trainer could not run `layout` (parallel/rules.py); for other software's published runs only what
    the schedule model itself needs of the micro-batches."""
    wl = estimator.workload
    if estimator.software.trainer_rules:
        return layout_problem(layout, wl.model, wl.global_batch, seq_len=wl.seq_len)
    return schedule_problem(layout.schedule, layout.pp, layout.vpp, layout.micro_batches(wl.global_batch))


def fixed_choice_problem(model: ModelConfig, c: FixedChoices) -> Optional[Problem]:
    """A degree the user fixed that the rules refuse whatever the others are, to name instead of finding nothing."""
    checks = (
        (c.tp is not None, lambda: tensor_parallel_problem(model, c.tp)),
        (c.cp is not None, lambda: context_parallel_problem(model, c.cp, c.cp_impl or "ring", c.tp or 1)),
        (c.pp is not None, lambda: pipeline_problem(model, c.pp, c.vpp or 1)),
        (c.ep is not None, lambda: expert_parallel_problem(model, c.ep, c.ep)),
    )
    for fixed, check in checks:
        problem = check() if fixed else None
        if problem is not None:
            return problem
    return None
