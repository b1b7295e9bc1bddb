"""Attention blocks: grouped-query attention (Llama) and, for DeepSeek-style models, multi-head latent attention.

Head counts are read from the projection outputs (`view(..., -1, head_dim)`), never from the config, so the same
module runs whole or with its heads split across tensor-parallel ranks. Rotary tables are computed here from the
length of the sequence the attention actually sees: under sequence parallelism the block's input is a sequence
shard, but attention runs on the gathered whole.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from configs.schema import AttentionKind, ModelConfig
from models.mla import MultiHeadLatentAttention
from models.layers import Linear, RMSNorm, UsesKernels
from models.ops import rope_tables
from models.visibility import rotary_and_mask


class GroupedQueryAttention(UsesKernels, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        self.wq = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Qwen3: each head's query and key normalised (one weight shared by all heads) before the rotation.
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (batch, seq, d_model), the whole sequence (sequence parallelism gathers it before attention), or this
        rank's chunks of it (context parallelism); `positions` / `documents` (batch, seq): see `rotary_and_mask`."""
        batch, seq, _ = x.shape
        q, k, v = (t.view(batch, seq, -1, self.head_dim) for t in self.kernels.project(x, (self.wq, self.wk, self.wv)))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is None:
            rope = rope_tables(seq, self.head_dim, self.rope_theta, x.device, self.rope_scaling)
            return self.wo(self.kernels.causal_attention(q, k, v, rope).reshape(batch, seq, -1))
        rope, visible = rotary_and_mask(positions, documents, self.head_dim, self.rope_theta, self.rope_scaling)
        q, k = self.kernels.apply_rope(q, *rope), self.kernels.apply_rope(k, *rope)
        return self.wo(self.kernels.masked_attention(q, k, v, visible).reshape(batch, seq, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == AttentionKind.mla:
        return MultiHeadLatentAttention(cfg)
    return GroupedQueryAttention(cfg)
