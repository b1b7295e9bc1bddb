"""Parameter counts and training FLOPs of a `ModelConfig`.

Pure arithmetic on the config, so the planner and the trainer's start-up line can use them for models far too large
to build. The counts follow the modules of models/transformer.py, models/moe.py and models/mla.py (a test compares
them with a meta-device model).
"""

from __future__ import annotations

from configs.schema import Activation, AttentionKind, ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention block (projections and any internal norms), without the pre-norm."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == AttentionKind.mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
        else:
            q = d * h * qk
        kv = (
            d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank
            + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        )
        return q + kv + h * cfg.v_head_dim * d
    hd = cfg.head_dim
    qk_norms = 2 * hd if cfg.qk_norm else 0
    return d * h * hd + 2 * d * cfg.n_kv_heads * hd + h * hd * d + qk_norms


def mlp_params(cfg: ModelConfig, hidden: int) -> int:
    matrices = 3 if cfg.activation == Activation.swiglu else 2
    return matrices * cfg.d_model * hidden


def moe_params(cfg: ModelConfig, active_only: bool = False) -> int:
    """One MoE feed-forward block: router, routed experts (all, or the top_k a token uses) and shared experts."""
    routed = cfg.top_k if active_only else cfg.n_routed_experts
    expert = mlp_params(cfg, cfg.moe_ffn_hidden)
    return cfg.d_model * cfg.n_routed_experts + (routed + cfg.n_shared_experts) * expert


def layer_params(cfg: ModelConfig, layer_id: int, active_only: bool = False) -> int:
    ffn = moe_params(cfg, active_only) if cfg.is_moe_layer(layer_id) else mlp_params(cfg, cfg.ffn_hidden)
    return attention_params(cfg) + ffn + 2 * cfg.d_model


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.d_model


def output_params(cfg: ModelConfig) -> int:
    """The output head's own parameters (zero when it shares the embedding)."""
    return 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model


def num_params(cfg: ModelConfig, active_only: bool = False) -> int:
    """Total parameters; with active_only, those one token passes through (top_k of the routed experts)."""
    layers = sum(layer_params(cfg, i, active_only) for i in range(cfg.n_layers))
    return embedding_params(cfg) + layers + cfg.d_model + output_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N_matmul + attention score and value products.

    N_matmul is every activated parameter but the embedding lookup (a tied embedding still counts once, as the
    output head); norm weights are included, a rounding error. The attention term counts the full (non-causal) QK^T and AV
    products, 6 * seq * n_heads * (qk_dim + v_dim) per layer, the convention of PaLM, Megatron and torchtitan.
    """
    matmul_params = num_params(cfg, active_only=True)
    if not cfg.tie_embeddings:
        matmul_params -= embedding_params(cfg)
    attention = 6 * cfg.n_layers * seq_len * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim)
    return 6.0 * matmul_params + attention
