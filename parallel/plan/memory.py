"""Memory one device needs: training state (parameters, gradients, optimizer) and activations, for a layout.

Training state is counted tensor by tensor from `params.model_tensors`, split by tensor / expert parallelism and
then by the data-parallel engine exactly as PyTorch allocates it (FSDP2 pads each parameter's shard to the
ceil-sized chunk; AdamW keeps two moments plus a 4-byte `step` per tensor), so for supertrain's own engines the
parameter, gradient and optimizer bytes are exact, not estimates (tests/dist checks them against real ranks).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
which counts the tensors autograd saves per layer (34·s·b·h + 5·a·s²·b bytes for GPT-3 in fp16), re-derived for
what supertrain's model saves: RMSNorm instead of LayerNorm, grouped-query attention whose K/V are expanded to all
heads before SDPA, SwiGLU or GELU, multi-head latent attention, routed and shared experts, no dropout, and a fused
attention kernel that keeps only q, k, v, the output and the log-sum-exp (no s² matrix). Tensor parallelism
divides what lives on split heads / hidden units; sequence parallelism also divides the norm inputs; context
parallelism divides every per-token tensor; recompute keeps only each layer's input (full) or the matmul and
attention outputs (selective). The pipeline schedule decides how many micro-batches are alive at once, and the
largest rank decides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from configs.schema import Activation, AttentionKind, ModelConfig
from models.kernels import AttentionMemory, kernels_for
from parallel.layout import Layout
from parallel.plan.params import StageTensors, chunk_rows
from parallel.plan.software import SUPERTRAIN, Software, state_bytes

GIB = 1024**3
# Share of device memory a run may plan to use: the caching allocator's fragmentation and library workspaces
# (cuBLAS/HCCL/NCCL buffers, the runtime context) typically take 5-10% of an accelerator.
USABLE_MEMORY_FRACTION = 0.9
# Bytes per element of small fp32 side tensors (RMSNorm's 1/rms, attention's log-sum-exp, router scores).
FP32 = 4
# DeepSpeed's default reduce and all-gather bucket sizes (elements): reduce_bucket_size, allgather_bucket_size.
DEEPSPEED_BUCKET = 5e8


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device at its peak."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    # Working memory that comes and goes: gathered FSDP parameters, communication buckets, the loss's logits,
    # a recomputed layer's activations during its backward.
    transient: float = 0.0
    # Collective-library buffers held for the whole run: HCCL's 2 x HCCL_BUFFSIZE per communicator
    # (`communicator_groups`); 0 on NCCL clusters.
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    def gib(self) -> dict[str, float]:
        values = {f.name: getattr(self, f.name) / GIB for f in fields(self)}
        values["total"] = self.total / GIB
        return values


# ---- training state ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateNumel:
    """Elements of training state one rank holds: each sharded state's shard (held and allocated), and the
    replicated total."""

    full: int
    held: int
    allocated: int
    tensors: int


def shard_numel(stage: StageTensors, layout: Layout, dense_shards: int, dense_index: int) -> StateNumel:
    """Elements of this rank's shard of every parameter of a pipeline rank: dense parameters over `dense_shards`
    ranks (dp_shard x cp), routed experts over the efsdp ranks that hold the same experts (dp_shard / ep); without
    expert parallelism the experts are dense parameters like the rest (parallel/apply.py)."""
    if layout.ep == 1:
        expert_shards, expert_index = dense_shards, dense_index
    else:
        expert_shards = max(1, layout.expert_shards) if dense_shards > 1 else 1
        expert_index = dense_index // (layout.ep * layout.cp) if dense_shards > 1 else 0
    held = allocated = 0
    for shapes, shards, index in ((stage.dense, dense_shards, dense_index),
                                  (stage.expert, expert_shards, expert_index)):
        for shape, count in shapes:
            rest = _prod(shape[1:])
            held += chunk_rows(shape[0], shards, index) * rest * count
            allocated += -(-shape[0] // shards) * rest * count
    return StateNumel(stage.numel, held, allocated, stage.count)


def flat_shard(numel: int, shards: int) -> int:
    """DeepSpeed ZeRO flattens a rank's parameters and splits them evenly (padding the last partition)."""
    return -(-numel // shards)


def state_memory(
    stage: StageTensors, layout: Layout, precision: str, software: Software = SUPERTRAIN, dp_index: int = 0
) -> MemoryBreakdown:
    """Parameter, gradient and optimizer bytes on data-parallel rank `dp_index` of a pipeline rank."""
    policy = state_bytes(layout, software, precision)
    full = stage.numel
    tensors = stage.count
    if layout.dp_engine == "fsdp" and not software.megatron_states:
        shards = layout.state_shards
        numel = shard_numel(stage, layout, shards, dp_index % shards)
        held, allocated = numel.held, numel.allocated
    else:
        # Replicated engines, DeepSpeed ZeRO and Megatron's distributed optimizer split over every data rank.
        shards = layout.dp * layout.cp
        allocated = held = flat_shard(full, shards)
    return MemoryBreakdown(
        parameters=(allocated if policy.param_sharded else full) * policy.param,
        gradients=(allocated if policy.grad_sharded else full) * policy.grad,
        optimizer=(held if policy.optimizer_sharded else full) * (policy.moments + policy.master)
        + FP32 * tensors,
    )


def working_state_bytes(
    stage: StageTensors, layers: int, layout: Layout, precision: str, software: Software = SUPERTRAIN,
    root_numel: int = 0,
) -> float:
    """Transient state memory: what FSDP / ZeRO-3 gathers for the block it computes (and the one it prefetches),
    gradient buckets of DDP and DeepSpeed."""
    policy = state_bytes(layout, software, precision)
    if policy.param_sharded:
        # parallel/data.py shards each block, and the embedding + final norm + head as one root unit. At the
        # loss: the root and the last block are gathered (the last block stays unsharded for backward) and the
        # next block's gather is in flight; one unit's unsharded gradients await their reduce-scatter.
        per_layer = (stage.numel - root_numel) / max(1, layers)
        return (root_numel + 2 * per_layer) * policy.compute + max(root_numel, per_layer) * policy.grad
    if software.megatron_states:
        return 0.0  # Megatron reduces straight out of its (already counted) fp32 gradient buffer
    if layout.dp_engine == "deepspeed":
        return min(stage.numel, DEEPSPEED_BUCKET) * 2 * policy.grad
    # DDP's gradients are views into its buckets (gradient_as_bucket_view=True in parallel/data.py).
    return 0.0


# Process groups the trainer builds (parallel/dims.py build_mesh): every mesh dimension and the flattened views,
# each a tuple of the mesh dimensions it spans; "world" is torch's default group.
COMMUNICATOR_GROUPS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",), "cp": ("cp",), "ep": ("ep",), "efsdp": ("efsdp",), "dp_replicate": ("dp_replicate",),
    "pp": ("pp",), "dp_shard": ("efsdp", "ep"), "dp": ("dp_replicate", "efsdp", "ep"),
    "dp_shard_cp": ("efsdp", "ep", "cp"), "dp_cp": ("dp_replicate", "efsdp", "ep", "cp"),
    "pp_dp": ("pp", "dp_replicate", "efsdp", "ep"), "pp_dp_cp": ("pp", "dp_replicate", "efsdp", "ep", "cp"),
    "world": ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp"),
}


def communicator_groups(layout: Layout) -> list[str]:
    """The process groups of more than one rank that a rank joins, one name per distinct set of ranks (a flattened
    view equal to a dimension, e.g. dp_shard = ep when efsdp is 1, is counted once: the first name in
    COMMUNICATOR_GROUPS order). Each holds a communicator, and on HCCL its buffers."""
    sizes = {"tp": layout.tp, "cp": layout.cp, "ep": layout.ep, "efsdp": layout.dp_shard // layout.ep,
             "dp_replicate": layout.dp_replicate, "pp": layout.pp}
    # A group's ranks are fixed by the mesh dimensions of more than one rank it spans: two groups spanning the same
    # such dimensions are the same set of ranks (no rank sets built: the world can be 768 ranks).
    seen, names = set(), []
    for name, dims in COMMUNICATOR_GROUPS.items():
        spanned = frozenset(dim for dim in dims if sizes[dim] > 1)
        if spanned and spanned not in seen:
            seen.add(spanned)
            names.append(name)
    return names


def communicator_buffer_bytes(layout: Layout, per_group_bytes: float) -> float:
    """Device bytes of collective-library buffers on one rank: `per_group_bytes` per communicator it joins."""
    return len(communicator_groups(layout)) * per_group_bytes if per_group_bytes else 0.0


# ---- activations ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenShape:
    """How the tokens of one micro-batch and one layer's tensors are divided on a rank."""

    seq_len: int
    micro_batch: int
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    act_bytes: int = 2
    # How context-parallel attention reaches the other ranks' keys and values (parallel/context.py).
    cp_impl: str = "ring"

    @property
    def tokens(self) -> float:
        """Tokens of one micro-batch this rank processes (its share of the sequence under context parallel)."""
        return self.seq_len * self.micro_batch / self.cp


def _native_cpu(shape: TokenShape, software: Software) -> bool:
    """Whether plain fp32 tensors go to the CPU backend's fused C++ kernels, which keep less."""
    return software.native_cpu_kernels and shape.act_bytes == 4


def _norm_elements(d: int, shape: TokenShape, software: Software) -> tuple[float, float]:
    """(act-dtype elements, fp32 elements) per token saved around one pre-norm and the linear that reads it:
    the norm input, x/rms (not kept by the fused CPU kernel), the normalised output that the next linear keeps,
    and 1/rms."""
    if shape.sequence_parallel and shape.tp > 1:
        if not software.sp_saves_gathered_input:
            # Megatron: the fused norm keeps its input and 1/rms, the linear the output's shard (re-gathered in the
            # backward): Korthikanti et al.'s 4 s b h / t bytes per norm.
            return 2 * d / shape.tp, 1 / shape.tp
        # Input and x/rms are sequence-sharded (DTensors: ATen's norm); the linear keeps the all-gathered output.
        return 2 * d / shape.tp + d, 1 / shape.tp
    return (2 if _native_cpu(shape, software) else 3) * d, 1


def _backend_attention(shape: TokenShape, software: Software) -> Optional[AttentionMemory]:
    """What the kernel backend's own attention keeps at this shape, as the backend answers; None: SDPA runs."""
    if not software.kernels:
        return None
    dtype = torch.float32 if shape.act_bytes == 4 else torch.bfloat16
    return _backend(software.kernels).attention_memory(shape.seq_len, dtype)


# One backend object per kind for the whole search (the estimator asks per layout and stage).
_backend = functools.lru_cache(maxsize=None)(kernels_for)


def _attention_kernel(cfg: ModelConfig, shape: TokenShape, software: Software) -> tuple[bool, bool]:
    """(fused, blocked): whether attention runs a flash kernel, and whether it runs the backend's own kernel that
    keeps its probabilities (the CPU's block-causal one). Neither means SDPA's math path (seq x seq scores)."""
    blocked = _backend_attention(shape, software) is not None
    return software.fused_attention(cfg.qk_head_dim, cfg.value_head_dim) and not blocked, blocked


def _context_parallel_core(cfg: ModelConfig, shape: TokenShape) -> tuple[float, float]:
    """(act, fp32) elements per local token the attention core keeps under context parallelism (parallel/context.py):

    ring       its own autograd function: rotated q, this rank's k and v, the merged output and log-sum-exp (kept in
               fp32), and the output handed on (the output projection's input)
    allgather  SDPA with a mask over every rank's keys: q, the gathered k and v expanded to every query head (cp
               times the local length), the output, log-sum-exp, and the boolean mask (one byte per key)
    ulysses    attention over the whole sequence for heads / cp heads: per local token what plain attention keeps
               per token (the caller's formula at cp = 1)
    """
    t = shape.tp
    h = cfg.n_heads
    if cfg.attention == AttentionKind.mla:
        qk, v_dim, kv_heads = cfg.qk_head_dim, cfg.value_head_dim, h
    else:
        qk = v_dim = cfg.head_dim
        kv_heads = cfg.n_kv_heads
    if shape.cp_impl == "allgather":
        act = (h * qk + shape.cp * h * (qk + v_dim) + h * v_dim) / t + shape.seq_len / shape.act_bytes
        return act, h / t
    act = (h * qk + kv_heads * (qk + v_dim) + h * v_dim) / t
    return act, (h * v_dim + h) / t


def attention_elements(cfg: ModelConfig, shape: TokenShape, software: Software = SUPERTRAIN) -> tuple[float, float]:
    """(act-dtype, fp32) elements per token that one attention block saves, norm included."""
    if shape.cp > 1 and software.trainer_rules and shape.cp_impl != "ulysses":
        act, fp32 = _norm_elements(cfg.d_model, shape, software)
        if cfg.attention == AttentionKind.mla:
            act += (2 if _native_cpu(shape, software) else 3) * (cfg.q_lora_rank + cfg.kv_lora_rank)
            fp32 += (1 if cfg.q_lora_rank else 0) + 1
        core_act, core_fp32 = _context_parallel_core(cfg, shape)
        return act + core_act, fp32 + core_fp32
    if shape.cp > 1 and shape.cp_impl == "ulysses":
        shape = replace(shape, cp=1)
    t = shape.tp
    act, fp32 = _norm_elements(cfg.d_model, shape, software)
    h = cfg.n_heads
    fused, blocked = _attention_kernel(cfg, shape, software)
    if cfg.attention == AttentionKind.mla:
        # Low-rank paths are replicated over tp: down-projection output, its norm (input, and x/rms unless the
        # fused CPU kernel runs it) and the normalised input of the up-projection, for the query (if low-rank) and
        # for the compressed kv.
        act += (2 if _native_cpu(shape, software) else 3) * (cfg.q_lora_rank + cfg.kv_lora_rank)
        fp32 += (1 if cfg.q_lora_rank else 0) + 1
        if blocked:
            # Contiguous per-head copies of q (scaled), k and v, the output and the block-causal probabilities.
            kept = _backend_attention(shape, software)
            act += h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim + (kept.probabilities if kept else 0)) / t
        elif fused:
            # q and k (rotary part concatenated), v as a view of the whole kv up-projection, the output.
            act += h * (2 * cfg.qk_head_dim + cfg.qk_nope_head_dim + 2 * cfg.v_head_dim) / t
            fp32 += h / t  # log-sum-exp
        else:
            # Math attention: q, k, the seq-long softmax rows, a contiguous v and the output.
            act += h * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim + shape.seq_len) / t
        return act, fp32
    if blocked and _native_cpu(shape, software):
        # The C++ kernel's copies: q per query head, k and v per kv head (read in place, not expanded); the output,
        # which it keeps as returned, once with the output projection's input.
        act += 2 * (h + cfg.n_kv_heads) * cfg.head_dim / t
    else:
        # q, k and v expanded to every query head (GQA repeats kv before SDPA), and the attention output.
        act += 4 * h * cfg.head_dim / t
    if blocked:
        kept = _backend_attention(shape, software)
        act += h * (kept.probabilities if kept else 0) / t  # instead of a log-sum-exp
    else:
        fp32 += h / t  # log-sum-exp per head
    if not software.flash_attention:
        # Unfused kernels keep softmax output (2 bytes), dropout mask (1) and dropout output (2) per score:
        # Korthikanti's 5·a·s² bytes, divided by the act width so the unit stays "elements".
        act += 5 * h * shape.seq_len / t / shape.act_bytes
    if software.dropout:
        act += 1 * cfg.d_model / shape.act_bytes  # one-byte mask after the output projection
    return act, fp32


def mlp_elements(cfg: ModelConfig, hidden: int, shape: TokenShape, software: Software) -> float:
    """Elements per token a feed-forward block saves (its pre-norm excluded): SwiGLU keeps the gate/up product
    (2 x hidden), silu's output (not with the fused CPU kernel) and the product w2 reads; GELU keeps its input and
    output."""
    if cfg.activation != Activation.swiglu:
        return 2 * hidden / shape.tp
    return (3 if _native_cpu(shape, software) else 4) * hidden / shape.tp


def ffn_elements(cfg: ModelConfig, layer: int, shape: TokenShape, software: Software = SUPERTRAIN) -> tuple[float, float]:
    act, fp32 = _norm_elements(cfg.d_model, shape, software)
    if software.dropout:
        act += cfg.d_model / shape.act_bytes
    if not cfg.is_moe_layer(layer):
        return act + mlp_elements(cfg, cfg.ffn_hidden, shape, software), fp32
    # Each routed copy keeps its dispatched input and the expert output the combine weights; shared experts are
    # one wide MLP. supertrain's tensor parallelism does not split the MoE block (every tp rank runs it whole).
    whole = shape if software.tp_splits_experts else TokenShape(shape.seq_len, shape.micro_batch, 1, shape.cp,
                                                                False, shape.act_bytes)
    # Router: fp32 scores per expert, then per chosen expert its int64 index (twice: per token and flattened)
    # and gathered score, in fp32-sized units.
    fp32 += cfg.n_routed_experts + 5 * cfg.top_k + 1
    routed = cfg.top_k * (2 * cfg.d_model + mlp_elements(cfg, cfg.moe_ffn_hidden, whole, software))
    shared = (mlp_elements(cfg, cfg.n_shared_experts * cfg.moe_ffn_hidden, whole, software)
              if cfg.n_shared_experts else 0.0)
    return act + routed + shared, fp32


def layer_activation_bytes(
    cfg: ModelConfig, layer: int, shape: TokenShape, recompute: str, software: Software = SUPERTRAIN
) -> float:
    """Bytes one layer keeps for its backward pass, per micro-batch, on one rank."""
    tokens = shape.tokens
    # The block input: all that full recompute keeps (sequence-sharded under sequence parallelism).
    block_input = cfg.d_model / (shape.tp if shape.sequence_parallel else 1)
    if recompute == "full":
        return tokens * block_input * shape.act_bytes
    if recompute == "selective":
        act, fp32 = selective_elements(cfg, layer, shape, software)
        return tokens * ((block_input + act) * shape.act_bytes + fp32 * FP32)
    attn_act, attn_fp32 = attention_elements(cfg, shape, software)
    ffn_act, ffn_fp32 = ffn_elements(cfg, layer, shape, software)
    return tokens * ((attn_act + ffn_act) * shape.act_bytes + (attn_fp32 + ffn_fp32) * FP32)


def selective_elements(cfg: ModelConfig, layer: int, shape: TokenShape, software: Software = SUPERTRAIN
                       ) -> tuple[float, float]:
    """(act-dtype, fp32) elements per token that op-level selective recompute keeps (parallel/recompute.py):
    the output of every matmul and of attention (with its log-sum-exp); norms, rotary, GQA expansion and
    activation functions are recomputed. Where SDPA falls back to its math path (unequal head widths on CPU), that
    path's bmm ops are matmuls too and its seq x seq scores are kept; Megatron's selective recompute (the runs
    without flash attention) recomputes the whole attention core instead, and so does supertrain for the fused
    CPU attention call, whose matmuls run inside it."""
    t, d, h = shape.tp, cfg.d_model, cfg.n_heads
    fused, blocked = _attention_kernel(cfg, shape, software)
    sdpa_math = software.flash_attention and not fused and not blocked
    scores = h * shape.seq_len / t if sdpa_math else 0.0
    output_kept = 0.0 if blocked and _native_cpu(shape, software) else 1.0
    if cfg.attention == AttentionKind.mla:
        q = (cfg.q_lora_rank + h * cfg.qk_head_dim / t) if cfg.q_lora_rank else h * cfg.qk_head_dim / t
        kv = cfg.kv_lora_rank + cfg.qk_rope_head_dim + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) / t
        attention = q + kv + output_kept * h * cfg.v_head_dim / t + d + scores
    else:
        attention = (h + 2 * cfg.n_kv_heads) * cfg.head_dim / t + output_kept * h * cfg.head_dim / t + d + scores
    fp32 = h / t
    gates = 2 if cfg.activation == Activation.swiglu else 1
    if not cfg.is_moe_layer(layer):
        return attention + gates * cfg.ffn_hidden / t + d, fp32
    split = t if software.tp_splits_experts else 1
    experts = (cfg.top_k + cfg.n_shared_experts) * (gates * cfg.moe_ffn_hidden / split + d)
    return attention + experts, fp32 + cfg.n_routed_experts


def embedding_activation_bytes(shape: TokenShape) -> float:
    """Token ids (int64) the embedding keeps for its backward."""
    return shape.tokens * 8


def rope_table_bytes(cfg: ModelConfig, shape: TokenShape) -> float:
    """fp32 cos and sin tables every stage builds once per micro-batch (seq x rope_dim/2 each)."""
    return FP32 * shape.seq_len / shape.cp * cfg.rope_dim


def head_activation_bytes(cfg: ModelConfig, shape: TokenShape, software: Software = SUPERTRAIN) -> float:
    """Final norm, the output projection's input and the fp32 log-softmax of the (vocab-parallel) logits."""
    act, fp32 = _norm_elements(cfg.d_model, shape, software)
    return shape.tokens * (act * shape.act_bytes + fp32 * FP32 + cfg.vocab_size / shape.tp * FP32)


def logits_transient_bytes(cfg: ModelConfig, shape: TokenShape) -> float:
    """During the loss: low-precision logits, their fp32 copy and its gradient (the log-softmax output is
    already counted as an activation)."""
    return shape.tokens * cfg.vocab_size / shape.tp * (shape.act_bytes + 2 * FP32)


@dataclass(frozen=True)
class RankActivations:
    per_micro_batch: float
    largest_layer: float
    head: float


def rank_activations(
    cfg: ModelConfig, layers: list[tuple[int, int]], embedding: bool, head: bool, shape: TokenShape, recompute: str,
    software: Software = SUPERTRAIN,
) -> RankActivations:
    """Activation bytes one micro-batch leaves on a pipeline rank holding `layers` ((layer index, how many such
    layers) pairs), and the largest single layer's full set (re-materialised during its backward when
    recomputing)."""
    total = sum(n * layer_activation_bytes(cfg, layer, shape, recompute, software) for layer, n in layers)
    largest = max((layer_activation_bytes(cfg, layer, shape, "none", software) for layer, _ in layers), default=0.0)
    if embedding:
        total += embedding_activation_bytes(shape)
    if layers:
        total += rope_table_bytes(cfg, shape)
    # A pipeline stage keeps the activation it received and the one it sent until their backward.
    boundary = shape.tokens * cfg.d_model / (shape.tp if shape.sequence_parallel else 1) * shape.act_bytes
    total += boundary * ((not embedding) + (not head))
    head_bytes = head_activation_bytes(cfg, shape, software) if head else 0.0
    return RankActivations(total + head_bytes, largest if recompute != "none" else 0.0, head_bytes)


def fits(memory: MemoryBreakdown, capacity: float) -> bool:
    return memory.total <= capacity * USABLE_MEMORY_FRACTION


def _prod(values: tuple[int, ...]) -> int:
    result = 1
    for v in values:
        result *= v
    return result
