"""A decoder-only transformer in plain PyTorch: Llama-style dense layers, optionally DeepSeek-style MoE layers.

No parallel code lives here. Layers sit in a ModuleDict keyed by their index so that parameter names stay the same
when a pipeline stage keeps only some of them, and the embedding, final norm and output head may be None on
stages that do not own them. Build on the meta device, parallelize, then allocate and initialize with
parallel/materialize.py, which has each process draw its own block of each parameter (`initialize_block_`).
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
from torch import nn

from configs.schema import ModelConfig
from models.attention import build_attention
from models.counter_rng import fill_normal_, stream_key
from models.feed_forward import FeedForward
from models.moe import MoE
from models.kernels import ReferenceKernels
from models.layers import Linear, RMSNorm, UsesKernels, use_kernels


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, aux_loss_scale: float = 1.0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.feed_forward: nn.Module = MoE(cfg, aux_loss_scale)
        else:
            self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.activation)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        # As keywords: tensor parallelism's input preparation counts positional inputs.
        h = x + self.attention(self.attention_norm(x), positions=positions, documents=documents)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(UsesKernels, nn.Module):
    """`aux_loss_scale`: what the training loop multiplies one forward's loss by before backward (1 / micro-batches
    when it averages them first; 1 when gradients are divided afterwards); MoE blocks scale the gradient of their
    auxiliary balance loss by it, so that loss enters training as if it were added to the main loss."""

    def __init__(self, cfg: ModelConfig, aux_loss_scale: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, aux_loss_scale) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output: Optional[Linear] = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                documents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab). A stage without the embedding takes hidden
        states (batch, seq, d_model) instead; one without the output head returns hidden states.

        `positions` (batch, seq) int64: each token's rotary position, when not 0, 1, 2, ... (this rank's chunks
        under context parallelism, or positions restarting at each packed document); `documents` (batch, seq): the
        document each token belongs to, which limits attention to it. Attention then follows
        models/visibility.py's rule."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, positions, documents)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", aux_loss_scale: float = 1.0,
                kernels: Optional[ReferenceKernels] = None) -> Transformer:
    """Build the model on `device`; on meta (the default) no memory is allocated until it is materialized. `kernels`:
    the backend its layers run (models/kernels/: `kernels_for(device kind)`); the reference ops when not given."""
    with torch.device(device):
        model = Transformer(cfg, aux_loss_scale)
    if kernels is not None:
        use_kernels(model, kernels)
    return model


# ---- initial values ------------------------------------------------------------------------------------------


def _init_std(name: str, cfg: ModelConfig) -> Optional[float]:
    """Standard deviation for a weight, or None for norm scales (initialized to one)."""
    if "norm" in name:
        return None
    # Projections that write into the residual stream are scaled down with depth (GPT-2 / Megatron practice).
    if name.endswith(("wo.weight", "w2.weight", "w2")):
        return cfg.init_std / (2 * cfg.n_layers) ** 0.5
    return cfg.init_std


@torch.no_grad()
def initialize_block_(out: torch.Tensor, name: str, full_shape: Sequence[int], offset: Sequence[int],
                      cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Give `out` its starting values: the block at `offset` of the parameter called `name` (as in a plain
    `Transformer`, no wrapper prefixes) whose whole shape is `full_shape`. Each element's value depends only on
    (seed, name, its place in the whole tensor) (models/counter_rng.py), so any shard drawn on any device equals the
    same elements of a single-device model, and no process builds more than its own block."""
    std = _init_std(name, cfg)
    if std is None:
        return out.fill_(1.0)
    fill_normal_(out, stream_key(seed, zlib.crc32(name.encode())), full_shape, offset)
    return out.mul_(std)
