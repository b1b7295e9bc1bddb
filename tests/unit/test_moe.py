"""The DeepSeek-style MoE block: grouped experts, routing, load-balancing bias, auxiliary loss, capacity dropping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from models import ops
from configs.errors import ConfigError
from configs.schema import Activation, ModelConfig, MoEConfig, ScoreFn
from models.moe import GroupedExperts, MoE, sequence_balance_loss, update_load_balance
from models.transformer import build_model
from parallel.materialize import materialize


def moe_config(**overrides) -> ModelConfig:
    moe = overrides.pop("moe", {})
    shape = dict(
        n_layers=2, d_model=32, n_heads=4, ffn_hidden=64, vocab_size=64, n_routed_experts=8, n_shared_experts=1,
        top_k=2, moe_ffn_hidden=16, n_dense_layers=1,
    )
    shape.update(overrides)
    return ModelConfig(**shape, moe=MoEConfig(**moe))


def build_block(cfg: ModelConfig, seed: int = 0, aux_loss_scale: float = 1.0) -> MoE:
    torch.manual_seed(seed)
    block = MoE(cfg, aux_loss_scale)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    return block


def expert_mlp(x: torch.Tensor, experts: GroupedExperts, e: int) -> torch.Tensor:
    """Expert e's SwiGLU MLP by definition: the stored gate/up weight pairs each unit's gate and up columns."""
    gate, up = experts.w13[e][:, 0::2], experts.w13[e][:, 1::2]
    return (F.silu(x @ gate) * (x @ up)) @ experts.w2[e]


def naive_moe(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the block must reproduce."""
    router, experts = block.router, block.experts
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            logits = token @ router.gate.weight.T
            scores = torch.sigmoid(logits) if router.score_fn == ScoreFn.sigmoid else torch.softmax(logits, -1)
            chosen = torch.topk(scores + block.expert_bias, router.top_k).indices
            weights = scores[chosen]
            if router.route_norm:
                weights = weights / weights.sum()
            for e, w in zip(chosen.tolist(), (weights * router.route_scale).tolist()):
                out[b, t] += w * expert_mlp(token, experts, e)
            if block.shared_experts is not None:
                out[b, t] += block.shared_experts(token)
    return out


# ---- grouped experts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grouped_experts_equal_a_per_expert_reference_forward_and_backward(backend: str) -> None:
    """The reference loop and the CPU backend's torch._grouped_mm."""
    from models.kernels import kernels_for

    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32, Activation.swiglu)
    experts.kernels = kernels_for("cpu", backend if backend == "reference" else "auto")
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no tokens is part of the contract
    x = torch.randn(10, 16, requires_grad=True)
    out = experts(x, counts)
    out.sum().backward()  # a stride-0 gradient, which torch._grouped_mm's own backward rejects
    grads = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]

    x.grad = None
    experts.zero_grad()
    pieces = torch.split(x, counts.tolist())
    reference = torch.cat(
        [expert_mlp(piece, experts, e) for e, piece in enumerate(pieces)]
    )
    reference.sum().backward()
    torch.testing.assert_close(out, reference)
    for got, want in zip(grads, [x.grad] + [p.grad for p in experts.parameters()]):
        torch.testing.assert_close(got, want)


def test_grouped_experts_run_on_a_local_slice_of_the_experts() -> None:
    """Expert parallelism keeps experts [2, 4) on a rank: the same module, built with 2 experts, must compute
    exactly what the full module computes for those experts' tokens."""
    torch.manual_seed(0)
    full = GroupedExperts(4, 16, 32, Activation.swiglu)
    local = GroupedExperts(2, 16, 32, Activation.swiglu)
    with torch.no_grad():
        for p_full, p_local in zip(full.parameters(), local.parameters()):
            p_full.normal_(0.0, 0.3)
            p_local.copy_(p_full[2:])
    x = torch.randn(7, 16)
    torch.testing.assert_close(local(x, torch.tensor([4, 3])), full(x, torch.tensor([0, 0, 4, 3])))
    with pytest.raises(ValueError, match="holds 2"):
        local(x, torch.tensor([0, 0, 4, 3]))


def test_grouped_mm_native_and_looped_paths_agree() -> None:
    """The CPU backend's torch._grouped_mm against the reference loop over experts."""
    from models.kernels import kernels_for
    from models.kernels.reference import grouped_mm_takes

    torch.manual_seed(0)
    x, w, counts = torch.randn(9, 16), torch.randn(3, 16, 8), torch.tensor([4, 0, 5])
    fp32 = (torch.float32,)
    assert grouped_mm_takes(x, w, fp32)
    torch.testing.assert_close(kernels_for("cpu").grouped_mm(x, w, counts), ops.grouped_mm(x, w, counts))
    odd = torch.randn(9, 5)  # 20-byte rows: not a multiple of 16, so the loop takes it
    assert not grouped_mm_takes(odd, torch.randn(3, 5, 8), fp32)


def test_gelu_experts_have_no_gate() -> None:
    experts = GroupedExperts(2, 16, 32, Activation.gelu)
    assert [n for n, _ in experts.named_parameters()] == ["w1", "w2"]
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(3, 16)
    want = F.gelu(x @ experts.w1[1], approximate="tanh") @ experts.w2[1]
    torch.testing.assert_close(experts(x, torch.tensor([0, 3])), want)


# ---- routing -------------------------------------------------------------------------------------------------


def test_all_tokens_on_one_expert_equal_the_dense_computation() -> None:
    cfg = moe_config(top_k=1, moe={"score_fn": "sigmoid", "route_norm": True})
    block = build_block(cfg)
    with torch.no_grad():
        block.expert_bias[5] = 100.0  # every token picks expert 5; route_norm makes its weight exactly 1
    x = torch.randn(2, 6, 32)
    experts = block.experts
    dense = expert_mlp(x, experts, 5) + block.shared_experts(x)
    torch.testing.assert_close(block.train()(x), dense)
    assert block.tokens_per_expert.tolist() == [0, 0, 0, 0, 0, 12, 0, 0]


@pytest.mark.parametrize(
    "moe",
    [
        {"score_fn": "softmax", "route_norm": False},
        {"score_fn": "softmax", "route_norm": True},
        {"score_fn": "sigmoid", "route_norm": True, "route_scale": 2.5},
    ],
)
def test_block_matches_the_token_by_token_definition(moe: dict) -> None:
    block = build_block(moe_config(moe=moe))
    with torch.no_grad():
        block.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))  # the bias must move choices, never weights
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x), naive_moe(block, x), rtol=1e-5, atol=1e-5)


def test_output_does_not_depend_on_how_the_batch_is_split() -> None:
    block = build_block(moe_config(moe={"aux_loss_coef": 0.01})).train()
    x = torch.randn(4, 8, 32)
    whole = block(x)
    parts = torch.cat([block(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=1e-6)


def test_group_limited_routing_keeps_each_token_inside_its_groups() -> None:
    cfg = moe_config(top_k=2, moe={"n_expert_groups": 4, "n_limited_groups": 1})
    block = build_block(cfg)
    _, chosen, _ = block.router(torch.randn(64, 32), block.expert_bias)
    groups = chosen // 2  # 8 experts in 4 groups of 2
    assert torch.equal(groups[:, 0], groups[:, 1])
    assert len(set(groups[:, 0].tolist())) > 1


def test_bad_moe_shapes_fail_with_one_line() -> None:
    for overrides in (
        {"top_k": 9},
        {"moe": {"n_expert_groups": 3}},
        {"top_k": 4, "moe": {"n_expert_groups": 4, "n_limited_groups": 1}},
        {"moe": {"n_expert_groups": 2, "n_limited_groups": 3}},
    ):
        with pytest.raises(ConfigError) as error:
            moe_config(**overrides)
        assert "\n" not in str(error.value)


# ---- capacity ------------------------------------------------------------------------------------------------


def test_capacity_drops_the_lowest_weighted_assignments_and_counts_them() -> None:
    cfg = moe_config(top_k=1, n_routed_experts=2, n_shared_experts=0,
                     moe={"capacity_factor": 1.0, "route_norm": False, "score_fn": "sigmoid"})
    block = build_block(cfg).train()
    with torch.no_grad():
        block.expert_bias[0] = 100.0  # all 8 tokens want expert 0, which may take ceil(1.0 * 8 / 2) = 4
    x = torch.randn(1, 8, 32)
    out = block(x)[0]

    weights = torch.sigmoid(x[0] @ block.router.gate.weight[0])
    kept = set(torch.topk(weights, 4).indices.tolist())
    experts = block.experts
    for t in range(8):
        want = weights[t] * expert_mlp(x[0, t], experts, 0) if t in kept else 0
        torch.testing.assert_close(out[t], torch.zeros(32) + want)
    metrics = update_load_balance(block)
    assert metrics["moe/dropped_fraction"] == 0.5
    assert metrics["moe/block/tokens_per_expert"] == [8, 0]  # load counts what the router chose, before dropping


def test_no_capacity_drops_nothing() -> None:
    block = build_block(moe_config()).train()
    with torch.no_grad():
        block.expert_bias[0] = 100.0
    block(torch.randn(2, 8, 32))
    assert next(v for k, v in update_load_balance(block).items() if k.endswith("dropped_fraction")) == 0.0


# ---- load-balancing bias -------------------------------------------------------------------------------------


def test_bias_update_lowers_overloaded_and_raises_underloaded_experts() -> None:
    cfg = moe_config(moe={"bias_update_rate": 0.01})
    model = materialize(build_model(cfg), cfg, torch.device("cpu"), seed=0).train()
    block = model.layers["1"].feed_forward
    with torch.no_grad():
        block.expert_bias[3] = 100.0  # expert 3 takes every token
    model(torch.randint(0, 64, (2, 16)))
    load = block.tokens_per_expert.clone()
    bias_before = block.expert_bias.clone()

    reduced = []
    metrics = update_load_balance(model, reduce=lambda t: reduced.append(t) or t * 2)  # two identical ranks

    assert len(reduced) == 1  # one collective for every layer and statistic
    change = block.expert_bias - bias_before
    assert change[3] < 0 and (change[load < load.mean()] > 0).all()
    torch.testing.assert_close(change.sum(), torch.tensor(0.0))  # shifts cancel: the biases do not drift
    assert metrics["moe/1/tokens_per_expert"] == [int(v) for v in (2 * load).tolist()]
    assert metrics["moe/1/max_mean_load"] == pytest.approx(float(load.max() / load.mean()))
    assert metrics["moe/max_mean_load"] == metrics["moe/1/max_mean_load"]
    assert block.tokens_per_expert.sum() == 0 and block.routing_totals.sum() == 0
    assert update_load_balance(model) == {}  # nothing counted since


def test_bias_does_not_move_when_the_rate_is_zero() -> None:
    block = build_block(moe_config(moe={"bias_update_rate": 0.0})).train()
    block(torch.randn(2, 8, 32))
    update_load_balance(block)
    assert block.expert_bias.abs().sum() == 0


def test_bias_is_checkpointed_and_statistics_are_not() -> None:
    keys = set(MoE(moe_config()).state_dict())
    assert "expert_bias" in keys and "tokens_per_expert" not in keys and "routing_totals" not in keys


@pytest.mark.parametrize("reentrant", [False, True])
def test_tokens_are_counted_once_under_activation_checkpointing_and_not_in_eval(reentrant: bool) -> None:
    block = build_block(moe_config(moe={"aux_loss_coef": 0.01})).train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    # Without early stop the recomputation replays the whole forward, statistics included.
    with set_checkpoint_early_stop(False):
        checkpoint(block, x, use_reentrant=reentrant).sum().backward()
    assert block.tokens_per_expert.sum() == 2 * 8 * 2
    assert block.routing_totals[3] == 1  # one forward, one auxiliary loss
    block.eval()
    with torch.no_grad():
        block(x)
    assert block.tokens_per_expert.sum() == 2 * 8 * 2


# ---- auxiliary loss ------------------------------------------------------------------------------------------


def test_aux_loss_adds_its_gradient_without_changing_the_output() -> None:
    coef, scale = 0.3, 0.5
    with_aux = build_block(moe_config(moe={"aux_loss_coef": coef}), aux_loss_scale=scale).train()
    without = build_block(moe_config(moe={"aux_loss_coef": 0.0})).train()
    x = torch.randn(3, 8, 32)

    out = with_aux(x)
    out.square().sum().backward()

    plain = without(x)
    tokens = x.reshape(-1, 32)
    scores, chosen, _ = without.router(tokens, without.expert_bias)
    aux = sequence_balance_loss(scores.view(3, 8, -1), chosen.view(3, 8, -1), top_k=2)
    (plain.square().sum() + scale * coef * aux).backward()

    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(with_aux.router.gate.weight.grad, without.router.gate.weight.grad)
    metrics = update_load_balance(with_aux)
    assert metrics["moe/aux_loss"] == pytest.approx(coef * aux.item(), rel=1e-5)


def test_sequence_balance_loss_is_one_when_load_and_scores_are_even() -> None:
    n_experts, top_k, seq = 4, 2, 8
    scores = torch.full((1, seq, n_experts), 0.25)
    chosen = torch.tensor([[0, 1], [2, 3]] * (seq // 2)).view(1, seq, top_k)
    assert sequence_balance_loss(scores, chosen, top_k).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1]] * seq).view(1, seq, top_k)
    assert sequence_balance_loss(scores, skewed, top_k).item() == pytest.approx(1.0)  # even scores: no preference
    peaked = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, seq, n_experts)
    assert sequence_balance_loss(peaked, skewed, top_k) > sequence_balance_loss(peaked, chosen, top_k)


# ---- whole model ---------------------------------------------------------------------------------------------


def test_first_layers_are_dense_and_the_rest_moe() -> None:
    model = build_model(moe_config(n_layers=3, n_dense_layers=1))
    kinds = [type(layer.feed_forward).__name__ for layer in model.layers.values()]
    assert kinds == ["FeedForward", "MoE", "MoE"]
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.1.feed_forward.experts.w13", "layers.1.feed_forward.experts.w2",
            "layers.1.feed_forward.router.gate.weight", "layers.1.feed_forward.shared_experts.w13.weight",
            "layers.1.feed_forward.shared_experts.w2.weight"} <= names


def test_small_moe_model_learns_and_balances() -> None:
    cfg = moe_config(n_layers=2, n_dense_layers=1, attention="mla", q_lora_rank=16, kv_lora_rank=16,
                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                     moe={"score_fn": "sigmoid", "bias_update_rate": 0.01, "aux_loss_coef": 0.001})
    model = materialize(build_model(cfg), cfg, torch.device("cpu"), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (4, 33), generator=generator)
    losses = []
    for _ in range(12):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics = update_load_balance(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(metrics["moe/aux_loss"]) and metrics["moe/1/max_mean_load"] >= 1.0
    assert model.layers["1"].feed_forward.expert_bias.abs().sum() > 0
