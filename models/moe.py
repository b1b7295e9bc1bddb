"""DeepSeek-style mixture-of-experts feed-forward block, in plain PyTorch.

    x ──> router (scores, top-k) ──> sort assignments by expert ──> experts(x_sorted, counts) ──> unsort,
      │                                                                                          weight, sum over k
      └──> shared experts ───────────────────────────────────────────────────────────────────────────────> + ──> out

`GroupedExperts` is the one submodule expert parallelism wraps: it takes tokens already sorted by expert plus the
count per expert, and returns their outputs in the same order, knowing nothing of other ranks. It reads the number
of experts from its weights, so it runs the same with all experts or with a rank's slice of them (dim 0 sharded).
Routing, sorting, un-sorting, score weighting and the shared experts stay in `MoE` around it; the sort and the
weighted un-sort are the kernel backend's `permute_tokens` / `unpermute_tokens` (models/kernels/reference.py keeps the
plain version, capacity dropping included).

Load balancing (DeepSeek-V3, arXiv 2412.19437 s2.1.2):
- a per-expert bias added to the scores for the top-k choice only (never to the combine weights), moved after every
  optimizer step towards even load by `update_load_balance`, from token counts summed over data-parallel ranks;
- an optional sequence-wise auxiliary loss, applied as an extra gradient in backward so the model still returns
  logits only (works unchanged under activation checkpointing and pipeline parallelism).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import Activation, ModelConfig, ScoreFn
from models.feed_forward import FeedForward
from models.layers import Linear, UsesKernels, local_block


class GroupedExperts(UsesKernels, nn.Module):
    """Routed experts with stacked weights, each expert's (in, out) matrix: SwiGLU keeps the gate and up projections
    as one weight w13 (experts, d_model, 2 * hidden), each hidden unit's gate and up columns paired (2i, 2i + 1), so
    one grouped product gives what the SwiGLU kernels take (as a GateUpProjection does); GELU has w1 (experts,
    d_model, hidden). w2 is (experts, hidden, d_model).

    forward(x, counts): x holds counts[0] rows for expert 0, then counts[1] rows for expert 1, and so on; the number
    of experts is len(counts) == the weights' first dimension, whole or a local slice under expert parallelism.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, activation: Activation) -> None:
        super().__init__()
        self.gated = activation == Activation.swiglu
        if self.gated:
            self.w13 = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        else:
            self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w_in, w2 = local_block(self.w13 if self.gated else self.w1), local_block(self.w2)
        if counts.shape[0] != w_in.shape[0]:
            raise ValueError(f"got token counts for {counts.shape[0]} experts, but this module holds {w_in.shape[0]}")
        # _grouped_mm is not an autocast op: compute in the autocast dtype, else in the weights' dtype, as a Linear.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else w_in.dtype
        x, w_in, w2 = x.to(dtype), w_in.to(dtype), w2.to(dtype)
        projected = self.kernels.grouped_mm(x, w_in, counts)
        hidden = self.kernels.swiglu(projected) if self.gated else F.gelu(projected, approximate="tanh")
        return self.kernels.grouped_mm(hidden, w2, counts)


class TopKRouter(nn.Module):
    """Scores every expert for every token and picks top_k of them (optionally within the best expert groups)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(cfg.d_model, cfg.n_routed_experts, bias=False)
        self.top_k = cfg.top_k
        self.score_fn = cfg.moe.score_fn
        self.route_norm = cfg.moe.route_norm
        self.route_scale = cfg.moe.route_scale
        self.n_groups = cfg.moe.n_expert_groups
        self.n_limited_groups = cfg.moe.n_limited_groups

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, d_model) -> (scores (tokens, experts) fp32, chosen experts (tokens, k), weights (tokens, k) fp32).

        The bias shifts the choice only; the weights come from the unbiased scores.
        """
        logits = self.gate(x).float()  # fp32 routing whatever the compute dtype: near-ties decide the experts
        scores = torch.sigmoid(logits) if self.score_fn == ScoreFn.sigmoid else torch.softmax(logits, dim=-1)
        choice = self._limit_to_groups(scores.detach() + bias)
        chosen = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, chosen, weights * self.route_scale

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3 node-limited routing): keep the n_limited_groups groups whose two best
        experts score highest and mask the rest, so a token's experts live on few devices."""
        if self.n_groups == 1:
            return choice
        grouped = choice.unflatten(-1, (self.n_groups, -1))
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(
            -1, best.topk(self.n_limited_groups, dim=-1).indices, True
        )
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


def sequence_balance_loss(scores: torch.Tensor, chosen: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), averaged over sequences, without alpha.

    scores (batch, seq, experts), chosen (batch, seq, top_k). Per sequence: sum_i f_i * P_i with f_i the fraction of
    the sequence's selections that went to expert i times experts / top_k (1 when even) and P_i the mean normalised
    score of expert i. Only P carries gradient. Per sequence, so it does not depend on how sequences are batched.
    """
    n_experts = scores.shape[-1]
    seq_len = scores.shape[1]
    selected = torch.zeros_like(scores).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=scores.dtype))
    load = selected.sum(dim=1) * n_experts / (top_k * seq_len)  # (batch, experts)
    probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (load * probability).sum(dim=-1).mean()


class _AddAuxLossGradient(torch.autograd.Function):
    """Returns `output` untouched; in backward also sends d(total loss)/d(aux loss) = scale into `aux_loss`.

    So the auxiliary loss trains the router as if added to the main loss, while forward keeps returning logits only.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux_loss.shape, aux_loss.dtype, aux_loss.device
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=ctx.aux_device)
        return grad_output, aux_grad, None


def _recomputing() -> bool:
    """True while activation checkpointing re-runs a forward inside backward, so statistics are not counted twice.

    torch.utils.checkpoint itself relies on this private call; a normal forward runs outside any backward graph task.
    """
    return torch._C._current_graph_task_id() != -1


class MoE(UsesKernels, nn.Module):
    """Shared experts plus top-k routed fine-grained experts. Input and output (batch, seq, d_model).

    `aux_loss_scale`: d(loss that enters backward)/d(one forward's loss), fixed by how the training loop combines
    micro-batches (1 / micro-batches when it averages losses before backward, 1 when it divides gradients after);
    the auxiliary balance loss's gradient is scaled by it so that it trains as if added to the main loss.
    """

    def __init__(self, cfg: ModelConfig, aux_loss_scale: float = 1.0) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.moe.capacity_factor
        self.aux_loss_coef = cfg.moe.aux_loss_coef
        self.bias_update_rate = cfg.moe.bias_update_rate
        self.aux_loss_scale = aux_loss_scale
        # Off while a forward is not training data (a pipeline stage's shape-inference pass): see suspend_statistics.
        self.record_statistics = True

        self.router = TopKRouter(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_hidden, cfg.activation)
        self.shared_experts = (
            FeedForward(cfg.d_model, cfg.n_shared_experts * cfg.moe_ffn_hidden, cfg.activation)
            if cfg.n_shared_experts
            else None
        )
        # Persistent: the balance a run has reached is part of its state and is checkpointed.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts), persistent=True)
        # Statistics since the last update_load_balance (training forwards only), not checkpointed.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        # [routed assignments, dropped assignments, sum of aux losses, forwards]
        self.register_buffer("routing_totals", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        tokens = x.reshape(-1, d_model)
        scores, chosen, weights = self.router(tokens, self.expert_bias)

        flat_expert = chosen.flatten()  # assignment a = token * top_k + slot
        # scatter_add rather than bincount: a fixed output size, which torch.compile can trace.
        counts = flat_expert.new_zeros(self.n_experts).scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        capacity = (math.ceil(self.capacity_factor * flat_expert.shape[0] / self.n_experts)
                    if self.capacity_factor > 0 else None)
        rows, kept_counts, mapping = self.kernels.permute_tokens(tokens, chosen, weights, counts, capacity)
        expert_out = self.experts(rows, kept_counts)
        # Dropped assignments contribute nothing; each kept one returns to its own slot, weighted.
        routed = self.kernels.unpermute_tokens(expert_out, mapping, weights).to(x.dtype)
        out = routed if self.shared_experts is None else routed + self.shared_experts(tokens)
        out = out.view(batch, seq, d_model)

        aux_loss = None
        if self.aux_loss_coef > 0 and self.training and torch.is_grad_enabled():
            aux_loss = self.aux_loss_coef * sequence_balance_loss(
                scores.view(batch, seq, -1), chosen.view(batch, seq, -1), self.top_k
            )
            out = _AddAuxLossGradient.apply(out, aux_loss, self.aux_loss_scale)
        if self.training:
            self._record(counts, flat_expert.shape[0] - rows.shape[0], flat_expert.shape[0], aux_loss)
        return out

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, dropped: int, routed: int, aux_loss: Optional[torch.Tensor]) -> None:
        if _recomputing() or not self.record_statistics:
            return
        self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        self.routing_totals[0] += routed
        self.routing_totals[1] += dropped
        if aux_loss is not None:
            self.routing_totals[2] += aux_loss.detach().float()
        self.routing_totals[3] += 1


# ---- model-level load balancing ------------------------------------------------------------------------------

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The model's MoE blocks keyed by layer index ("3"), whatever wrappers surround them; by module name ("block"
    for a bare block) otherwise."""
    found: dict[str, MoE] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            match = _LAYER.search(name + ".")
            found[match.group(1) if match else name or "block"] = module
    return found


def suspend_statistics_for_next_forward(model: nn.Module) -> None:
    """Do not count the routing of `model`'s next forward call (it is not a training micro-batch)."""
    layers = list(moe_layers(model).values())
    if not layers:
        return

    def suspend(module: nn.Module, args: Any) -> None:
        for block in layers:
            block.record_statistics = False

    def resume(module: nn.Module, args: Any, output: Any) -> None:
        for block in layers:
            block.record_statistics = True
        pre.remove()
        post.remove()

    pre = model.register_forward_pre_hook(suspend)
    post = model.register_forward_hook(resume)


@torch.no_grad()
def reset_statistics(model: nn.Module) -> None:
    """Forget the routing statistics counted since the last update (a step whose update was dropped)."""
    for block in moe_layers(model).values():
        block.tokens_per_expert.zero_()
        block.routing_totals.zero_()


@torch.no_grad()
def update_load_balance(
    model: nn.Module, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> dict[str, Any]:
    """Once per optimizer step: sum the routing statistics over data-parallel ranks, move each expert bias towards
    even load, return the metrics, and reset the statistics.

    `reduce` sums a tensor over the data-parallel ranks (all ranks that see different tokens) and returns the sum;
    every rank then applies the same update, so replicas keep identical biases. None = this process alone.
    Metrics, per layer L: moe/L/tokens_per_expert (list), moe/L/max_mean_load (max / mean tokens per expert; 1 is
    even), moe/L/dropped_fraction (of routed assignments) and, with the auxiliary loss on, moe/L/aux_loss (mean per
    forward, alpha included); plus moe/max_mean_load (worst layer), moe/dropped_fraction and moe/aux_loss (summed
    over layers, as it enters the training loss).
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    blocks = list(layers.values())
    stats = torch.stack([torch.cat([b.tokens_per_expert, b.routing_totals]) for b in blocks])  # one collective
    if reduce is not None:
        stats = reduce(stats)
    if stats[:, -1].sum() == 0:  # no training forward since the last call
        return {}
    metrics: dict[str, Any] = {}
    worst, routed_total, dropped_total, aux_total = 0.0, 0.0, 0.0, 0.0
    for (layer, block), row in zip(layers.items(), stats):
        load, (routed, dropped, aux_sum, forwards) = row[: block.n_experts], row[block.n_experts :].tolist()
        if block.bias_update_rate > 0:
            step = torch.sign(load.mean() - load)
            # A common shift changes no top-k choice; removing it keeps the biases from drifting over a long run.
            block.expert_bias += block.bias_update_rate * (step - step.mean())
        imbalance = float(load.max() / load.mean()) if load.sum() > 0 else 1.0
        metrics[f"moe/{layer}/tokens_per_expert"] = [int(round(v)) for v in load.tolist()]
        metrics[f"moe/{layer}/max_mean_load"] = imbalance
        metrics[f"moe/{layer}/dropped_fraction"] = dropped / routed if routed else 0.0
        worst, routed_total, dropped_total = max(worst, imbalance), routed_total + routed, dropped_total + dropped
        if block.aux_loss_coef > 0 and forwards:
            metrics[f"moe/{layer}/aux_loss"] = aux_sum / forwards
            aux_total += aux_sum / forwards
        block.tokens_per_expert.zero_()
        block.routing_totals.zero_()
    metrics["moe/max_mean_load"] = worst
    metrics["moe/dropped_fraction"] = dropped_total / routed_total if routed_total else 0.0
    if any(block.aux_loss_coef > 0 for block in blocks):
        metrics["moe/aux_loss"] = aux_total
    return metrics

