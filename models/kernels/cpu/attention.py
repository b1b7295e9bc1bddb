"""Causal attention for fp32 on CPU, in query blocks that skip the masked half of the score matrix.

Where the C++ kernels are built (models/kernels/cpu/native.py) the same scheme runs there, fused and on oneDNN's matmuls;
this Python version is the fallback, and the place where the range and the memory it keeps are defined.

ATen's CPU flash-attention kernel works in small tiles and its backward recomputes the probabilities; on this
project's CPU benchmark (head width 64) it ran at about 55 GFLOP/s of useful work against a matmul rate of ~190.
Here each block of 64 queries is one batched matmul against the keys it may see (none after its own block), so
512 positions cost 36/64 of the full square, and the probabilities are kept for the backward pass instead of
recomputed. Measured forward + backward on 2 cores (median of 10, blocks of 128 then), (batch, seq, heads,
head_dim): (8, 512, 8, 64) 115 -> 84 ms, (8, 512, 4, 128) 96 -> 75 ms, (4, 1024, 4, 128) 134 -> 117 ms; at 2048
positions the gain is 3% and at 256 ATen's kernel is faster, so only 512-1024 positions come here. Blocks of 64
took 3-4% less time than 128 here and 4-7% less in the C++ kernel at 512 positions (the same at 1024; paired
runs), and keep 36/64 of the square's probabilities instead of 40/64.

Keeping the probabilities costs about seq/2 floats per query and head (144 MB per layer at batch 8, 8 heads,
1024 positions), which is the other reason longer sequences stay with the flash kernel, which keeps none.
"""

from __future__ import annotations

import math

import torch

QUERY_BLOCK = 64
MIN_POSITIONS = 512
MAX_POSITIONS = 1024


def blocked_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `blocked_causal_attention` should run for these (batch, seq, heads, dim) operands.

    Plain fp32 CPU tensors only: a DTensor keeps SDPA, which knows how to shard; under autocast the matmuls here
    would drop to bf16 while SDPA keeps its softmax in fp32. The test is written so that torch.compile can
    evaluate it while tracing (types, devices, dtypes and shapes are known then); `models.ops.causal_attention`
    then runs the kernel outside the compiled graph.
    """
    operands = (q, k, v)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype != torch.float32 for t in operands):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return covers_sequence(q.shape[1])


def covers_sequence(seq: int) -> bool:
    """Whether sequences of this length take the blocked kernel (given fp32 CPU operands)."""
    return MIN_POSITIONS <= seq <= MAX_POSITIONS


def saved_probabilities_per_query(seq: int) -> float:
    """Probabilities the kernel keeps for backward, per query position and head (about seq / 2)."""
    return sum((end - start) * end for start, end in _query_blocks(seq)) / seq


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(qk_dim)) v on (batch, seq, heads, dim) tensors with equal head counts.

    v may be narrower than q and k (multi-head latent attention). Returns (batch, seq, heads, v_dim).
    """
    return _BlockedCausalAttention.apply(q, k, v)


def _to_batched_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, dim) -> contiguous (batch * heads, seq, dim), the layout batched matmuls take."""
    batch, seq, heads, dim = x.shape
    return x.transpose(1, 2).reshape(batch * heads, seq, dim)


def _from_batched_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * heads, seq, dim) -> (batch, seq, heads, dim) as a view."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


def _query_blocks(seq: int) -> list[tuple[int, int]]:
    return [(start, min(seq, start + QUERY_BLOCK)) for start in range(0, seq, QUERY_BLOCK)]


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, seq = q.shape[:2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        # The scale is folded into q once, so no pass over any score block is spent on it.
        q_scaled = _to_batched_heads(q * scale)
        k_heads, v_heads = _to_batched_heads(k), _to_batched_heads(v)
        probabilities, outputs = [], []
        no_bias = q_scaled.new_zeros(())
        future = torch.ones(QUERY_BLOCK, QUERY_BLOCK, dtype=torch.bool, device=q.device).triu_(1)
        for start, end in _query_blocks(seq):
            # baddbmm rather than bmm: op-level selective recompute (parallel/recompute.py) keeps every bmm output,
            # and these seq x seq scores are cheaper to recompute than to keep, as in a flash kernel.
            scores = torch.baddbmm(no_bias, q_scaled[:, start:end], k_heads[:, :end].transpose(1, 2), beta=0)
            scores[:, :, start:end].masked_fill_(future[: end - start, : end - start], float("-inf"))
            block_probabilities = torch.softmax(scores, dim=-1)
            outputs.append(torch.bmm(block_probabilities, v_heads[:, :end]))
            probabilities.append(block_probabilities)
        out = torch.cat(outputs, dim=1)
        ctx.save_for_backward(q_scaled, k_heads, v_heads, out, *probabilities)
        ctx.batch, ctx.scale = batch, scale
        return _from_batched_heads(out, batch)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q_scaled, k_heads, v_heads, out, *probabilities = ctx.saved_tensors
        grad_out = _to_batched_heads(grad_out)
        # softmax backward: dS = P * (dP - rowsum(dO * O)); the row sums are shared by every key block.
        row_terms = (grad_out * out).sum(dim=-1, keepdim=True)
        grad_k = torch.zeros_like(k_heads)
        grad_v = torch.zeros_like(v_heads)
        grad_q_blocks = []
        for (start, end), block_probabilities in zip(_query_blocks(out.shape[1]), probabilities):
            grad_out_block = grad_out[:, start:end]
            grad_v[:, :end] += torch.bmm(block_probabilities.transpose(1, 2), grad_out_block)
            grad_scores = torch.bmm(grad_out_block, v_heads[:, :end].transpose(1, 2))
            grad_scores.sub_(row_terms[:, start:end]).mul_(block_probabilities)
            grad_q_blocks.append(torch.bmm(grad_scores, k_heads[:, :end]))
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q_scaled[:, start:end])
        grad_q = torch.cat(grad_q_blocks, dim=1).mul_(ctx.scale)
        batch = ctx.batch
        return (
            _from_batched_heads(grad_q, batch),
            _from_batched_heads(grad_k, batch),
            _from_batched_heads(grad_v, batch),
        )
