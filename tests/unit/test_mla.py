"""Multi-head latent attention: shapes, causality, the defining computation, and head splitting for TP."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention import build_attention
from configs.schema import ModelConfig
from models.mla import MultiHeadLatentAttention
from models.ops import apply_rope, rope_tables


def mla_config(q_lora_rank: int = 24) -> ModelConfig:
    return ModelConfig(
        d_model=64, n_heads=4, attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,  # v narrower than q/k on purpose
    )


def build(cfg: ModelConfig, seed: int = 0) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    attention = build_attention(cfg)
    with torch.no_grad():
        for name, param in attention.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return attention


def rope_for(cfg: ModelConfig, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(seq, cfg.rope_dim, cfg.rope_theta, torch.device("cpu"))


def reference(attention: MultiHeadLatentAttention, x: torch.Tensor, rope) -> torch.Tensor:
    """MLA written out head by head with an explicit causal softmax."""
    batch, seq, _ = x.shape
    nope, rot, v_dim, heads = attention.nope_dim, attention.rope_dim, attention.v_dim, 4
    if attention.low_rank_query:
        q = attention.wq_b(attention.q_norm(attention.wq_a(x)))
    else:
        q = attention.wq(x)
    q = q.view(batch, seq, heads, nope + rot)
    latent, k_rot = attention.wkv_a(x), attention.wk_rope(x)
    kv = attention.wkv_b(attention.kv_norm(latent)).view(batch, seq, heads, nope + v_dim)
    k_rot = apply_rope(k_rot.view(batch, seq, 1, rot), *rope)
    q_rot = apply_rope(q[..., nope:], *rope)
    out = torch.zeros(batch, seq, heads, v_dim)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for h in range(heads):
        scores = q[:, :, h, :nope] @ kv[:, :, h, :nope].transpose(1, 2)
        scores = scores + q_rot[:, :, h] @ k_rot[:, :, 0].transpose(1, 2)  # the rotary key is shared by every head
        scores = (scores / math.sqrt(nope + rot)).masked_fill(~mask, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ kv[:, :, h, nope:]
    return attention.wo(out.reshape(batch, seq, -1))


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_matches_the_head_by_head_definition(q_lora_rank: int) -> None:
    cfg = mla_config(q_lora_rank)
    attention = build(cfg)
    x = torch.randn(2, 7, 64)
    rope = rope_for(cfg, 7)
    out = attention(x)
    assert out.shape == (2, 7, 64)
    torch.testing.assert_close(out, reference(attention, x, rope), rtol=1e-5, atol=1e-5)


def test_mla_is_causal() -> None:
    cfg = mla_config()
    attention = build(cfg)
    x = torch.randn(1, 9, 64)
    changed = x.clone()
    changed[:, 5] += 1.0
    before, after = attention(x), attention(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_parameter_names_and_shapes_follow_the_documented_plan() -> None:
    low_rank = dict(build(mla_config(24)).named_parameters())
    assert {n: tuple(p.shape) for n, p in low_rank.items()} == {
        "wq_a.weight": (24, 64), "q_norm.weight": (24,), "wq_b.weight": (4 * 20, 24),
        "wkv_a.weight": (16, 64), "wk_rope.weight": (8, 64), "kv_norm.weight": (16,), "wkv_b.weight": (4 * 22, 16),
        "wo.weight": (64, 4 * 10),
    }
    full_rank = dict(build(mla_config(0)).named_parameters())
    assert "wq.weight" in full_rank and "wq_a.weight" not in full_rank


def test_heads_split_across_ranks_add_up_to_the_whole() -> None:
    """Tensor parallelism splits wq_b and wkv_b by output rows (heads) and wo by input columns: each half runs with
    two heads, read from the weight shapes, and the two partial outputs sum to the full result."""
    cfg = mla_config()
    whole = build(cfg)
    x = torch.randn(2, 6, 64)
    halves = []
    for rank in range(2):
        part = build(cfg)
        with torch.no_grad():
            for name in ("wq_b", "wkv_b"):
                rows = getattr(whole, name).weight.shape[0] // 2
                getattr(part, name).weight = torch.nn.Parameter(getattr(whole, name).weight[rank * rows : (rank + 1) * rows])
            cols = whole.wo.weight.shape[1] // 2
            part.wo.weight = torch.nn.Parameter(whole.wo.weight[:, rank * cols : (rank + 1) * cols])
            for name in ("wq_a", "wkv_a", "wk_rope"):
                getattr(part, name).weight.copy_(getattr(whole, name).weight)
        halves.append(part(x))
    torch.testing.assert_close(halves[0] + halves[1], whole(x), rtol=1e-5, atol=1e-5)


def test_mla_runs_under_bf16_autocast() -> None:
    cfg = mla_config()
    attention = build(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(torch.randn(1, 4, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
