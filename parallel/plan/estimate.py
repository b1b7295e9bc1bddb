"""Put memory and time together for one layout: which layers each pipeline rank holds, its peak memory, and the
step time of the slowest rank through the pipeline schedule, with MFU and HFU.

An `Estimator` is built once per (model, workload, cluster, software) and caches everything that depends on only
part of a layout, so the search can score hundreds of thousands of layouts in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from configs.schema import ModelConfig
from models.counts import flops_per_token, layer_params, mlp_params
from parallel.plan import memory as mem
from parallel.plan import pipeline
from parallel.rules import even_split, rank_stages
from parallel.plan import time as cost
from parallel.layout import Layout
from parallel.plan.memory import MemoryBreakdown, TokenShape
from parallel.plan.params import EMBEDDING, HEAD, StageTensors, layer_tensors, model_tensors_edges, split_tensors
from parallel.plan.software import SUPERTRAIN, Software, state_bytes
from parallel.plan.topology import Cluster

# Bytes AdamW streams per parameter it updates: read parameter, gradient and both moments, write parameter and
# moments (7 x 4 bytes), plus reading the gradient once more for the clipping norm.
OPTIMIZER_BYTES_PER_PARAM = 32


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq_len: int
    global_batch: int
    # bf16: mixed precision (bf16 compute and activations); fp32: everything in fp32 (CPU runs).
    precision: str = "bf16"

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds of one optimizer step on the slowest pipeline rank. compute includes recompute; the
    communication terms are what is left exposed after overlap."""

    compute: float = 0.0
    recompute: float = 0.0
    bubble: float = 0.0
    tp: float = 0.0
    cp: float = 0.0
    ep: float = 0.0
    pp: float = 0.0
    dp: float = 0.0
    optimizer: float = 0.0


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: MemoryBreakdown
    fits: bool
    step_time: float
    time: TimeBreakdown
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float
    hfu: float
    # Layers of each pipeline stage (pp * chunks entries, stage order).
    stage_layers: tuple[int, ...] = ()
    per_rank_memory: tuple[MemoryBreakdown, ...] = field(default=(), compare=False)
    # Per-micro-batch forward / backward of the slowest pipeline rank (for the schedule picture).
    forward: float = 0.0
    backward: float = 0.0
    p2p: float = 0.0


@dataclass(frozen=True)
class RankPlan:
    """What one pipeline rank holds: how many dense and MoE layers, the embedding, the output head."""

    dense_layers: int
    moe_layers: int
    embedding: bool
    head: bool

    @property
    def n_layers(self) -> int:
        return self.dense_layers + self.moe_layers

    def kinds(self, cfg: ModelConfig) -> list[tuple[int, int]]:
        """(representative layer index, count) per kind of layer this rank holds."""
        kinds = []
        if self.dense_layers:
            kinds.append((0 if not cfg.is_moe_layer(0) else cfg.n_layers - 1, self.dense_layers))
        if self.moe_layers:
            kinds.append((cfg.n_dense_layers, self.moe_layers))
        return kinds


class Estimator:
    def __init__(
        self, workload: Workload, cluster: Cluster, software: Software = SUPERTRAIN, even_split: bool = False,
        split: tuple[int, ...] = (),
    ) -> None:
        self.workload = workload
        self.model = workload.model
        self.cluster = cluster
        self.software = software
        # Published runs split layers evenly (Megatron requires it); our own plans balance the head's cost.
        self.even_split = even_split
        # A fixed layer split (parallel.pp_layers) for its number of stages.
        self._splits: dict[int, tuple[int, ...]] = {len(split): tuple(split)} if split else {}
        self._layer_costs: dict[tuple, cost.LayerCost] = {}
        self._activations: dict[tuple, mem.RankActivations] = {}
        self._links: dict[tuple, cost.Links] = {}
        self._tensors: dict[tuple, StageTensors] = {}
        self._plans: dict[tuple, list[RankPlan]] = {}
        self._states: dict[tuple, tuple[MemoryBreakdown, float]] = {}
        edges = model_tensors_edges(self.model)
        self._edges = {part: [t for t in edges if t.part == part] for part in (EMBEDDING, HEAD)}
        self.model_flops_per_token = flops_per_token(self.model, workload.seq_len)

    # ---- pipeline split -----------------------------------------------------------------------------------

    def stage_split(self, stages: int) -> tuple[int, ...]:
        if stages not in self._splits:
            cfg = self.model
            if self.even_split or stages == 1:
                counts = even_split(cfg.n_layers, stages)
            else:
                # Balance forward FLOPs per token; the last stage also pays the output projection.
                weights = [2 * layer_params(cfg, i, active_only=True) for i in range(cfg.n_layers)]
                counts = pipeline.balanced_split(weights, 0.0, 2 * cfg.d_model * cfg.vocab_size, stages)
            self._splits[stages] = tuple(counts)
        return self._splits[stages]

    def rank_plans(self, layout: Layout) -> list[RankPlan]:
        key = (layout.pp, layout.vpp, layout.schedule)
        if key not in self._plans:
            self._plans[key] = self._rank_plans(layout)
        return self._plans[key]

    def _rank_plans(self, layout: Layout) -> list[RankPlan]:
        chunks = layout.vpp
        counts = self.stage_split(layout.pp * chunks)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        last = len(counts) - 1
        plans = []
        for rank in range(layout.pp):
            stages = rank_stages(layout.schedule, layout.pp, chunks, rank) if layout.pp > 1 else [0]
            layers = [i for s in stages for i in range(starts[s], starts[s] + counts[s])]
            moe = sum(1 for i in layers if self.model.is_moe_layer(i))
            plans.append(RankPlan(len(layers) - moe, moe, 0 in stages, last in stages))
        return plans

    # ---- memory -------------------------------------------------------------------------------------------

    def token_shape(self, layout: Layout) -> TokenShape:
        return TokenShape(self.workload.seq_len, layout.micro_batch, layout.tp, layout.cp,
                          layout.sequence_parallel and layout.tp > 1, self.workload.act_bytes, layout.cp_impl)

    def rank_tensors(self, plan: RankPlan, layout: Layout) -> StageTensors:
        key = (plan, layout.tp, layout.ep)
        if key not in self._tensors:
            tensors = StageTensors()
            for layer, count in plan.kinds(self.model):
                tensors = tensors + self._layer_tensors(layer, layout.tp, layout.ep).times(count)
            if plan.embedding:
                tensors = tensors + split_tensors(self._edges[EMBEDDING], layout.tp, layout.ep)
            if plan.head:
                tensors = tensors + split_tensors(self._edges[HEAD], layout.tp, layout.ep)
            self._tensors[key] = tensors
        return self._tensors[key]

    def _layer_tensors(self, layer: int, tp: int, ep: int) -> StageTensors:
        key = (self.model.is_moe_layer(layer), tp, ep)
        if key not in self._tensors:
            self._tensors[key] = split_tensors(layer_tensors(self.model, layer), tp, ep,
                                               self.software.tp_splits_experts)
        return self._tensors[key]

    def rank_states(self, layout: Layout, plan: RankPlan, dp_index: int = 0) -> tuple[MemoryBreakdown, float]:
        """(training state, working state bytes) of one pipeline rank; independent of micro-batch and schedule."""
        key = (plan, layout.tp, layout.ep, layout.cp, layout.dp_shard, layout.dp_replicate, layout.dp_engine,
               layout.zero_stage, dp_index)
        if key not in self._states:
            tensors = self.rank_tensors(plan, layout)
            precision = self.workload.precision
            root = self.rank_tensors(RankPlan(0, 0, plan.embedding, plan.head), layout).numel
            states = mem.state_memory(tensors, layout, precision, self.software, dp_index)
            policy = state_bytes(layout, self.software, precision)
            fsdp_applied = policy.grad_sharded and layout.dp * layout.cp > 1
            if plan.embedding and layout.tp > 1 and not fsdp_applied and not self.software.megatron_states:
                # DTensor's backward of the vocab-parallel embedding yields the whole (vocab, d) gradient on every
                # tp rank (measured, torch 2.13), not the rank's rows.
                whole = self.model.vocab_size * self.model.d_model
                states = replace(states, gradients=states.gradients + whole * (1 - 1 / layout.tp) * policy.grad)
            self._states[key] = (states, mem.working_state_bytes(tensors, plan.n_layers, layout, precision,
                                                                 self.software, root))
        return self._states[key]

    def rank_activations(self, layout: Layout, plan: RankPlan) -> mem.RankActivations:
        """Activation bytes one micro-batch leaves on a pipeline rank (and its largest layer's full set)."""
        shape = self.token_shape(layout)
        key = (plan, shape, layout.recompute)
        if key not in self._activations:
            self._activations[key] = mem.rank_activations(
                self.model, plan.kinds(self.model), plan.embedding, plan.head, shape, layout.recompute, self.software)
        return self._activations[key]

    def rank_memory(self, layout: Layout, rank: int, plan: RankPlan, dp_index: int = 0) -> MemoryBreakdown:
        states, working = self.rank_states(layout, plan, dp_index)
        shape = self.token_shape(layout)
        act = self.rank_activations(layout, plan)
        chunks = layout.vpp
        m = layout.micro_batches(self.workload.global_batch)
        alive = pipeline.in_flight(layout.schedule, layout.pp, chunks, m, rank)
        transient = working + act.largest_layer
        if plan.head:
            transient += mem.logits_transient_bytes(self.model, shape)
        return MemoryBreakdown(states.parameters, states.gradients, states.optimizer,
                               alive * act.per_micro_batch, transient,
                               mem.communicator_buffer_bytes(layout, self.cluster.comm_buffer_bytes))

    def memory(self, layout: Layout) -> tuple[MemoryBreakdown, tuple[MemoryBreakdown, ...]]:
        per_rank = tuple(self.rank_memory(layout, r, plan) for r, plan in enumerate(self.rank_plans(layout)))
        return max(per_rank, key=lambda m: m.total), per_rank

    def state_floor(self, layout: Layout) -> float:
        """Largest training-state bytes over pipeline ranks: a lower bound of memory, whatever the micro-batch."""
        return max(self.rank_states(layout, plan)[0].states for plan in self.rank_plans(layout))

    # ---- time ---------------------------------------------------------------------------------------------

    def links(self, layout: Layout) -> cost.Links:
        key = (layout.tp, layout.cp, layout.ep, layout.dp_shard, layout.dp_replicate, layout.pp)
        if key not in self._links:
            c = self.cluster
            shards = layout.dp_shard * layout.cp
            self._links[key] = cost.Links(
                tp=c.tier_for_group(*layout.group("tp")),
                cp=c.tier_for_group(*layout.group("cp")),
                ep=c.tier_for_group(*layout.group("ep")),
                pp=c.tier_for_group(*layout.group("pp")),
                dp=c.tier_for_group(layout.dp * layout.cp, layout.tp),
                fsdp=c.tier_for_group(shards, layout.tp),
                expert_fsdp=c.tier_for_group(*layout.group("efsdp")),
            )
        return self._links[key]

    def layer(self, layout: Layout, layer: int, links: cost.Links) -> cost.LayerCost:
        shape = self.token_shape(layout)
        moe = self.model.is_moe_layer(layer)
        key = (moe, shape, layout.recompute, layout.ep if moe else 1, layout.cp, links,
               layout.schedule == "dualpipev")
        if key not in self._layer_costs:
            self._layer_costs[key] = cost.layer_cost(
                self.model, layer, shape, layout.recompute, layout.ep, layout.cp, links, self.cluster.device,
                self.software, overlap_ep=layout.schedule == "dualpipev")
        return self._layer_costs[key]

    def _param_gather(self, layout: Layout, layer: int, links: cost.Links, policy) -> tuple[float, float]:  # noqa: ANN001
        """(forward, backward) seconds of FSDP / ZeRO-3 traffic for one layer and one micro-batch."""
        cfg, t = self.model, layout.tp
        shards = layout.state_shards
        if not policy.param_sharded or shards <= 1 and layout.dp_replicate <= 1:
            return 0.0, 0.0
        dense = layer_params(cfg, layer)
        expert = 0.0
        if cfg.is_moe_layer(layer):
            expert = cfg.n_routed_experts * mlp_params(cfg, cfg.moe_ffn_hidden)
            dense -= expert
            expert /= layout.ep
        expert_t = t if self.software.tp_splits_experts else 1
        forward = cost.all_gather(dense / t * policy.compute, shards, links.fsdp)
        forward += cost.all_gather(expert / expert_t * policy.compute, layout.expert_shards, links.expert_fsdp)
        reduce = cost.all_gather(dense / t * policy.grad, shards, links.fsdp)
        reduce += cost.all_gather(expert / expert_t * policy.grad, layout.expert_shards, links.expert_fsdp)
        return forward, forward + reduce

    def rank_time(self, layout: Layout, plan: RankPlan) -> tuple[float, float, dict[str, float], float, float]:
        """(forward, backward, exposed communication by kind, forward FLOPs, recompute FLOPs) for one micro-batch
        on one pipeline rank."""
        links = self.links(layout)
        shape = self.token_shape(layout)
        policy = state_bytes(layout, self.software, self.workload.precision)
        forward = backward = flops = recompute_flops = 0.0
        comm = {"tp": 0.0, "ep": 0.0, "cp": 0.0, "dp": 0.0, "pp": 0.0, "recompute": 0.0}
        for layer, n in plan.kinds(self.model):
            c = self.layer(layout, layer, links)
            forward += n * (c.forward + c.comm_forward)
            backward += n * (c.backward + c.recompute + c.comm_backward)
            comm["tp"] += n * c.tp_comm
            comm["ep"] += n * c.ep_comm
            comm["cp"] += n * c.cp_comm
            comm["recompute"] += n * c.recompute
            flops += n * c.forward_flops
            recompute_flops += n * c.recompute_flops
            gather_forward, gather_backward = self._param_gather(layout, layer, links, policy)
            if self.software.overlap_param_gather:
                gather_forward = max(0.0, gather_forward - c.forward)
                gather_backward = max(0.0, gather_backward - c.backward - c.recompute)
            forward += n * gather_forward
            backward += n * gather_backward
            comm["dp"] += n * (gather_forward + gather_backward)
        if plan.embedding:
            e = cost.embedding_cost(self.model, shape, self.cluster.device)
            forward, backward = forward + e.forward, backward + e.backward
        if plan.head:
            h = cost.head_cost(self.model, shape, self.cluster.device)
            forward, backward = forward + h.forward, backward + h.backward
            flops += h.forward_flops
        if layout.pp > 1:
            chunks = layout.vpp
            boundary = shape.tokens * self.model.d_model * shape.act_bytes
            if shape.sequence_parallel:
                p2p = cost.point_to_point(boundary / layout.tp, links.pp)
            elif self.software.scatter_gather_p2p and layout.tp > 1:
                # Each tp rank sends its slice; the receiver re-assembles the whole tensor on the fast link.
                p2p = cost.point_to_point(boundary / layout.tp, links.pp) + cost.all_gather(boundary, layout.tp, links.tp)
            else:
                p2p = cost.point_to_point(boundary, links.pp)
            forward += chunks * p2p
            backward += chunks * p2p
            comm["pp"] = 2 * chunks * p2p
        return forward, backward, comm, flops, recompute_flops

    def _grad_sync(self, layout: Layout, tensors: StageTensors, last_backward: float) -> float:
        """Exposed seconds of end-of-step data-parallel traffic (gradient reduction, parameter re-gather)."""
        links = self.links(layout)
        policy = state_bytes(layout, self.software, self.workload.precision)
        numel = tensors.numel
        group = layout.dp * layout.cp
        reduce_bytes = self.software.grad_reduce_bytes
        if self.software.distributed_optimizer:
            sync = cost.all_gather(numel * reduce_bytes, group, links.dp)
            sync += cost.all_gather(numel * policy.param, group, links.dp)
            return sync if not self.software.overlap_grad_reduce else max(0.0, sync - last_backward)
        if policy.param_sharded:
            if layout.dp_replicate <= 1:
                return 0.0
            replicate = cost.all_reduce(numel / layout.state_shards * 4, layout.dp_replicate,
                                        self.cluster.tier_for_group(*layout.group("dp_replicate")))
            return max(0.0, replicate - last_backward)
        if layout.dp_engine == "deepspeed":
            reduce = cost.all_gather(numel * policy.grad, group, links.dp)
            gather = cost.all_gather(numel * policy.param, group, links.dp)
            if layout.zero_stage >= 2 and self.software.overlap_grad_reduce:
                reduce = max(0.0, reduce - last_backward)
            return reduce + gather
        sync = cost.all_reduce(numel * reduce_bytes, group, links.dp)
        return max(0.0, sync - last_backward) if self.software.overlap_grad_reduce else sync

    def evaluate(self, layout: Layout, memory: Optional[tuple[MemoryBreakdown, tuple]] = None) -> Estimate:
        wl = self.workload
        plans = self.rank_plans(layout)
        worst_memory, per_rank = memory or self.memory(layout)
        m = layout.micro_batches(wl.global_batch)
        chunks = layout.vpp
        slowest = None
        for plan in plans:
            forward, backward, comm, flops, recompute_flops = self.rank_time(layout, plan)
            tensors = self.rank_tensors(plan, layout)
            sync = self._grad_sync(layout, tensors, backward)
            policy = state_bytes(layout, self.software, wl.precision)
            held = tensors.numel / (layout.dp * layout.cp) if policy.optimizer_sharded else tensors.numel
            optimizer = cost.optimizer_time(held, OPTIMIZER_BYTES_PER_PARAM, self.cluster.device)
            bubble = pipeline.bubble_time(layout.schedule, layout.pp, chunks, forward, backward)
            step = m * (forward + backward) + bubble + sync + optimizer
            if slowest is None or step > slowest[0]:
                slowest = (step, forward, backward, comm, bubble, sync, optimizer, flops, recompute_flops)
        step, forward, backward, comm, bubble, sync, optimizer, flops, recompute_flops = slowest
        exposed = {k: m * v for k, v in comm.items()}
        compute = m * (forward + backward) - sum(exposed[k] for k in ("tp", "ep", "cp", "dp", "pp"))
        breakdown = TimeBreakdown(
            compute=compute, recompute=exposed["recompute"], bubble=bubble, tp=exposed["tp"], cp=exposed["cp"],
            ep=exposed["ep"], pp=exposed["pp"], dp=exposed["dp"] + sync, optimizer=optimizer,
        )
        tokens = wl.global_batch * wl.seq_len
        devices = layout.world_size
        tokens_per_s = tokens / step / devices
        achieved = self.model_flops_per_token * tokens_per_s
        peak = self.cluster.device.peak_flops
        hardware_ratio = 1.0 + (recompute_flops / (3 * flops) if flops else 0.0)
        counts = self.stage_split(layout.pp * chunks)
        p2p = exposed["pp"] / max(1, 2 * chunks * m)
        return Estimate(
            layout=layout, memory=worst_memory, fits=mem.fits(worst_memory, self.cluster.device.memory_bytes),
            step_time=step, time=breakdown, tokens_per_s_per_device=tokens_per_s,
            tflops_per_device=achieved / 1e12, mfu=achieved / peak, hfu=achieved * hardware_ratio / peak,
            stage_layers=counts, per_rank_memory=per_rank, forward=forward, backward=backward, p2p=p2p,
        )
