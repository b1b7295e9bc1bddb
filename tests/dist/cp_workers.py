"""Rank functions for the context-parallel tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def attention_against_one_process(impl: str, q_heads: int, kv_heads: int, v_dim: int, documents: bool,
                                  seq: int = 32, score_budget: int = 0) -> dict[str, float]:
    """Every rank draws the same whole q, k, v; attention over the whole sequence in one process is the reference;
    each rank runs its chunks through the context-parallel kernels. Returns the largest differences of the
    outputs and of the q, k, v gradients (this rank's positions). `score_budget`: the ring's scores per query chunk
    (0: its default), small to make it cut every block into chunks of a few rows."""
    from models.kernels import REFERENCE
    from parallel import context
    from models.visibility import Visibility
    from parallel.context import BatchSplit, ContextParallelKernels, document_positions

    if score_budget:
        context.SCORE_BUDGET = score_budget
    cp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    batch, dim = 2, 16
    q = torch.randn(batch, seq, q_heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, v_dim, generator=g, dtype=torch.float64)
    grad_out = torch.randn(batch, seq, q_heads, v_dim, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 5, (batch, seq), generator=g)  # id 0 ends a document now and then
    eos = 0 if documents else None

    positions: torch.Tensor = torch.arange(seq).expand(batch, seq)
    docs: Optional[torch.Tensor] = None
    if documents:
        positions, docs = document_positions(tokens, 0)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = REFERENCE.masked_attention(*whole, Visibility.local(positions, docs))
    expected.backward(grad_out)

    split = BatchSplit(cp, rank, eos)
    local_tokens, order_tokens, extra = split(tokens, torch.arange(seq).expand(batch, seq))
    order = order_tokens[0]
    mine = [t[:, order].clone().requires_grad_() for t in (q, k, v)]
    kernels = ContextParallelKernels(REFERENCE, dist.group.WORLD, impl)
    out = kernels.masked_attention(*mine, Visibility.local(extra["positions"], extra.get("documents")))
    out.backward(grad_out[:, order])
    diffs = {"out": (out - expected[:, order]).abs().max().item()}
    for name, local, ref in zip("qkv", mine, whole):
        diffs[name] = (local.grad - ref.grad[:, order]).abs().max().item()
    diffs["docs"] = int(docs.max().item()) if docs is not None else 0
    return diffs


def write_packed_corpus(folder: str, tokens: int = 400_000, seed: int = 0) -> str:
    """Memmap shards of random bytes cut into documents of 4 to 40 tokens, each ended by the byte tokenizer's
    end-of-document id: a 32-token training sequence holds several of them."""
    import numpy as np

    from train.data import ByteTokenizer, write_shards

    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, tokens, dtype=np.uint16)
    ends = np.cumsum(rng.integers(4, 41, tokens // 4))
    stream[ends[ends < tokens]] = ByteTokenizer.eos_id
    return str(write_shards(stream, folder, ByteTokenizer(), shard_tokens=tokens))
