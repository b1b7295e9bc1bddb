"""Pipeline schedules: which layers each rank holds, how many micro-batches of activations it keeps alive, how long
a step takes, and (for the picture) when each rank runs each forward and backward.

The five schedules are those parallel/pipeline.py runs (torch.distributed.pipelining); what each needs, the even
layer split and the stage placement are parallel/rules.py's, shared with the trainer. F and B are one micro-batch's
forward and backward over all of a rank's layers, W the weight-gradient half of B, p = pp, v = chunks per rank.
- gpipe: all forwards, then all backwards; every rank keeps all m micro-batches. Bubble (p-1)(F+B).
- 1f1b: p-r-1 warm-up forwards, then one forward one backward. Rank r keeps p-r micro-batches; bubble (p-1)(F+B).
- interleaved_1f1b (Narayanan et al. 2021): v chunks per rank in loop order; bubble (p-1)(F+B)/v; rank 0 keeps
  p(1 + (p-1)/(p v)) micro-batches' worth of its layers (Korthikanti et al. 2022, s4.2.3).
- zero_bubble (ZB-V, Qi et al. 2023/2024): two chunks per rank in V order (rank r holds stages r and 2p-1-r),
  weight gradients deferred into the gaps. Per chunk F' = F/2, B' = W' = B/4: bubble (p-1) max(0, F' + B' - 2W'),
  about zero when B = 2F; peak activations as 1f1b (p micro-batches), spread evenly over the ranks.
- dualpipev (DeepSeek-V3 report s3.2.1, DualPipe folded into a V): bubble (p-1)(F&B + B' - 3W') ~ (p-1)F per the
  report's Table 2 with F&B = F' + B'; p+1 micro-batches of activations; one micro-batch's expert all-to-all hides
  behind another's compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from parallel.rules import PLACEMENT, rank_stages

V_SCHEDULES = tuple(name for name, placement in PLACEMENT.items() if placement == "v")


def balanced_split(layer_costs: Sequence[float], first_extra: float, last_extra: float, stages: int) -> list[int]:
    """Contiguous split of layers into `stages` non-empty stages minimising the costliest stage, where the first
    stage also pays `first_extra` and the last `last_extra` (embedding, output head). Exact dynamic programme."""
    n = len(layer_costs)
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: minimal max-cost of splitting the first i layers into s stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra = (first_extra if s == 1 else 0.0) + (last_extra if s == stages else 0.0)
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def in_flight(schedule: str, pp: int, vpp: int, micro_batches: int, rank: int) -> float:
    """Micro-batches' worth of this rank's layers whose activations are alive at the rank's peak."""
    m = micro_batches
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "zero_bubble":
        return float(min(m, pp))
    if schedule == "dualpipev":
        return float(min(m, pp + 1))
    if vpp > 1:
        chunks = min((pp - rank - 1) * 2 + (vpp - 1) * pp + 1, m * vpp)
        return chunks / vpp
    return float(min(m, pp - rank))


def bubble_time(schedule: str, pp: int, vpp: int, forward: float, backward: float) -> float:
    """Idle time a step adds on top of m (F + B), for the slowest rank's per-micro-batch forward and backward."""
    if pp == 1:
        return 0.0
    if schedule == "zero_bubble":
        return (pp - 1) * max(0.0, forward / 2 + backward / 4 - 2 * backward / 4)
    if schedule == "dualpipev":
        return (pp - 1) * (forward / 2 + backward / 2 + backward / 2 - 3 * backward / 4)
    if schedule == "interleaved_1f1b":
        return (pp - 1) * (forward + backward) / vpp
    return (pp - 1) * (forward + backward)


# ---- timeline (for the picture, and to check the closed forms) ------------------------------------------------


@dataclass(frozen=True)
class Op:
    rank: int
    kind: str  # F, B (input gradient, or whole backward) or W (weight gradient)
    stage: int
    micro_batch: int
    start: float
    end: float


def _order(schedule: str, pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """(kind, local chunk, micro-batch) in the order this rank runs them (Megatron's interleaved order)."""
    if schedule == "gpipe":
        return [("F", 0, i) for i in range(m)] + [("B", 0, i) for i in range(m)]
    total = m * vpp

    def forward_id(k: int) -> tuple[int, int]:
        group, offset = divmod(k, pp * vpp)
        return offset // pp, group * pp + offset % pp

    def backward_id(k: int) -> tuple[int, int]:
        chunk, mb = forward_id(k)
        return vpp - 1 - chunk, mb

    warmup = min(pp - rank - 1, m) if vpp == 1 else min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order: list[tuple[str, int, int]] = [("F", *forward_id(k)) for k in range(warmup)]
    for k in range(total):
        if warmup + k < total:
            order.append(("F", *forward_id(warmup + k)))
        order.append(("B", *backward_id(k)))
    return order


def _dependencies(kind: str, stage: int, mb: int, last_stage: int) -> list[tuple[str, int, int]]:
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    if kind == "B":
        return [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < last_stage else [])
    return [("B", stage, mb)]


def simulate(schedule: str, pp: int, vpp: int, m: int, forward: float, backward: float, p2p: float = 0.0) -> list[Op]:
    """When each rank runs each forward / backward; `forward`/`backward` are per micro-batch over all of a rank's
    chunks. gpipe, 1f1b and interleaved_1f1b follow their fixed per-rank orders; zero_bubble and dualpipev run
    greedily (input-gradient first, then a forward within the activation budget, weight gradients to fill gaps)."""
    chunks = vpp  # the V schedules' two, by the rules
    split_w = schedule in V_SCHEDULES
    f_time, b_time = forward / chunks, backward / chunks
    durations = {"F": f_time, "B": b_time / 2 if split_w else b_time, "W": b_time / 2}
    stages_of = [rank_stages(schedule, pp, chunks, r) for r in range(pp)]
    owner = {stage: r for r in range(pp) for stage in stages_of[r]}
    last_stage = pp * chunks - 1
    done: dict[tuple[str, int, int], float] = {}
    ops: list[Op] = []

    def ready_at(key: tuple[str, int, int], rank: int) -> Optional[float]:
        times = []
        for dep in _dependencies(*key, last_stage):
            if dep not in done:
                return None
            times.append(done[dep] + (p2p if owner[dep[1]] != rank else 0.0))
        return max(times, default=0.0)

    def run(rank: int, key: tuple[str, int, int], start: float) -> float:
        end = start + durations[key[0]]
        done[key] = end
        ops.append(Op(rank, key[0], key[1], key[2], start, end))
        return end

    if not split_w:
        orders = [[(kind, stages_of[r][chunk], mb) for kind, chunk, mb in _order(schedule, pp, chunks, m, r)]
                  for r in range(pp)]
        free, pointer = [0.0] * pp, [0] * pp
        while any(pointer[r] < len(orders[r]) for r in range(pp)):
            progressed = False
            for r in range(pp):
                while pointer[r] < len(orders[r]):
                    at = ready_at(orders[r][pointer[r]], r)
                    if at is None:
                        break
                    free[r] = run(r, orders[r][pointer[r]], max(free[r], at))
                    pointer[r] += 1
                    progressed = True
            if not progressed:
                raise RuntimeError(f"{schedule} order deadlocked (pp={pp}, vpp={vpp}, m={m})")
        return ops
    _simulate_greedy(schedule, pp, chunks, m, stages_of, ready_at, run)
    return ops


def _simulate_greedy(schedule, pp, chunks, m, stages_of, ready_at, run) -> None:  # noqa: ANN001 - local helper
    """Event by event: of every op whose inputs exist, run the one that can start first (ties: input gradient,
    then forward, then weight gradient; older micro-batches first).

    Each rank keeps the ops whose inputs exist (with the time they arrive) and its best candidate; only the rank
    that ran and the ranks an op's result unblocks are re-examined, so a step costs O(pp), not O(ops)."""
    owner = {stage: r for r in range(pp) for stage in stages_of[r]}
    last_stage = pp * chunks - 1
    # Micro-batches a rank may have started (first chunk's forward) and not finished (first chunk's weight
    # gradient): 1F1B's p - r with one chunk, Megatron's interleaved warm-up with more (p + 1 for DualPipeV).
    limit = [pp - r if chunks == 1 else -(-((pp - r - 1) * 2 + (chunks - 1) * pp + 1) // chunks) for r in range(pp)]
    live = [0] * pp
    free = [0.0] * pp
    priority = {"B": 0, "F": 1, "W": 2}
    ready: list[dict[tuple[str, int, int], float]] = [{} for _ in range(pp)]
    best: list[Optional[tuple]] = [None] * pp
    stale = set(range(pp))
    remaining = pp * chunks * m * 3

    def offer(key: tuple[str, int, int]) -> None:
        rank = owner[key[1]]
        at = ready_at(key, rank)
        if at is not None:
            ready[rank][key] = at
            stale.add(rank)

    for mb in range(m):
        offer(("F", 0, mb))
    while remaining:
        for r in stale:
            first = stages_of[r][0]
            candidates = [((max(at, free[r]), priority[key[0]], key[2], r, key[1]), key)
                          for key, at in ready[r].items()
                          if not (key[0] == "F" and key[1] == first and live[r] >= limit[r])]
            best[r] = min(candidates) if candidates else None
        stale.clear()
        chosen = min((b for b in best if b is not None), default=None)
        if chosen is None:
            raise RuntimeError(f"{schedule} deadlocked (pp={pp}, m={m})")
        (start, _, _, r, _), key = chosen
        kind, stage, mb = key
        if stage == stages_of[r][0] and kind != "B":
            live[r] += 1 if kind == "F" else -1
        free[r] = run(r, key, start)
        del ready[r][key]
        stale.add(r)
        remaining -= 1
        if kind == "F":
            if stage < last_stage:
                offer(("F", stage + 1, mb))
            offer(("B", stage, mb))
        elif kind == "B":
            offer(("W", stage, mb))
            if stage > 0:
                offer(("B", stage - 1, mb))
