"""How long one micro-batch takes on one layer, and the collectives around it, from first principles.

Compute: every matmul is a roofline, max(FLOPs / (peak x matmul efficiency), bytes / memory bandwidth), so small
micro-batches and thin experts become weight-bound by themselves. Non-matmul work (norms, residual adds, rotary,
activation functions, softmax and dropout when attention is unfused, the loss) moves bytes and is costed at the
device's memory bandwidth. Backward is twice the forward (two matmuls per forward matmul); recompute adds a forward.

Communication: alpha-beta on the tier the group spans (`Cluster.tier_for_group`): a ring all-reduce moves
2(g-1)/g of the message per device, all-gather / reduce-scatter / all-to-all (g-1)/g, each with (g-1) latency steps.
What can hide behind compute is subtracted where the engine overlaps it (see `parallel.plan.software`).
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import Activation, AttentionKind, ModelConfig
from models.counts import attention_params, mlp_params
from parallel.plan.memory import TokenShape
from parallel.plan.software import SUPERTRAIN, Software
from parallel.plan.topology import DeviceSpec, LinkTier

# Fraction of memory bandwidth that streaming kernels (norms, elementwise, optimizer updates) reach: STREAM-style
# copies reach ~80-90% of HBM bandwidth on GPUs; 0.8 leaves room for imperfect fusion.
MEMORY_BOUND_EFFICIENCY = 0.8
# A backward pass runs two matmuls (input and weight gradient) for each forward matmul, and about twice the
# forward's elementwise traffic.
BACKWARD_FACTOR = 2.0
# Bytes per score an unfused attention moves (fp16): forward writes QK^T, softmax reads/writes, dropout
# reads/writes and writes its mask, AV reads (13); backward about 19 (Megatron's fused scale-mask-softmax kernels).
UNFUSED_SCORE_BYTES_FORWARD = 13
UNFUSED_SCORE_BYTES_BACKWARD = 19


# ---- collectives --------------------------------------------------------------------------------------------


def all_reduce(nbytes: float, size: int, tier: LinkTier) -> float:
    if size <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (size - 1) / size * nbytes / tier.effective_bandwidth + 2 * (size - 1) * tier.latency


def all_gather(nbytes: float, size: int, tier: LinkTier) -> float:
    """All-gather (or reduce-scatter) of a `nbytes` full tensor."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    return (size - 1) / size * nbytes / tier.effective_bandwidth + (size - 1) * tier.latency


def all_to_all(nbytes: float, size: int, tier: LinkTier) -> float:
    """Each rank sends `nbytes` spread over the group (the share to itself stays local)."""
    return all_gather(nbytes, size, tier)


def point_to_point(nbytes: float, tier: LinkTier) -> float:
    return nbytes / tier.effective_bandwidth + tier.latency


# ---- compute ---------------------------------------------------------------------------------------------------


def matmul_time(flops: float, weight_bytes: float, device: DeviceSpec) -> float:
    return max(flops / (device.peak_flops * device.matmul_efficiency), weight_bytes / stream_rate(device))


def stream_rate(device: DeviceSpec) -> float:
    return device.memory_bandwidth * MEMORY_BOUND_EFFICIENCY


@dataclass(frozen=True)
class LayerCost:
    """Seconds for one micro-batch through one layer on one rank, and the FLOPs behind them."""

    forward: float
    backward: float
    # Extra forward work recompute adds before the backward.
    recompute: float
    # Forward FLOPs of the layer on this rank (for HFU); recompute_flops of them run again.
    forward_flops: float
    recompute_flops: float
    # Exposed communication, forward and backward (backward includes the recomputed forward's).
    comm_forward: float = 0.0
    comm_backward: float = 0.0
    tp_comm: float = 0.0
    ep_comm: float = 0.0
    cp_comm: float = 0.0


def _attention_matmul(cfg: ModelConfig, shape: TokenShape) -> tuple[float, float]:
    """(forward FLOPs, weight bytes) of the attention projections on one rank."""
    t, tokens, d = shape.tp, shape.tokens, cfg.d_model
    if cfg.attention == AttentionKind.mla:
        replicated = d * (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        split = attention_params(cfg) - replicated
        params = replicated + split / t
    else:
        params = attention_params(cfg) / t
    return 2 * tokens * params, params * shape.act_bytes


def _attention_core(cfg: ModelConfig, shape: TokenShape, software: Software, device: DeviceSpec) -> tuple[float, float, float]:
    """(forward seconds, backward seconds, forward FLOPs) of QK^T, softmax and AV on one rank. Fused kernels skip
    the masked half of a causal sequence; unfused ones compute every score and stream the score matrix."""
    heads = cfg.n_heads / shape.tp
    fused = software.fused_attention(cfg.qk_head_dim, cfg.value_head_dim)
    keys = shape.seq_len * (0.5 if fused else 1.0)
    if shape.cp > 1 and software.trainer_rules and shape.cp_impl != "ulysses":
        # parallel/context.py. allgather: SDPA with an explicit mask, every score computed. ring: its own block
        # attention in PyTorch, scores streamed through memory; its own block whole and masked, half of each other
        # rank's (the load-balanced chunks see it wholly or not at all). Ulysses runs the device's causal kernel.
        local = shape.seq_len / shape.cp
        keys = shape.seq_len if shape.cp_impl == "allgather" else local * (shape.cp + 1) / 2
        fused = fused and shape.cp_impl == "allgather"
    flops = 2 * shape.tokens * keys * heads * (cfg.qk_head_dim + cfg.value_head_dim)
    compute = flops / (device.peak_flops * device.matmul_efficiency)
    if fused:
        return compute, BACKWARD_FACTOR * 1.25 * compute, flops
    scores = shape.tokens * keys * heads
    forward = max(compute, scores * UNFUSED_SCORE_BYTES_FORWARD / stream_rate(device))
    backward = max(BACKWARD_FACTOR * compute, scores * UNFUSED_SCORE_BYTES_BACKWARD / stream_rate(device))
    return forward, backward, flops


def _elementwise_bytes(cfg: ModelConfig, layer: int, shape: TokenShape, software: Software) -> float:
    moe_t = shape.tp if software.tp_splits_experts else 1
    """Forward bytes of the non-matmul ops of one layer on one rank."""
    b, d, t = shape.act_bytes, cfg.d_model, shape.tp
    residual = d / t if shape.sequence_parallel else d
    per_token = 2 * 2 * residual * b  # two norms: read, write
    per_token += 2 * 3 * residual * b  # two residual adds: read two, write one
    if cfg.attention == AttentionKind.mla:
        per_token += 2 * (cfg.n_heads / t + 1) * cfg.qk_rope_head_dim * b
    else:
        per_token += 2 * (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim / t * b  # rotary on q and k
        if cfg.n_kv_heads < cfg.n_heads:
            per_token += 2 * cfg.n_heads * cfg.head_dim / t * b  # k and v expanded to every head
    gate = 4 if cfg.activation == Activation.swiglu else 2
    if cfg.is_moe_layer(layer):
        per_token += cfg.top_k * (gate * cfg.moe_ffn_hidden / moe_t + 4 * d) * b  # activation, permute, unpermute
        per_token += gate * cfg.n_shared_experts * cfg.moe_ffn_hidden / moe_t * b + 2 * cfg.n_routed_experts * 4
    else:
        per_token += gate * cfg.ffn_hidden / t * b
    if software.dropout:
        per_token += 2 * (2 * residual * b + residual)  # two dropouts: read, write, one-byte mask
    return per_token * shape.tokens


def _ffn_matmul(cfg: ModelConfig, layer: int, shape: TokenShape, ep: int, device: DeviceSpec,
                split_experts: bool = False) -> float:
    """Forward seconds of the feed-forward matmuls on one rank (routed experts: this rank's share of the work,
    weight-bound when few tokens reach each local expert)."""
    tokens, t = shape.tokens, shape.tp
    if not cfg.is_moe_layer(layer):
        params = mlp_params(cfg, cfg.ffn_hidden) / t
        return matmul_time(2 * tokens * params, params * shape.act_bytes, device)
    # supertrain's tensor parallelism leaves MoE blocks whole: every tp rank runs them on the whole sequence.
    expert = mlp_params(cfg, cfg.moe_ffn_hidden) / (t if split_experts else 1)
    routed_flops = 2 * tokens * cfg.top_k * expert
    local_experts = cfg.n_routed_experts / ep
    routed = matmul_time(routed_flops, local_experts * expert * shape.act_bytes, device)
    shared_params = cfg.n_shared_experts * expert
    shared = matmul_time(2 * tokens * shared_params, shared_params * shape.act_bytes, device)
    router = matmul_time(2 * tokens * cfg.d_model * cfg.n_routed_experts, 0.0, device)
    return routed + shared + router


def _ffn_flops(cfg: ModelConfig, layer: int, shape: TokenShape, split_experts: bool = False) -> float:
    if not cfg.is_moe_layer(layer):
        return 2 * shape.tokens * mlp_params(cfg, cfg.ffn_hidden) / shape.tp
    expert = mlp_params(cfg, cfg.moe_ffn_hidden) / (shape.tp if split_experts else 1)
    return 2 * shape.tokens * ((cfg.top_k + cfg.n_shared_experts) * expert + cfg.d_model * cfg.n_routed_experts)


@dataclass(frozen=True)
class Links:
    """The tier each parallel group of a layout uses."""

    tp: LinkTier
    cp: LinkTier
    ep: LinkTier
    pp: LinkTier
    dp: LinkTier
    fsdp: LinkTier
    expert_fsdp: LinkTier


def layer_cost(
    cfg: ModelConfig, layer: int, shape: TokenShape, recompute: str, ep: int, cp: int, links: Links,
    device: DeviceSpec, software: Software = SUPERTRAIN, overlap_ep: bool = False,
) -> LayerCost:
    """One layer, one micro-batch, one rank: compute, recompute and the tp / ep / cp communication it waits for."""
    attn_flops, attn_weights = _attention_matmul(cfg, shape)
    projections = matmul_time(attn_flops, attn_weights, device)
    core_forward, core_backward, core_flops = _attention_core(cfg, shape, software, device)
    ffn = _ffn_matmul(cfg, layer, shape, ep, device, software.tp_splits_experts)
    elementwise = _elementwise_bytes(cfg, layer, shape, software) / stream_rate(device)

    forward = projections + core_forward + ffn + elementwise
    backward = BACKWARD_FACTOR * (projections + ffn + elementwise) + core_backward
    flops = attn_flops + core_flops + _ffn_flops(cfg, layer, shape, software.tp_splits_experts)
    if recompute == "full":
        recompute_time, recompute_flops = forward, flops
    elif recompute == "selective" and not software.flash_attention:
        # Megatron's selective recompute (Korthikanti et al. 2022): the attention core (QK^T, softmax, dropout,
        # AV) runs again before its backward; the memory model keeps none of its seq x seq tensors.
        recompute_time, recompute_flops = elementwise + core_forward, core_flops
    elif recompute == "selective":
        recompute_time, recompute_flops = elementwise, 0.0
    else:
        recompute_time, recompute_flops = 0.0, 0.0

    # Tensor parallel: per split block one collective in, one out (all-reduce; or all-gather + reduce-scatter
    # under SP). An MoE block is not split: under SP its input is gathered and its output sliced locally.
    message = shape.tokens * cfg.d_model * shape.act_bytes
    t = shape.tp
    tp_forward = 0.0
    if t > 1:
        per_block = 2 * all_gather(message, t, links.tp) if shape.sequence_parallel else all_reduce(message, t, links.tp)
        tp_forward = per_block
        if not cfg.is_moe_layer(layer) or software.tp_splits_experts:
            tp_forward += per_block
        elif shape.sequence_parallel:
            tp_forward += all_gather(message, t, links.tp)
    tp_backward = tp_forward * (2 if recompute == "full" else 1)

    # Expert parallel: dispatch and combine all-to-alls each way (again for a recomputed forward).
    ep_forward = 0.0
    if cfg.is_moe_layer(layer) and ep > 1:
        routed = shape.tokens * cfg.top_k * cfg.d_model * shape.act_bytes / (t if shape.sequence_parallel else 1)
        ep_forward = 2 * all_to_all(routed, ep, links.ep)
        if overlap_ep:
            # DualPipe(V) runs one micro-batch's all-to-all under another's attention and MLP.
            ep_forward = max(0.0, ep_forward - (forward - elementwise))
    ep_backward = ep_forward * (2 if recompute == "full" else 1)

    # Context parallel (parallel/context.py). ring: K and V (and their gradients going back) pass around the cp
    # ranks, overlapped with the attention computed on the chunk already at hand. allgather: one all-gather of K
    # and V, a reduce-scatter of their gradients, neither overlapped. ulysses: all-to-alls of q, k, v in and the
    # output back, and the same for their gradients.
    cp_forward = cp_backward = 0.0
    if cp > 1:
        if cfg.attention == AttentionKind.mla:
            kv_width = cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim) / t
            q_width, out_width = cfg.n_heads * cfg.qk_head_dim / t, cfg.n_heads * cfg.value_head_dim / t
        else:
            kv_width = 2 * cfg.n_kv_heads * cfg.head_dim / t
            q_width = out_width = cfg.n_heads * cfg.head_dim / t
        local_kv = shape.tokens * kv_width * shape.act_bytes
        if shape.cp_impl == "allgather":
            cp_forward = all_gather(cp * local_kv, cp, links.cp)
            cp_backward = cp_forward * (2 if recompute == "full" else 1)  # the reduce-scatter costs the same
        elif shape.cp_impl == "ulysses":
            moved = shape.tokens * (q_width + out_width) * shape.act_bytes + local_kv
            cp_forward = all_to_all(moved, cp, links.cp)
            cp_backward = cp_forward * (2 if recompute == "full" else 1)
        else:
            ring = (cp - 1) * point_to_point(local_kv, links.cp)
            cp_forward = max(0.0, ring - core_forward)
            cp_backward = max(0.0, 2 * ring - core_backward) + (cp_forward if recompute == "full" else 0.0)

    return LayerCost(
        forward=forward, backward=backward, recompute=recompute_time, forward_flops=flops,
        recompute_flops=recompute_flops,
        comm_forward=tp_forward + ep_forward + cp_forward,
        comm_backward=tp_backward + ep_backward + cp_backward,
        tp_comm=tp_forward + tp_backward, ep_comm=ep_forward + ep_backward, cp_comm=cp_forward + cp_backward,
    )


@dataclass(frozen=True)
class EdgeCost:
    """Embedding lookup (first stage) or final norm, output projection and loss (last stage)."""

    forward: float
    backward: float
    forward_flops: float


def embedding_cost(cfg: ModelConfig, shape: TokenShape, device: DeviceSpec) -> EdgeCost:
    moved = shape.tokens * cfg.d_model * shape.act_bytes / (shape.tp if shape.sequence_parallel else 1)
    return EdgeCost(moved / stream_rate(device), 2 * moved / stream_rate(device), 0.0)


def head_cost(cfg: ModelConfig, shape: TokenShape, device: DeviceSpec) -> EdgeCost:
    vocab = cfg.vocab_size / shape.tp
    flops = 2 * shape.tokens * cfg.d_model * vocab
    projection = matmul_time(flops, cfg.d_model * vocab * shape.act_bytes, device)
    # Loss on the logits: cast to fp32, log-softmax, its gradient and the cast back (~28 bytes per logit).
    loss = shape.tokens * vocab * (2 * shape.act_bytes + 24) / stream_rate(device)
    return EdgeCost(projection + loss / 2, BACKWARD_FACTOR * projection + loss / 2, flops)


def optimizer_time(numel_held: float, bytes_per_param: float, device: DeviceSpec) -> float:
    """AdamW touches every local parameter, gradient and moment (plus master weights) once per step."""
    return numel_held * bytes_per_param / stream_rate(device)
