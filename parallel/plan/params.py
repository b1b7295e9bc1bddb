"""Every parameter tensor of a model as arithmetic: name, shape, and how tensor / expert parallelism split it.

Built from ModelConfig alone (no torch), so it works for models far too large to build. The shapes and names follow
models/transformer.py (a test compares them with a meta-device model), and the per-tensor sharding rules follow
the usual tensor-parallel plan: q/k/v, SwiGLU's gate/up weight w13 (hidden, 2, d), GELU's w1 and the output head
column-wise (dim 0 of the weight), wo/w2 row-wise
(dim 1), the embedding split over the vocabulary, norms, the router and MLA's low-rank down-projections replicated.
Routed experts are stacked (experts, in, out), as models/moe.py holds them, and split over ep on dim 0.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from configs.schema import Activation, AttentionKind, ModelConfig

EMBEDDING, LAYER, HEAD = "embedding", "layer", "head"


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    # Dimension split over tensor-parallel ranks (None: every tp rank holds all of it).
    tp_dim: Optional[int] = None
    # Stacked routed experts: dim 0 is split over expert-parallel ranks.
    expert: bool = False
    part: str = LAYER
    layer: int = -1
    # Tensor parallel degrees above this keep the tensor whole (k/v with fewer kv heads than tp ranks).
    max_tp: int = 0
    # Part of an MoE block: split over tp (along `moe_tp_dim`) only by software that splits experts.
    moe_tp_dim: Optional[int] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(name: str, out_features: int, in_features: int, tp_dim: Optional[int], layer: int) -> ParamTensor:
    return ParamTensor(f"{name}.weight", (out_features, in_features), tp_dim, layer=layer)


def _norm(name: str, width: int, layer: int, part: str = LAYER) -> ParamTensor:
    return ParamTensor(f"{name}.weight", (width,), None, part=part, layer=layer)


def _attention(cfg: ModelConfig, prefix: str, layer: int) -> list[ParamTensor]:
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == AttentionKind.mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        tensors = []
        if cfg.q_lora_rank:
            tensors += [
                _linear(f"{prefix}.wq_a", cfg.q_lora_rank, d, None, layer),
                _norm(f"{prefix}.q_norm", cfg.q_lora_rank, layer),
                _linear(f"{prefix}.wq_b", h * qk, cfg.q_lora_rank, 0, layer),
            ]
        else:
            tensors.append(_linear(f"{prefix}.wq", h * qk, d, 0, layer))
        return tensors + [
            _linear(f"{prefix}.wkv_a", cfg.kv_lora_rank, d, None, layer),
            _linear(f"{prefix}.wk_rope", cfg.qk_rope_head_dim, d, None, layer),
            _norm(f"{prefix}.kv_norm", cfg.kv_lora_rank, layer),
            _linear(f"{prefix}.wkv_b", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 0, layer),
            _linear(f"{prefix}.wo", d, h * cfg.v_head_dim, 1, layer),
        ]
    hd, kv = cfg.head_dim, cfg.n_kv_heads
    # parallel/tensor.py keeps k and v whole on every rank when tp exceeds the kv heads (ReplicatedKVHeads).
    norms = [_norm(f"{prefix}.q_norm", hd, layer), _norm(f"{prefix}.k_norm", hd, layer)] if cfg.qk_norm else []
    return [
        _linear(f"{prefix}.wq", h * hd, d, 0, layer),
        ParamTensor(f"{prefix}.wk.weight", (kv * hd, d), 0, layer=layer, max_tp=kv),
        ParamTensor(f"{prefix}.wv.weight", (kv * hd, d), 0, layer=layer, max_tp=kv),
        _linear(f"{prefix}.wo", d, h * hd, 1, layer),
        *norms,
    ]


def _mlp(cfg: ModelConfig, prefix: str, hidden: int, layer: int) -> list[ParamTensor]:
    if cfg.activation == Activation.swiglu:
        first = ParamTensor(f"{prefix}.w13.weight", (hidden, 2, cfg.d_model), 0, layer=layer)
    else:
        first = _linear(f"{prefix}.w1", hidden, cfg.d_model, 0, layer)
    return [first, _linear(f"{prefix}.w2", cfg.d_model, hidden, 1, layer)]


def _moe(cfg: ModelConfig, prefix: str, layer: int) -> list[ParamTensor]:
    """Router, stacked routed experts and the shared experts as one wide MLP. Tensor parallelism leaves the whole
    MoE block unsplit (parallel/tensor.py: expert parallelism shards experts instead)."""
    e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_hidden
    gated = cfg.activation == Activation.swiglu
    tensors = [
        ParamTensor(f"{prefix}.router.gate.weight", (e, d), None, layer=layer),
        # SwiGLU: each unit's gate and up columns paired, (experts, d, 2f).
        ParamTensor(f"{prefix}.experts.{'w13' if gated else 'w1'}", (e, d, 2 * f if gated else f), None, expert=True,
                    layer=layer, moe_tp_dim=2),
        ParamTensor(f"{prefix}.experts.w2", (e, f, d), None, expert=True, layer=layer, moe_tp_dim=1),
    ]
    if cfg.n_shared_experts:
        hidden = cfg.n_shared_experts * f
        tensors += [ParamTensor(t.name, t.shape, None, layer=layer, moe_tp_dim=t.tp_dim)
                    for t in _mlp(cfg, f"{prefix}.shared_experts", hidden, layer)]
    return tensors


def layer_tensors(cfg: ModelConfig, layer: int) -> list[ParamTensor]:
    prefix = f"layers.{layer}"
    tensors = [_norm(f"{prefix}.attention_norm", cfg.d_model, layer)]
    tensors += _attention(cfg, f"{prefix}.attention", layer)
    tensors.append(_norm(f"{prefix}.ffn_norm", cfg.d_model, layer))
    if cfg.is_moe_layer(layer):
        tensors += _moe(cfg, f"{prefix}.feed_forward", layer)
    else:
        tensors += _mlp(cfg, f"{prefix}.feed_forward", cfg.ffn_hidden, layer)
    return tensors


def model_tensors(cfg: ModelConfig) -> list[ParamTensor]:
    """All parameters in the order the model registers them (tied output head counted once, as the embedding)."""
    tensors = [ParamTensor("tok_embeddings.weight", (cfg.vocab_size, cfg.d_model), 0, part=EMBEDDING)]
    for layer in range(cfg.n_layers):
        tensors += layer_tensors(cfg, layer)
    tensors.append(_norm("norm", cfg.d_model, -1, part=HEAD))
    if not cfg.tie_embeddings:
        tensors.append(ParamTensor("output.weight", (cfg.vocab_size, cfg.d_model), 0, part=HEAD))
    return tensors


# ---- what one rank holds -------------------------------------------------------------------------------------


def split_shape(tensor: ParamTensor, tp: int, ep: int, split_experts: bool = False) -> tuple[int, ...]:
    """Shape of the tensor-/expert-parallel shard every rank of the tp and ep groups holds."""
    shape = list(tensor.shape)
    tp_dim = tensor.moe_tp_dim if split_experts and tensor.moe_tp_dim is not None else tensor.tp_dim
    if tp_dim is not None and tp > 1 and not (tensor.max_tp and tp > tensor.max_tp):
        shape[tp_dim] //= tp
    if tensor.expert and ep > 1:
        shape[0] //= ep
    return tuple(shape)


def chunk_rows(rows: int, shards: int, index: int) -> int:
    """Rows of dim 0 that shard `index` of `shards` holds under torch.chunk (FSDP2's rule): ceil-sized chunks
    from the front, so the last shards may be short or empty."""
    size = -(-rows // shards)
    return max(0, min(size, rows - index * size))


Shapes = tuple[tuple[tuple[int, ...], int], ...]


def _count(shapes: list[tuple[int, ...]]) -> Shapes:
    counts = Counter(shapes)
    return tuple(sorted(counts.items()))


@dataclass(frozen=True)
class StageTensors:
    """The parameters of one pipeline rank after tensor / expert parallel splitting, as (shape, how many)."""

    dense: Shapes = ()
    expert: Shapes = ()

    @functools.cached_property
    def dense_numel(self) -> int:
        return sum(math.prod(shape) * n for shape, n in self.dense)

    @functools.cached_property
    def expert_numel(self) -> int:
        return sum(math.prod(shape) * n for shape, n in self.expert)

    @property
    def numel(self) -> int:
        return self.dense_numel + self.expert_numel

    @functools.cached_property
    def count(self) -> int:
        return sum(n for _, n in self.dense) + sum(n for _, n in self.expert)

    def times(self, factor: int) -> "StageTensors":
        return StageTensors(tuple((s, n * factor) for s, n in self.dense), tuple((s, n * factor) for s, n in self.expert))

    def __add__(self, other: "StageTensors") -> "StageTensors":
        def merge(a: Shapes, b: Shapes) -> Shapes:
            total: Counter = Counter(dict(a))
            total.update(dict(b))
            return tuple(sorted(total.items()))

        return StageTensors(merge(self.dense, other.dense), merge(self.expert, other.expert))


def split_tensors(tensors: list[ParamTensor], tp: int, ep: int, split_experts: bool = False) -> StageTensors:
    return StageTensors(_count([split_shape(t, tp, ep, split_experts) for t in tensors if not t.expert]),
                        _count([split_shape(t, tp, ep, split_experts) for t in tensors if t.expert]))


def stage_tensors(
    tensors: list[ParamTensor], layers: tuple[int, ...], embedding: bool, head: bool, tp: int, ep: int
) -> StageTensors:
    """The parameters of a pipeline rank holding `layers` (and the embedding / output head), split by tp and ep."""
    wanted = set(layers)
    chosen = [t for t in tensors
              if (t.part == EMBEDDING and embedding) or (t.part == HEAD and head) or (t.part == LAYER and t.layer in wanted)]
    return split_tensors(chosen, tp, ep)


def model_tensors_edges(cfg: ModelConfig) -> list[ParamTensor]:
    """Only the embedding and output-head tensors (cheap for deep models)."""
    tensors = [ParamTensor("tok_embeddings.weight", (cfg.vocab_size, cfg.d_model), 0, part=EMBEDDING),
               _norm("norm", cfg.d_model, -1, part=HEAD)]
    if not cfg.tie_embeddings:
        tensors.append(ParamTensor("output.weight", (cfg.vocab_size, cfg.d_model), 0, part=HEAD))
    return tensors
