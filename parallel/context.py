"""Context parallelism: each of `cp` ranks holds a share of every sequence, and attention, the one layer that mixes
positions, reaches the other ranks' keys and values. Everything else (embeddings, norms, MLPs, experts, the loss)
is per token and runs on the local share as it is.

Which tokens a rank holds (load balancing). The sequence is cut into 2 cp chunks and rank r holds chunks r and
2 cp - 1 - r: under a causal mask an early chunk sees few keys and a late one many, so every rank gets the same
amount of attention work (the zig-zag split of ring-attention implementations and Llama 3).

How attention reaches the other shares (`parallel.cp_impl`), each an autograd-aware exchange over the cp group:

    ring       keys and values travel around the ring in cp - 1 steps, each overlapped with one block of attention;
               partial results merge by their log-sum-exp (online softmax). Backward sends them round again with
               their gradients. Holds one extra block at a time: memory 1/cp, any head count. The block attention
               is PyTorch math (any device), queries cut into chunks so that at most SCORE_BUDGET scores exist at
               once; off the diagonal it computes only the half block the chunks can see.
    allgather  all-gather keys and values (Llama 3's choice), attend with the local queries; backward
               reduce-scatters their gradients. Simple and one collective per layer, but every rank holds the whole
               sequence's keys and values (cheap for grouped-query attention's few kv heads, not for MLA's).
    ulysses    all-to-all from sequence shards to head shards, attention over the whole sequence for heads / cp
               heads (the device's own fused causal kernel, after putting positions back in order), all-to-all back.
               All-to-alls of q, k, v and the output, each way: made for an all-to-all fabric (the Unified Bus, NVLink);
               needs heads per tensor-parallel rank divisible by cp (grouped kv heads are repeated up to cp).

Every rank of a cp group reads the same sequences (they share a data-parallel index); `BatchSplit` takes this
rank's chunks of the inputs, the targets, and the positions (and document ids, for `data.reset_attention_at_eod`,
which works on one rank too), and the model attends by models/visibility.py's rule. The loss is the mean over
local tokens, and every rank holds as many, so averaging over dp x cp ranks (the loss and FSDP's gradient groups
include the cp ranks) gives the global mean.

The models know nothing of this: `apply_context_parallel` gives their attention layers a kernel backend that
wraps the device's own (models/kernels), the seam the model already calls through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from models.visibility import Visibility
from parallel.rules import CP_IMPLS, kv_head_repeat


# ---- which tokens a rank holds ----------------------------------------------------------------------------------


def chunk_order(seq_len: int, cp: int, rank: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The positions rank `rank` of `cp` holds, in its local order: chunk rank, then chunk 2 cp - 1 - rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, last])


def document_positions(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, documents), each like `tokens` (batch, seq): a document ends with its end-of-document token, the
    next token starts the next document at position 0 (the first token of a sequence always does)."""
    seq = tokens.shape[1]
    index = torch.arange(seq, device=tokens.device).expand_as(tokens)
    ends = tokens == eos_id
    starts = torch.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    starts[:, 0] = True
    documents = torch.cumsum(starts.long(), dim=1) - 1
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first, documents


@dataclass(frozen=True)
class BatchSplit:
    """Turns a micro-batch (inputs, targets) into what this rank's model runs: its chunks under context parallelism,
    with the positions (and documents) the model attends by; the batch as it is when neither applies."""

    cp: int = 1
    cp_rank: int = 0
    eos_id: Optional[int] = None  # reset positions and attention at this token (data.reset_attention_at_eod)

    @property
    def active(self) -> bool:
        return self.cp > 1 or self.eos_id is not None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                dict[str, torch.Tensor]]:
        if not self.active:
            return inputs, targets, {}
        batch, seq = inputs.shape
        extra: dict[str, torch.Tensor] = {}
        if self.eos_id is not None:
            extra["positions"], extra["documents"] = document_positions(inputs, self.eos_id)
        else:
            extra["positions"] = torch.arange(seq, device=inputs.device).expand(batch, seq)
        if self.cp > 1:
            mine = chunk_order(seq, self.cp, self.cp_rank, inputs.device)
            inputs, targets = inputs[:, mine], targets[:, mine]
            extra = {name: value[:, mine] for name, value in extra.items()}
        return inputs, targets, {name: value.contiguous() for name, value in extra.items()}


# ---- applying it ------------------------------------------------------------------------------------------------


def apply_context_parallel(model: nn.Module, cp_mesh: Any, impl: str) -> nn.Module:
    """Have every attention layer of `model` reach across the cp ranks of `cp_mesh`, in place."""
    from models.attention import GroupedQueryAttention
    from models.mla import MultiHeadLatentAttention

    if impl not in CP_IMPLS:
        raise ValueError(f"unknown context-parallel implementation {impl!r}")
    group = cp_mesh.get_group()
    for module in model.modules():
        if isinstance(module, (GroupedQueryAttention, MultiHeadLatentAttention)):
            module.kernels = ContextParallelKernels(module.kernels, group, impl)
    return model


class ContextParallelKernels:
    """The device's kernel backend with attention spread over a cp group; every other kernel is the backend's own.

    The model calls `masked_attention` with this rank's queries, keys and values and their positions (BatchSplit
    always hands positions under context parallelism); plain `causal_attention` would mean a caller skipped that.
    """

    def __init__(self, base: Any, group: dist.ProcessGroup, impl: str) -> None:
        self.base = base
        self.group = group
        self.impl = impl
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        raise RuntimeError("context-parallel attention needs each token's position: run the model with the "
                           "positions parallel.context.BatchSplit gives")

    def masked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
        keys = _key_visibility(visible, self.group, self.size)
        if self.impl == "allgather":
            return self.base.masked_attention(q, gather_sequence(k, self.group), gather_sequence(v, self.group),
                                              keys)
        if self.impl == "ulysses":
            return self._ulysses(q, k, v, keys)
        return ring_attention(q, k, v, keys, self.group)

    def _ulysses(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Visibility) -> torch.Tensor:
        repeat = kv_head_repeat(k.shape[2], self.size)
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q, k, v = (sequence_to_heads(t, self.group, self.size) for t in (q, k, v))
        if keys.k_documents is None:
            # One document: put the gathered positions back in order and run the device's own causal kernel.
            order = torch.argsort(keys.k_positions[0])
            q, k, v = (t.index_select(1, order) for t in (q, k, v))
            out = self.base.causal_attention(q, k, v).index_select(1, torch.argsort(order))
        else:
            everyone = Visibility(keys.k_positions, keys.k_positions, keys.k_documents, keys.k_documents)
            out = self.base.masked_attention(q, k, v, everyone)
        return heads_to_sequence(out, self.group, self.size)


# ---- collectives with their gradients ---------------------------------------------------------------------------

# torch 2.13 renamed the tensor-concatenating collectives (*_single) and deprecates the old names, which older
# torch releases (torch_npu's pairs among them) still need.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _key_visibility(visible: Visibility, group: dist.ProcessGroup, size: int) -> Visibility:
    """The local queries' positions (and documents) against every rank's keys, in rank order. With one document per
    sequence the positions are BatchSplit's load-balanced chunks (which `_region` relies on too), known here for
    every rank; document ids come from the data, and are gathered."""
    if visible.q_documents is None:
        batch, length = visible.q_positions.shape
        every = torch.cat([chunk_order(length * size, size, rank, visible.q_positions.device)
                           for rank in range(size)])
        return Visibility(visible.q_positions, every.expand(batch, -1))
    local = torch.stack([visible.q_positions, visible.q_documents]).contiguous()  # (2, batch, len)
    gathered = torch.empty((size * 2, *local.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather(gathered, local, group=group)
    # (2, batch, size * len): rank-major along the sequence
    positions, documents = gathered.view(size, *local.shape).permute(1, 2, 0, 3).flatten(2)
    return Visibility(visible.q_positions, positions, visible.q_documents, documents)


class _GatherSequence(torch.autograd.Function):
    """(batch, len, ...) -> (batch, size * len, ...), rank-major; backward sums the gradient's share of each rank
    (reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        size = dist.get_world_size(group)
        local = x.transpose(0, 1).contiguous()
        out = torch.empty((size * local.shape[0], *local.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, local, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        size = dist.get_world_size(ctx.group)
        whole = grad.transpose(0, 1).contiguous()
        out = torch.empty((whole.shape[0] // size, *whole.shape[1:]), dtype=grad.dtype, device=grad.device)
        _reduce_scatter(out, whole, group=ctx.group)
        return out.transpose(0, 1), None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherSequence.apply(x, group)


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """(batch, len, heads, dim) sequence shard -> (batch, size * len, heads / size, dim) head shard (all-to-all);
    the sequence comes rank-major, as `_key_visibility` orders positions."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    batch, length, heads, dim = x.shape
    send = x.reshape(batch, length, size, heads // size, dim).permute(2, 1, 0, 3, 4).contiguous()
    received = all_to_all_single_autograd(send.flatten(0, 1), None, None, group)
    received = received.view(size * length, batch, heads // size, dim)
    return received.transpose(0, 1)


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: (batch, size * len, heads / size, dim) -> (batch, len, heads, dim)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    batch, whole, heads, dim = x.shape
    length = whole // size
    send = x.reshape(batch, size, length, heads, dim).permute(1, 2, 0, 3, 4).contiguous()
    received = all_to_all_single_autograd(send.flatten(0, 1), None, None, group)
    received = received.view(size, length, batch, heads, dim)  # dim 0: the rank whose heads these are
    return received.permute(2, 1, 0, 3, 4).reshape(batch, length, size * heads, dim)


# ---- ring attention ---------------------------------------------------------------------------------------------


class _Ring:
    """Point-to-point steps around the cp group: send to the next rank, receive from the previous one."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        received = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(works: list) -> None:
        for work in works:
            work.wait()


def _accumulating(t: torch.Tensor) -> torch.Tensor:
    """Softmax statistics and partial outputs are kept in fp32 at least (fp64 inputs stay fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, len, heads, dim) queries -> (batch, kv_heads, group, len, dim), accumulating dtype: grouped kv heads
    are read in place by broadcasting, never copied."""
    batch, length, heads, dim = q.shape
    return _accumulating(q).view(batch, length, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)


def _kv_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, len, kv_heads, dim) -> (batch, kv_heads, 1, len, dim), accumulating dtype."""
    return _accumulating(t).permute(0, 2, 1, 3).unsqueeze(2)


def _block_mask(keys: Visibility, block: int, length: int) -> torch.Tensor:
    """Who sees whom between the local queries and the keys rank `block` holds: (batch, 1, 1, queries, keys)."""
    span = slice(block * length, (block + 1) * length)
    docs = keys.k_documents[:, span] if keys.k_documents is not None else None
    part = Visibility(keys.q_positions, keys.k_positions[:, span], keys.q_documents, docs)
    return part.mask()[:, :, None]


def _region(keys: Visibility, rank: int, block: int, length: int) -> tuple[slice, slice, Optional[torch.Tensor]]:
    """Which local queries (rows) see which keys (cols) of rank `block`'s block, and the mask within them (None:
    all visible). With one document per sequence the load-balanced chunks decide it without looking: an earlier
    rank's block is seen only through its early chunk, wholly, by every local query; a later rank's block wholly, by
    the local late chunk only. Half a block of work off the diagonal, no mask. Otherwise the whole block, masked."""
    if keys.k_documents is None and block != rank:
        half = length // 2
        if block < rank:
            return slice(None), slice(0, half), None
        return slice(half, None), slice(None), None
    return slice(None), slice(None), _block_mask(keys, block, length)


def _grad_views(grads: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k and v gradient halves of one packed buffer, shaped like k and v."""
    return grads[: k.numel()].view(k.shape), grads[k.numel():].view(v.shape)


# Scores one block step materialises at most (per query chunk): 2**26 fp32 scores = 256 MB, whatever the sequence.
SCORE_BUDGET = 2**26


def _row_chunks(rows: slice, length: int, scores_per_row: int) -> list[tuple[int, int]]:
    """The region's query rows in chunks whose scores fit SCORE_BUDGET (at least one row)."""
    start, stop = rows.start or 0, length if rows.stop is None else rows.stop
    step = max(1, SCORE_BUDGET // max(scores_per_row, 1))
    return [(r, min(r + step, stop)) for r in range(start, stop, step)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Visibility,  # type: ignore[override]
                group: dist.ProcessGroup) -> torch.Tensor:
        ring = _Ring(group)
        kv_heads, length = k.shape[2], k.shape[1]
        scale = q.shape[-1] ** -0.5
        qg = _grouped(q, kv_heads)
        # Merged output and log-sum-exp; starting at (0, -inf), our own block (step 0) gives every query itself.
        out = qg.new_zeros((*qg.shape[:-1], v.shape[-1]))
        lse = qg.new_full((*qg.shape[:-1], 1), float("-inf"))
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming, works = ring.start(packed)
            kb, vb = packed[: k.numel()].view_as(k), packed[k.numel():].view_as(v)
            block = (ring.rank - step) % ring.size
            rows, cols, mask = _region(keys, ring.rank, block, length)
            kf, vf = _kv_major(kb)[..., cols, :], _kv_major(vb)[..., cols, :]
            for r0, r1 in _row_chunks(rows, length, qg.shape[0] * qg.shape[1] * qg.shape[2] * kf.shape[-2]):
                part, part_lse = _attend_block(qg[..., r0:r1, :], kf, vf,
                                               mask[..., r0:r1, :] if mask is not None else None, scale)
                old = lse[..., r0:r1, :]
                merged = torch.logaddexp(old, part_lse)
                out[..., r0:r1, :] = out[..., r0:r1, :] * torch.exp(old - merged) + part * torch.exp(part_lse - merged)
                lse[..., r0:r1, :] = merged
            if step < ring.size - 1:
                _Ring.finish(works)
                packed = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.keys, ctx.group, ctx.scale = keys, group, scale
        return _ungrouped(out).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        kv_heads, length = k.shape[2], k.shape[1]
        qg = _grouped(q, kv_heads)
        dog = _grouped(grad_out, kv_heads)
        delta = (dog * out).sum(-1, keepdim=True)  # rowsum(dO * O), the softmax backward's correction
        dq = torch.zeros_like(qg)
        packed = torch.cat([k.reshape(-1), v.reshape(-1)])
        grads = torch.zeros(packed.numel(), dtype=dq.dtype, device=q.device)
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming, works = ring.start(packed)
            kb, vb = packed[: k.numel()].view_as(k), packed[k.numel():].view_as(v)
            block = (ring.rank - step) % ring.size
            rows, cols, mask = _region(ctx.keys, ring.rank, block, length)
            kf, vf = _kv_major(kb)[..., cols, :], _kv_major(vb)[..., cols, :]
            dk_block, dv_block = _grad_views(grads, k, v)
            for r0, r1 in _row_chunks(rows, length, qg.shape[0] * qg.shape[1] * qg.shape[2] * kf.shape[-2]):
                q_rows, do_rows = qg[..., r0:r1, :], dog[..., r0:r1, :]
                scores = (q_rows @ kf.transpose(-1, -2)) * ctx.scale
                if mask is not None:
                    scores = scores.masked_fill(~mask[..., r0:r1, :], float("-inf"))
                p = torch.exp(scores - lse[..., r0:r1, :])
                ds = p * (do_rows @ vf.transpose(-1, -2) - delta[..., r0:r1, :])
                dq[..., r0:r1, :] += (ds @ kf) * ctx.scale
                dk_block[:, cols] += ((ds.transpose(-1, -2) @ q_rows).sum(2) * ctx.scale).transpose(1, 2)
                dv_block[:, cols] += (p.transpose(-1, -2) @ do_rows).sum(2).transpose(1, 2)
            # These gradients belong to block `block`, which the next rank works on in the next step.
            if step < ring.size - 1:
                grads_in, grad_works = ring.start(grads)
                _Ring.finish(works + grad_works)
                packed, grads = incoming, grads_in
        # The gradients in hand now are complete for the next rank's block: send them home.
        mine, works = ring.start(grads)
        _Ring.finish(works)
        dk, dv = _grad_views(mine, k, v)
        return _ungrouped(dq).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _attend_block(qg: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of grouped queries over one block of keys: (output, log-sum-exp), accumulating dtype; a
    query that sees none of the block gets output 0 and log-sum-exp -inf (it weighs nothing when merged)."""
    scores = (qg @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    out = (p @ vf) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out, top + torch.log(total)


def _ungrouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, group, len, dim) -> (batch, len, heads, dim)."""
    return t.permute(0, 3, 1, 2, 4).flatten(2, 3)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Visibility,
                   group: dist.ProcessGroup) -> torch.Tensor:
    """Attention of the local queries over every rank's keys and values (rank-major `keys`), passing the key and
    value blocks around the ring; (batch, len, heads, v_dim) in q's dtype."""
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), keys, group)
