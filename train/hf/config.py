"""A Hugging Face `config.json` as our ModelConfig, and back.

Only what changes the function the model computes is mapped; an architecture feature we do not implement (biases
on projections, sliding windows, MoE layers other than a dense prefix) stops the import in one line rather than
loading a model that computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from configs.errors import CheckpointError
from configs.schema import (
    Activation, AttentionKind, ModelConfig, MoEConfig, RopeScaling, RopeScalingKind, ScoreFn,
)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: point checkpoint.init_from_hf at a Hugging Face model "
                              f"folder (config.json, *.safetensors and model.safetensors.index.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error})") from None
    if config.get("model_type") not in ARCHITECTURES:
        raise CheckpointError(f"{path}: model_type={config.get('model_type')!r} is not one we import; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    return config


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in ("default", None):
        return theta, RopeScaling()
    if kind not in ("llama3", "yarn"):
        raise CheckpointError(f"config.json rope scaling type {kind!r} is not supported (llama3 and yarn are)")
    original = int(merged.get("original_max_position_embeddings") or 0)
    scaling = RopeScaling(kind=RopeScalingKind(kind), factor=float(merged.get("factor", 1.0)),
                          original_max_seq_len=original)
    if kind == "llama3":
        scaling.low_freq_factor = float(merged.get("low_freq_factor", 1.0))
        scaling.high_freq_factor = float(merged.get("high_freq_factor", 4.0))
    else:
        if merged.get("attention_factor") is not None or merged.get("truncate", True) is not True:
            raise CheckpointError("config.json yarn rope scaling with attention_factor or truncate=false is not "
                                  "supported")
        scaling.beta_fast = float(merged.get("beta_fast") or 32.0)
        scaling.beta_slow = float(merged.get("beta_slow") or 1.0)
        scaling.mscale = float(merged.get("mscale") or 0.0)
        scaling.mscale_all_dim = float(merged.get("mscale_all_dim") or 0.0)
    return theta, scaling


def _refuse(config: dict[str, Any], key: str, allowed: Any, why: str) -> None:
    value = config.get(key, allowed)
    if value not in (allowed, None) or (isinstance(allowed, bool) and bool(value) != allowed):
        raise CheckpointError(f"config.json {key}={value!r}: {why} is not supported")


def model_config_from_hf(config: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (already read)."""
    kind = config["model_type"]
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act={config.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    _refuse(config, "attention_bias", False, "a bias on the attention projections")
    _refuse(config, "mlp_bias", False, "a bias on the MLP projections")
    _refuse(config, "use_sliding_window", False, "sliding-window attention")
    theta, scaling = _rope(config)
    fields: dict[str, Any] = dict(
        name=name, n_layers=config["num_hidden_layers"], d_model=config["hidden_size"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_hidden=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_seq_len=int(config.get("max_position_embeddings") or 4096), rope_theta=theta,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(config.get("tie_word_embeddings")),
        activation=Activation.swiglu, rope_scaling=scaling,
    )
    if kind in ("llama", "qwen3", "qwen3_moe", "mixtral") and config.get("head_dim"):
        fields["head_dim"] = config["head_dim"]
    if kind in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = True
    if kind == "qwen3_moe":
        sparse_step = config.get("decoder_sparse_step", 1)
        dense = sorted(config.get("mlp_only_layers") or [])
        if sparse_step != 1 or dense != list(range(len(dense))):
            raise CheckpointError(f"config.json decoder_sparse_step={sparse_step}, mlp_only_layers={dense}: only a "
                                  f"dense prefix of layers before the MoE layers is supported")
        fields.update(n_routed_experts=config.get("num_experts") or config["num_local_experts"],
                      top_k=config["num_experts_per_tok"], moe_ffn_hidden=config["moe_intermediate_size"],
                      n_dense_layers=len(dense),
                      moe=MoEConfig(score_fn=ScoreFn.softmax, route_norm=bool(config.get("norm_topk_prob")),
                                    bias_update_rate=0.0))
    if kind == "mixtral":
        fields.update(n_routed_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                      moe_ffn_hidden=config["intermediate_size"],
                      moe=MoEConfig(score_fn=ScoreFn.softmax, route_norm=True, bias_update_rate=0.0))
    if kind == "deepseek_v3":
        if config.get("rope_interleave") is False:
            raise CheckpointError("config.json rope_interleave=false: DeepSeek checkpoints with half-split rotary "
                                  "weights are not supported")
        if config.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"config.json scoring_func={config.get('scoring_func')!r}: only sigmoid is supported")
        fields.update(
            attention=AttentionKind.mla, q_lora_rank=config.get("q_lora_rank") or 0,
            kv_lora_rank=config["kv_lora_rank"], qk_rope_head_dim=config["qk_rope_head_dim"],
            qk_nope_head_dim=config["qk_nope_head_dim"], v_head_dim=config["v_head_dim"],
            n_routed_experts=config["n_routed_experts"], n_shared_experts=config.get("n_shared_experts") or 0,
            top_k=config["num_experts_per_tok"], moe_ffn_hidden=config["moe_intermediate_size"],
            n_dense_layers=config.get("first_k_dense_replace", 0),
            moe=MoEConfig(score_fn=ScoreFn.sigmoid, route_norm=bool(config.get("norm_topk_prob")),
                          route_scale=float(config.get("routed_scaling_factor", 1.0)),
                          n_expert_groups=config.get("n_group") or 1, n_limited_groups=config.get("topk_group") or 1),
        )
    return ModelConfig(**fields)


# Fields that decide the function the model computes, and so must agree between the run and the checkpoint.
_COMPARED = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "norm_eps", "rope_theta",
             "tie_embeddings", "qk_norm", "attention", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
             "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "top_k", "moe_ffn_hidden",
             "n_dense_layers", "activation")
_COMPARED_MOE = ("score_fn", "route_norm", "route_scale", "n_expert_groups", "n_limited_groups")
_COMPARED_ROPE = ("kind", "factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor", "beta_fast",
                  "beta_slow", "mscale", "mscale_all_dim")


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


def config_mismatch(run: ModelConfig, checkpoint: ModelConfig) -> Optional[tuple[str, Any, Any]]:
    """The first field (model.<path>, the run's value, the checkpoint's) on which the two disagree, or None."""
    pairs = [(f"model.{key}", getattr(run, key), getattr(checkpoint, key)) for key in _COMPARED]
    if not run.is_moe or run.n_dense_layers:
        pairs.append(("model.ffn_hidden", run.ffn_hidden, checkpoint.ffn_hidden))
    if run.is_moe:
        pairs += [(f"model.moe.{key}", getattr(run.moe, key), getattr(checkpoint.moe, key)) for key in _COMPARED_MOE]
    rope_kind = run.rope_scaling.kind
    for key in _COMPARED_ROPE:
        if key == "kind" or rope_kind != RopeScalingKind.none:
            pairs.append((f"model.rope_scaling.{key}", getattr(run.rope_scaling, key),
                          getattr(checkpoint.rope_scaling, key)))
    for path, ours, theirs in pairs:
        ours, theirs = _plain(ours), _plain(theirs)
        if isinstance(ours, float) or isinstance(theirs, float):
            if abs(float(ours) - float(theirs)) > 1e-9 * max(1.0, abs(float(theirs))):
                return path, ours, theirs
        elif ours != theirs:
            return path, ours, theirs
    return None


def architecture_of(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that computes what this model computes."""
    if cfg.attention == AttentionKind.mla:
        return "deepseek_v3"
    if cfg.qk_norm:
        return "qwen3_moe" if cfg.is_moe else "qwen3"
    if cfg.is_moe:
        if cfg.n_shared_experts or cfg.n_dense_layers or cfg.moe.score_fn != ScoreFn.softmax or not cfg.moe.route_norm \
                or cfg.moe.route_scale != 1.0 or cfg.moe.n_expert_groups != 1:
            raise CheckpointError(f"model {cfg.name}: no Hugging Face architecture computes this MoE (shared experts, "
                                  f"dense layers or sigmoid routing without MLA): export needs qwen3_moe, mixtral "
                                  f"or deepseek_v3 routing")
        return "mixtral"
    return "llama"


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """A config.json that transformers reads into a model computing what `cfg` computes."""
    if cfg.activation != Activation.swiglu:
        raise CheckpointError(f"model.activation={cfg.activation.value}: only SwiGLU models export to Hugging Face")
    kind = architecture_of(cfg)
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s.kind == RopeScalingKind.llama3:
        rope.update(rope_type="llama3", factor=s.factor, original_max_position_embeddings=s.original_max_seq_len,
                    low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    elif s.kind == RopeScalingKind.yarn:
        rope.update(rope_type="yarn", factor=s.factor, original_max_position_embeddings=s.original_max_seq_len,
                    beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_hidden, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta, "dtype": dtype, "torch_dtype": dtype,
    }
    if s.kind != RopeScalingKind.none:
        out["rope_scaling"] = dict(rope, type=rope["rope_type"])
    if kind != "deepseek_v3":
        out["head_dim"] = cfg.head_dim
    if kind == "qwen3_moe":
        out.update(num_experts=cfg.n_routed_experts, num_local_experts=cfg.n_routed_experts,
                   num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_ffn_hidden,
                   norm_topk_prob=cfg.moe.route_norm, decoder_sparse_step=1,
                   mlp_only_layers=list(range(cfg.n_dense_layers)))
    if kind == "mixtral":
        out.update(num_local_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
                   intermediate_size=cfg.moe_ffn_hidden)
    if kind == "deepseek_v3":
        out.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim, rope_interleave=True,
                   n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                   num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.moe_ffn_hidden,
                   first_k_dense_replace=cfg.n_dense_layers, n_group=cfg.moe.n_expert_groups,
                   topk_group=cfg.moe.n_limited_groups, routed_scaling_factor=cfg.moe.route_scale,
                   norm_topk_prob=cfg.moe.route_norm, scoring_func="sigmoid", topk_method="noaux_tc",
                   num_nextn_predict_layers=0)
        if not cfg.is_moe:
            raise CheckpointError(f"model {cfg.name}: an MLA model without experts has no Hugging Face architecture")
    return out


def adopt_hf_shapes(model: ModelConfig, folder: Path) -> ModelConfig:
    """`model=from_hf`: every field that decides the function (shapes, rotary settings, routing) from the folder's
    config.json; what only training uses (init_std, the MoE balancing rates, capacity) stays as configured."""
    import dataclasses

    theirs = model_config_from_hf(read_hf_config(folder), name=f"hf:{folder.name}")
    shapes = {key: getattr(theirs, key) for key in (*_COMPARED, "ffn_hidden", "max_seq_len", "rope_scaling")}
    routing = dataclasses.replace(model.moe, **{key: getattr(theirs.moe, key) for key in _COMPARED_MOE})
    return dataclasses.replace(model, name=theirs.name, moe=routing, **shapes)
