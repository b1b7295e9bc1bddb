"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434 s2.1): queries and keys/values pass through
low-rank latents, and every head shares one rotary key.

Parameters, and how tensor parallelism splits them (heads are read from projection outputs, `view(..., -1, dim)`,
so a column-split projection simply yields fewer local heads):

    wq     (d_model -> heads * qk_head_dim)          full-rank query, when q_lora_rank = 0     colwise
    wq_a   (d_model -> q_lora_rank)                   query down-projection                     replicate
    q_norm (q_lora_rank)                              RMSNorm on the query latent               replicate
    wq_b   (q_lora_rank -> heads * qk_head_dim)       query up-projection                       colwise
    wkv_a  (d_model -> kv_lora_rank)                  kv latent                                 replicate
    wk_rope (d_model -> qk_rope_head_dim)             the rotary key all heads share            replicate, grad summed
    kv_norm (kv_lora_rank)                            RMSNorm on the kv latent                  replicate
    wkv_b  (kv_lora_rank -> heads * (qk_nope_head_dim + v_head_dim))  per-head keys and values  colwise
    wo     (heads * v_head_dim -> d_model)            output projection                         rowwise

qk_head_dim = qk_nope_head_dim + qk_rope_head_dim; each head's query and key are [no-rope part, rotary part].
DeepSeek stores the latent and the rotary key as one projection; here they are two, because tensor parallelism
treats them differently: a rank uses the whole latent (its gradient comes back whole through wkv_b) but the shared
rotary key only for its own heads, so that key's gradient must be summed over the tp ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from configs.schema import ModelConfig
from models.layers import Linear, RMSNorm, UsesKernels
from models.ops import rope_tables
from models.rope import softmax_scale_gain
from models.visibility import rotary_and_mask


def _normalize(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in its weight's dtype: under autocast a latent arrives in bf16 from a Linear while the norm weight is
    fp32, and mixing them falls off the fused kernel (with a warning) for no gain in precision."""
    return norm(x.to(norm.weight.dtype))


class MultiHeadLatentAttention(UsesKernels, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        # YaRN's mscale_all_dim raises every score, rotary or not (DeepSeek-V3); 1 without scaling.
        self.score_gain = softmax_scale_gain(cfg.rope_scaling)
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.low_rank_query = cfg.q_lora_rank > 0
        if self.low_rank_query:
            self.wq_a = Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = Linear(cfg.d_model, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = Linear(cfg.d_model, cfg.kv_lora_rank, bias=False)
        self.wk_rope = Linear(cfg.d_model, cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.d_model, bias=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank_query:
            return self.wq_b(_normalize(self.q_norm, self.wq_a(x)))
        return self.wq(x)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (batch, seq, d_model), the whole sequence (sequence parallelism gathers it before attention), or this
        rank's chunks of it; `positions` / `documents` as in models/attention.py."""
        batch, seq, _ = x.shape
        visible = None
        if positions is None:
            rope = rope_tables(seq, self.rope_dim, self.rope_theta, x.device, self.rope_scaling)
        else:
            rope, visible = rotary_and_mask(positions, documents, self.rope_dim, self.rope_theta, self.rope_scaling)
        q = self._query(x).view(batch, seq, -1, self.nope_dim + self.rope_dim)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat([q_nope, self.kernels.apply_rope(q_rot, *rope)], dim=-1)
        if self.score_gain != 1.0:
            q = q * self.score_gain  # the attention kernels scale by 1/sqrt(qk_head_dim) only

        kv = self.wkv_b(_normalize(self.kv_norm, self.wkv_a(x))).view(batch, seq, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # One rotary key for all heads: rotate once, then broadcast to this rank's heads.
        k_rot = self.kernels.apply_rope(self.wk_rope(x).unsqueeze(2), *rope).expand(-1, -1, kv.shape[2], -1)
        k = torch.cat([k_nope, k_rot], dim=-1)

        # SDPA takes a value width different from the query/key width, and scales scores by 1/sqrt(qk_head_dim).
        if visible is not None:
            return self.wo(self.kernels.masked_attention(q, k, v, visible).reshape(batch, seq, -1))
        return self.wo(self.kernels.causal_attention(q, k, v).reshape(batch, seq, -1))
