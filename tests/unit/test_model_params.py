"""Parameter and FLOP counting: the arithmetic in models/counts.py against the modules it describes and against the
figures the model authors publish."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from configs.schema import ModelConfig
from models.counts import embedding_params, flops_per_token, num_params
from models.moe import MoE
from models.transformer import build_model
from configs import CONFIG_DIR
from train.config import load_config

# from_hf takes its shapes from a Hugging Face folder (tests/hf).
MODEL_CONFIGS = sorted(path.stem for path in (Path(CONFIG_DIR) / "model").glob("*.yaml") if path.stem != "from_hf")

# (total, activated, whether the activated figure includes the input embedding table). Each vendor counts
# "activated" its own way: DeepSeek's 36.6B is stated to include the output head but not the embedding
# (DeepSeek-V3 README_WEIGHTS.md), and Pangu's 39B fits only that convention too (40.4B with the embedding); Mixtral's
# 12.9B and Qwen3's 22B fit only with the embedding counted (12.75B and 21.6B without).
PUBLISHED = {
    "deepseek_v3": (671e9, 36.6e9, False),  # arXiv 2412.19437; README_WEIGHTS.md: 36.6B activated
    "qwen3_235b_a22b": (235e9, 22e9, True),  # arXiv 2505.09388, Table 2
    "qwen3_30b_a3b": (30.5e9, 3.3e9, True),  # arXiv 2505.09388, Table 2; model card: 3.3B activated
    "qwen3_8b": (8.2e9, 8.2e9, True),  # arXiv 2505.09388, Table 1; model card: 8.2B
    "mixtral_8x7b": (46.7e9, 12.9e9, True),  # arXiv 2401.04088 / Mistral announcement
    "pangu_ultra_moe": (718e9, 39e9, False),  # arXiv 2505.04519
    "llama3_8b": (8.03e9, 8.03e9, True),
    "llama3_70b": (70.6e9, 70.6e9, True),
    "llama3_405b": (405.9e9, 405.9e9, True),
}
# Within 1%: the published figures are rounded (to 0.1B, or to 1B for Qwen3 and Pangu), and a few tensors of the
# originals are not modelled (Qwen3's QK-norm and Pangu's sandwich post-norms: under 1M parameters each).
TOLERANCE = 0.01
# Qwen's model cards print activated parameters cut to one decimal: 3.35B is shown as 3.3B.
ACTIVE_TOLERANCE = {"qwen3_30b_a3b": 0.02}


def model_config(name: str) -> ModelConfig:
    return load_config([f"model={name}"]).model


def module_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated) counted on the module built on the meta device: activated drops the share of each MoE
    layer's routed-expert weights that a token does not use."""
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    unused = 0
    for module in model.modules():
        if isinstance(module, MoE):
            experts = sum(p.numel() for p in module.experts.parameters())
            unused += experts * (module.n_experts - module.top_k) // module.n_experts
    return total, total - unused


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_counted_parameters_equal_the_built_module(name: str) -> None:
    cfg = model_config(name)
    assert module_counts(cfg) == (num_params(cfg), num_params(cfg, active_only=True))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_figures(name: str) -> None:
    cfg = model_config(name)
    total, active, with_embedding = PUBLISHED[name]
    ours_active = num_params(cfg, active_only=True) - (0 if with_embedding else embedding_params(cfg))
    assert num_params(cfg) == pytest.approx(total, rel=TOLERANCE)
    assert ours_active == pytest.approx(active, rel=ACTIVE_TOLERANCE.get(name, TOLERANCE))


@pytest.mark.parametrize("name, published", [("qwen3_8b", 6.95e9), ("qwen3_30b_a3b", 29.9e9)])
def test_qwen3_non_embedding_counts_match_the_model_cards(name: str, published: float) -> None:
    """The model cards also give the count without the embedding and output tables, to three figures."""
    cfg = model_config(name)
    assert num_params(cfg) - 2 * embedding_params(cfg) == pytest.approx(published, rel=0.001)


def test_llama3_8b_count_is_exact() -> None:
    assert num_params(model_config("llama3_8b")) == 8_030_261_248


def test_flops_count_only_the_activated_experts() -> None:
    cfg = model_config("deepseek_v3")
    seq = 4096
    attention = 6 * cfg.n_layers * seq * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim)
    activated_matmul = num_params(cfg, active_only=True) - embedding_params(cfg)
    assert flops_per_token(cfg, seq) == 6 * activated_matmul + attention

    # Twice the experts at the same top_k adds only the router's extra columns.
    doubled = dataclasses.replace(cfg, n_routed_experts=2 * cfg.n_routed_experts)
    router_growth = 6 * cfg.n_moe_layers * cfg.d_model * cfg.n_routed_experts
    assert flops_per_token(doubled, seq) - flops_per_token(cfg, seq) == router_growth
    # One more expert per token adds one expert's matmuls in every MoE layer.
    wider = dataclasses.replace(cfg, top_k=cfg.top_k + 1)
    expert = 3 * cfg.d_model * cfg.moe_ffn_hidden
    assert flops_per_token(wider, seq) - flops_per_token(cfg, seq) == 6 * cfg.n_moe_layers * expert
