"""A decoder-only transformer in plain PyTorch: Llama-style dense layers, optionally DeepSeek-style MoE layers.

No parallel code lives here. Layers sit in a ModuleDict keyed by their index so that parameter names stay the same
when a pipeline stage keeps only some of them, and the embedding, final norm and output head may be None on
stages that do not own them. Build on the meta device, parallelize, then materialize with `materialize`.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from models.attention import build_attention
from models.config import Activation, ModelConfig
from models.ops import Linear, RMSNorm, swiglu


class FeedForward(nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x)) or GELU (w2(gelu(w1 x))) MLP."""

    def __init__(self, d_model: int, hidden: int, activation: Activation) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = Linear(d_model, hidden, bias=False)
        self.w2 = Linear(hidden, d_model, bias=False)
        self.w3 = Linear(d_model, hidden, bias=False) if activation == Activation.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(nn.functional.gelu(self.w1(x), approximate="tanh"))
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            from models.moe import MoE

            self.feed_forward: nn.Module = MoE(cfg)
        else:
            self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output: Optional[Linear] = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab). A stage without the embedding takes hidden
        states (batch, seq, d_model) instead; one without the output head returns hidden states."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Build the model on `device`; on meta (the default) no memory is allocated until `materialize`."""
    with torch.device(device):
        return Transformer(cfg)


# ---- initialization ----------------------------------------------------------------------------------------

# Wrappers added by activation checkpointing, torch.compile and DDP; stripped so names (and so init seeds) do not
# depend on which of them were applied.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name[len("module."):] if name.startswith("module.") else name


def _init_std(name: str, cfg: ModelConfig) -> Optional[float]:
    """Standard deviation for a weight, or None for norm scales (initialized to one)."""
    if "norm" in name:
        return None
    # Projections that write into the residual stream are scaled down with depth (GPT-2 / Megatron practice).
    if name.endswith(("wo.weight", "w2.weight", "w2")):
        return cfg.init_std / (2 * cfg.n_layers) ** 0.5
    return cfg.init_std


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _local_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of `full` that this rank holds when `param` is a sharded DTensor; all of it otherwise."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


@torch.no_grad()
def initialize_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Seeded init that gives every parameter the same values whatever the layout.

    Each parameter draws from its own generator, seeded by (seed, canonical name), at its full shape; a sharded
    rank keeps only its slice. So tp=4 or pp=2 or fsdp start from exactly the single-device weights.
    """
    for name, param in model.named_parameters():
        name = canonical_name(name)
        std = _init_std(name, cfg)
        if std is None:
            full = torch.ones(param.shape)
        else:
            generator = torch.Generator().manual_seed(_seed_for(seed, name))
            full = torch.empty(param.shape).normal_(0.0, std, generator=generator)
        local = param.to_local() if hasattr(param, "to_local") else param
        local.copy_(_local_slice(full, param))
    for buffer in model.buffers():
        local = buffer.to_local() if hasattr(buffer, "to_local") else buffer
        local.zero_()


def materialize(model: Transformer, cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """Allocate a meta-device (possibly already parallelized) model on `device` and initialize it."""
    model.to_empty(device=device)
    if cfg.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight
    initialize_weights(model, cfg, seed)
    return model
