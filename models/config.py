"""Model shapes, parameter counts and training FLOPs.

One `ModelConfig` describes every model we build: dense Llama-style (GQA, SwiGLU or GELU), DeepSeek-style MoE
(shared + routed experts) and multi-head latent attention (MLA). The counting functions are pure arithmetic on the
config, so the planner can use them for models far too large to build.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line naming the value and the fix."""


class Activation(str, Enum):
    swiglu = "swiglu"
    gelu = "gelu"


class AttentionKind(str, Enum):
    gqa = "gqa"
    mla = "mla"


class ScoreFn(str, Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


@dataclass
class MoEConfig:
    """Routing behaviour of the MoE layers (shapes live in ModelConfig)."""

    score_fn: ScoreFn = ScoreFn.softmax
    # Renormalise the top-k scores so they sum to one (DeepSeek-V3 does, with sigmoid scores).
    route_norm: bool = True
    # Scale applied to the combined routed output (DeepSeek-V3 uses 2.5).
    route_scale: float = 1.0
    # Auxiliary-loss-free balancing: the per-expert bias moves by this much per step towards even load.
    bias_update_rate: float = 0.001
    # Weight of the optional sequence-wise auxiliary balancing loss (0 = off).
    aux_loss_coef: float = 0.0
    # Tokens an expert may take, as a multiple of the even share; 0 = unlimited (no dropping).
    capacity_factor: float = 0.0
    # Group-limited routing (DeepSeek-V3: 8 groups, 4 kept): experts form n_expert_groups equal groups and a token
    # picks its top_k only among the n_limited_groups groups whose two best experts score highest. 1, 1 = off.
    n_expert_groups: int = 1
    n_limited_groups: int = 1

    def __post_init__(self) -> None:
        if self.bias_update_rate < 0:
            raise ConfigError(f"model.moe.bias_update_rate={self.bias_update_rate} must be >= 0")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"model.moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if self.capacity_factor < 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be >= 0 (0 = no dropping)")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ConfigError(
                f"model.moe.n_limited_groups={self.n_limited_groups} must lie in [1, n_expert_groups="
                f"{self.n_expert_groups}]"
            )


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer. Field names follow Llama / DeepSeek usage."""

    name: str = "custom"
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention).
    n_kv_heads: Optional[int] = None
    ffn_hidden: int = 768
    vocab_size: int = 512
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Per-head width; None means d_model // n_heads.
    head_dim: Optional[int] = None
    activation: Activation = Activation.swiglu
    init_std: float = 0.02

    # Multi-head latent attention (DeepSeek-V2/V3). Used when attention=mla.
    attention: AttentionKind = AttentionKind.gqa
    q_lora_rank: int = 0  # 0 = full-rank query projection
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    # Mixture of experts. n_routed_experts=0 means every layer is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    # The first n_dense_layers layers use the dense MLP (ffn_hidden) even in an MoE model.
    n_dense_layers: int = 0
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be > 0 and divide n_heads={self.n_heads}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide d_model={self.d_model}: set model.head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.attention == AttentionKind.gqa and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention == AttentionKind.mla:
            for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"model.attention=mla needs model.{key} > 0 (got {getattr(self, key)})")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.n_routed_experts:
            if self.top_k <= 0 or self.moe_ffn_hidden <= 0:
                raise ConfigError(
                    f"an MoE model (n_routed_experts={self.n_routed_experts}) needs model.top_k > 0 and "
                    f"model.moe_ffn_hidden > 0 (got top_k={self.top_k}, moe_ffn_hidden={self.moe_ffn_hidden})"
                )
            if self.top_k > self.n_routed_experts:
                raise ConfigError(
                    f"model.top_k={self.top_k} exceeds n_routed_experts={self.n_routed_experts}: "
                    f"lower top_k or add experts"
                )
            if not 0 <= self.n_dense_layers <= self.n_layers:
                raise ConfigError(
                    f"model.n_dense_layers={self.n_dense_layers} must lie in [0, n_layers={self.n_layers}]"
                )
            if self.n_shared_experts < 0:
                raise ConfigError(f"model.n_shared_experts={self.n_shared_experts} must be >= 0")
            groups = self.moe.n_expert_groups
            if self.n_routed_experts % groups:
                raise ConfigError(
                    f"model.moe.n_expert_groups={groups} must divide n_routed_experts={self.n_routed_experts}"
                )
            reachable = self.moe.n_limited_groups * self.n_routed_experts // groups
            if self.top_k > reachable:
                raise ConfigError(
                    f"model.top_k={self.top_k} exceeds the {reachable} experts in model.moe.n_limited_groups="
                    f"{self.moe.n_limited_groups} of {groups} groups: keep more groups or lower top_k"
                )

    # ---- derived shapes -------------------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.is_moe and layer_id >= self.n_dense_layers

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key dot product."""
        if self.attention == AttentionKind.mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == AttentionKind.mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Width of the part of each head that carries rotary position."""
        return self.qk_rope_head_dim if self.attention == AttentionKind.mla else self.head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.is_moe else 0


# ---- parameter counts ---------------------------------------------------------------------------------------


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
    return d * h * hd + 2 * d * cfg.n_kv_heads * hd + h * hd * d


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
