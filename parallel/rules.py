"""What a parallel layout must satisfy to run, written once for the trainer (parallel/dims.py checks a config with
`layout_problem`, parallel/pipeline.py cuts stages with `stage_layers`) and the planner (parallel/plan/search.py
enumerates only layouts these functions accept, and scores the stages `even_split` and `rank_stages` give).
A test walks every layout of small worlds and checks that the two sides agree.

Each check returns None or a `Problem`: what is wrong and how to fix it, which the trainer turns into one error line
and the planner into a skipped candidate. Pure arithmetic on configs: no torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

from configs.schema import PP_SCHEDULES, AttentionKind, ContextParallelImpl, DPEngine, ModelConfig
from parallel.layout import Layout

# How a schedule places its stages on pipeline ranks: `loop` (rank r holds r, r + pp, ...; gpipe, 1f1b,
# interleaved_1f1b) or `v` (rank r holds r and 2 pp - 1 - r; ZB-V and DualPipeV).
PLACEMENT = {"gpipe": "loop", "1f1b": "loop", "interleaved_1f1b": "loop", "zero_bubble": "v", "dualpipev": "v"}
# Schedules that run one stage per rank.
SINGLE_STAGE = ("gpipe", "1f1b")
assert tuple(PLACEMENT) == PP_SCHEDULES


class Problem(NamedTuple):
    """Why a layout cannot run (`what`) and what to change (`fix`)."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}: {self.fix}"


# ---- pipeline stages ----------------------------------------------------------------------------------------


def rank_stages(schedule: str, pp: int, vpp: int, rank: int) -> list[int]:
    """Stage indices (0 holds the embedding) that pipeline rank `rank` runs, in its local chunk order."""
    if PLACEMENT[schedule] == "v":
        return [rank, 2 * pp - 1 - rank]
    return [rank + chunk * pp for chunk in range(vpp)]


def even_split(n_layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as possible, the spare layers on the stages nearest the middle (the first stage
    also holds the embedding, the last the output head and the loss)."""
    base, spare = divmod(n_layers, stages)
    centre = (stages - 1) / 2
    order = sorted(range(stages), key=lambda s: (s in (0, stages - 1), abs(s - centre), s))
    extra = set(order[:spare])
    return [base + (s in extra) for s in range(stages)]


def layer_split_problem(counts: Sequence[int], n_layers: int, stages: int) -> Optional[Problem]:
    """An explicit split (parallel.pp_layers): one count per stage, adding up to the model; only the ends, which
    also hold the embedding or the head, may hold no layers."""
    if len(counts) != stages or sum(counts) != n_layers or min(counts) < 0:
        return Problem(f"parallel.pp_layers={list(counts)} must list {stages} non-negative layer counts (pp*vpp) "
                       f"adding up to n_layers={n_layers}",
                       "fix the counts, or leave pp_layers empty for an even split")
    if any(c == 0 for c in counts[1:-1]):
        return Problem(f"parallel.pp_layers={list(counts)}: only the first and last stage may hold no layers",
                       "give every middle stage at least one layer")
    return None


def stage_layers(n_layers: int, stages: int, counts: Sequence[int] = ()) -> list[int]:
    """Layers per stage: `counts` when given (checked by `layer_split_problem`), else `even_split`."""
    return list(counts) if counts else even_split(n_layers, stages)


def schedule_problem(schedule: str, pp: int, vpp: int, micro_batches: int) -> Optional[Problem]:
    """What a pipeline schedule needs of vpp and of the micro-batches each pipeline runs per step.

    torch.distributed.pipelining enforces 1f1b's pp micro-batches and dualpipev's 2 pp; interleaved_1f1b here needs
    a multiple of pp (Megatron's rule, which torch accepts too and the planner's timeline models) and zero_bubble 2 pp
    (ZB-V fills its V with two micro-batches per rank, Qi et al. 2024). Without a pipeline the schedule is unused.
    """
    if pp == 1:
        return None
    where = f"parallel.pp_schedule={schedule} with pp={pp} vpp={vpp} and {micro_batches} micro-batches per step"
    more = "raise train.global_batch or lower train.micro_batch"
    if schedule in SINGLE_STAGE and vpp != 1:
        return Problem(f"{where}: {schedule} runs one stage per rank", "set vpp=1 or use interleaved_1f1b")
    if schedule == "interleaved_1f1b" and vpp < 2:
        return Problem(f"{where}: interleaved_1f1b needs vpp >= 2", "vpp=1 is plain 1f1b")
    if PLACEMENT[schedule] == "v" and vpp != 2:
        return Problem(f"{where}: {schedule} is a V schedule with exactly two stages per rank", "set vpp=2")
    if schedule == "1f1b" and micro_batches < pp:
        return Problem(f"{where}: 1f1b needs at least pp micro-batches", more)
    if schedule == "interleaved_1f1b" and micro_batches % pp:
        return Problem(f"{where}: interleaved_1f1b needs a micro-batch count that is a multiple of pp",
                       "change train.global_batch or train.micro_batch")
    if PLACEMENT[schedule] == "v" and micro_batches < 2 * pp:
        return Problem(f"{where}: {schedule} needs at least 2*pp micro-batches", more)
    return None


# ---- degrees against the model ------------------------------------------------------------------------------


def tensor_parallel_problem(model: ModelConfig, tp: int) -> Optional[Problem]:
    """tp splits heads, hidden units and the vocabulary evenly; grouped kv heads are split, or replicated when tp
    is a multiple of their number (parallel/tensor.py)."""
    if tp == 1:
        return None
    sizes = ["n_heads", "ffn_hidden", "vocab_size"] + (["moe_ffn_hidden"] if model.is_moe else [])
    for key in sizes:
        if getattr(model, key) % tp:
            return Problem(f"tp={tp} does not divide {key}={getattr(model, key)}", f"pick tp dividing {key}")
    kv = model.n_kv_heads
    if model.attention == AttentionKind.gqa and kv % tp and tp % kv:
        if kv < tp:
            return Problem(f"tp={tp} with n_kv_heads={kv}: kv heads can be split or replicated only when one of tp "
                           f"and n_kv_heads divides the other", "pick tp dividing n_kv_heads or a multiple of it")
        return Problem(f"tp={tp} does not divide n_kv_heads={kv}", "pick tp dividing n_kv_heads")
    return None


CP_IMPLS = tuple(impl.value for impl in ContextParallelImpl)


def kv_head_repeat(kv_heads: int, cp: int) -> int:
    """How many times Ulysses repeats each kv head so that cp ranks get whole, matching kv heads for their query
    heads (1 when cp divides the kv heads)."""
    return cp // math.gcd(kv_heads, cp)


def context_parallel_problem(model: ModelConfig, cp: int, impl: str = "ring", tp: int = 1,
                             seq_len: Optional[int] = None) -> Optional[Problem]:
    """Each sequence is cut into 2 cp equal chunks (parallel/context.py); Ulysses also splits each tensor-parallel
    rank's heads cp ways, repeating grouped kv heads until they split; the sequence-wise MoE balance loss needs
    whole sequences."""
    if cp == 1:
        return None
    if impl not in CP_IMPLS:
        return Problem(f"parallel.cp_impl={impl!r} is not one of {', '.join(CP_IMPLS)}", "pick one of them")
    if seq_len is not None and seq_len % (2 * cp):
        return Problem(f"train.seq_len={seq_len} is not a multiple of 2*cp={2 * cp}",
                       "context parallelism cuts each sequence into 2*cp equal chunks: pick seq_len or cp to fit")
    if model.is_moe and model.moe.aux_loss_coef > 0:
        return Problem(f"cp={cp} with model.moe.aux_loss_coef={model.moe.aux_loss_coef}: the sequence-wise balance "
                       f"loss needs whole sequences on one rank",
                       "set model.moe.aux_loss_coef=0 (the bias balancing needs no loss) or cp=1")
    if impl == "ulysses":
        heads = model.n_heads // tp
        if heads % cp:
            return Problem(f"cp_impl=ulysses with cp={cp}: the {heads} attention heads per tensor-parallel rank do "
                           f"not split {cp} ways", "pick cp dividing n_heads/tp, or cp_impl=ring or allgather")
        if model.attention == AttentionKind.gqa:
            kv = max(model.n_kv_heads // tp, 1)
            repeat = kv_head_repeat(kv, cp)
            if (heads // kv) % repeat:
                return Problem(f"cp_impl=ulysses with cp={cp}: {kv} kv heads per tensor-parallel rank cannot be "
                               f"repeated to split {cp} ways under their {heads // kv} query heads each",
                               "pick cp dividing n_kv_heads/tp, or cp_impl=ring or allgather")
    return None


def pipeline_problem(model: ModelConfig, pp: int, vpp: int) -> Optional[Problem]:
    if vpp > 1 and pp == 1:
        return Problem(f"vpp={vpp} needs pipeline parallelism", "set pp > 1 or vpp=1")
    if pp * vpp > model.n_layers:
        return Problem(f"pp*vpp={pp * vpp} stages exceed n_layers={model.n_layers}", "lower pp or vpp")
    if pp > 1 and model.tie_embeddings:
        return Problem("tied embeddings cannot be split across pipeline stages", "set model.tie_embeddings=false")
    return None


def expert_parallel_problem(model: ModelConfig, ep: int, dp_shard: int) -> Optional[Problem]:
    """Experts are sharded over ep ranks carved out of the data-parallel shard ranks."""
    if ep == 1:
        return None
    if not model.is_moe:
        return Problem(f"ep={ep} needs an MoE model ({model.name} is dense)", "set ep=1")
    if model.n_routed_experts % ep:
        return Problem(f"ep={ep} does not divide n_routed_experts={model.n_routed_experts}",
                       "pick ep dividing the number of routed experts")
    if dp_shard % ep:
        return Problem(f"ep={ep} does not divide dp_shard={dp_shard}",
                       "experts are sharded over the data-parallel shard ranks: pick ep dividing dp_shard")
    return None


# ---- engines and batch --------------------------------------------------------------------------------------


def engine_problem(engine: str, zero_stage: int, tp: int, pp: int, cp: int, ep: int, dp_replicate: int,
                   dp: int) -> Optional[Problem]:
    """FSDP2 combines with everything; DDP cannot reduce sharded experts and does not run under a pipeline with data
    parallelism; DeepSpeed runs plain data parallelism at ZeRO stage 1-3."""
    if engine == DPEngine.deepspeed.value:
        others = {"tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp_replicate": dp_replicate}
        used = " ".join(f"{k}={v}" for k, v in others.items() if v > 1)
        if used:
            return Problem(f"dp_engine=deepspeed runs data parallelism only, but {used}",
                           "use dp_engine=fsdp to combine it with tensor, pipeline, context or expert parallelism")
        if zero_stage not in (1, 2, 3):
            return Problem(f"dp_engine=deepspeed needs parallel.zero_stage=1, 2 or 3 (got {zero_stage})",
                           "set parallel.zero_stage")
    if ep > 1 and engine != DPEngine.fsdp.value:
        return Problem(f"ep={ep} needs dp_engine=fsdp", "expert weights are sharded, which DDP cannot reduce")
    if pp > 1 and engine == DPEngine.ddp.value and dp > 1:
        return Problem(f"pp={pp} with dp_engine=ddp is not supported", "use dp_engine=fsdp with pipelines")
    return None


def batch_problem(global_batch: int, dp: int, micro_batch: int) -> Optional[Problem]:
    if global_batch % (dp * micro_batch):
        return Problem(f"train.global_batch={global_batch} is not a multiple of dp*micro_batch="
                       f"{dp}*{micro_batch}={dp * micro_batch}", "change train.global_batch or train.micro_batch")
    return None


def layout_problem(layout: Layout, model: ModelConfig, global_batch: int,
                   pp_layers: Sequence[int] = (), seq_len: Optional[int] = None) -> Optional[Problem]:
    """The first reason `layout` cannot train `model` with this global batch and sequence length (None: it can).
    The world size is the layout's own product; parallel/dims.py checks it against the processes first."""
    checks = (
        lambda: context_parallel_problem(model, layout.cp, layout.cp_impl, layout.tp, seq_len),
        lambda: pipeline_problem(model, layout.pp, layout.vpp),
        lambda: tensor_parallel_problem(model, layout.tp),
        lambda: expert_parallel_problem(model, layout.ep, layout.dp_shard),
        lambda: engine_problem(layout.dp_engine, layout.zero_stage, layout.tp, layout.pp, layout.cp, layout.ep,
                               layout.dp_replicate, layout.dp),
        lambda: batch_problem(global_batch, layout.dp, layout.micro_batch),
        lambda: schedule_problem(layout.schedule, layout.pp, layout.vpp, layout.micro_batches(global_batch)),
        lambda: layer_split_problem(pp_layers, model.n_layers, layout.stages) if pp_layers else None,
    )
    for check in checks:
        problem = check()
        if problem is not None:
            return problem
    return None
