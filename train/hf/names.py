"""Which Hugging Face tensor each of our tensors is, and how to turn one into the other.

Our names are those of a plain `models.transformer.Transformer` (no wrapper prefixes). The kinds of source:
- `Same`: the same matrix; for rotary projections of Llama-family checkpoints with the rows of every head reordered,
  because transformers rotates pairs (i, i + d/2) of a head ("rotate_half") and we rotate pairs (2i, 2i + 1).
  The query and key of one head are reordered alike, so their dot products, and the logits, are unchanged.
- `Rows`: a band of rows of a larger tensor (DeepSeek stores the kv latent and the shared rotary key as one matrix).
- `Experts`: our stacked (experts, in, out) weight is every expert's (out, in) matrix, transposed.
- `GateUp`: our SwiGLU weight (hidden, 2, d) is the gate (hidden, d) and up (hidden, d) matrices, paired by hidden
  unit; `ExpertsGateUp` the same for the stacked experts (experts, d, 2 * hidden), columns 2i and 2i + 1.
- `Absent`: no counterpart in this architecture (the MoE balancing bias outside DeepSeek): zero on import.
Every source reads only the block of our tensor a rank holds (`read(files, box)`), and turns our whole tensor back
into Hugging Face pieces (`to_hf`) for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from configs.schema import AttentionKind, ModelConfig
from train.hf.files import SafetensorsFolder

Box = tuple[slice, ...]


class Source(Protocol):
    def hf_names(self) -> list[str]: ...

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The Hugging Face tensors' shapes for our tensor of whole shape `shape`."""
        ...

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor: ...

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        """(Hugging Face name, its total rows, the first row this piece fills, the piece)."""
        ...


def _interleaved_from_half(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """For our row indices, the Hugging Face rows they come from (pairs (2i, 2i+1) <- (i, i + d/2) per head)."""
    within = rows % head_dim
    return rows - within + within // 2 + (within % 2) * (head_dim // 2)


@dataclass(frozen=True)
class Same:
    name: str
    rope_head_dim: int = 0  # > 0: rows reordered per head of this width

    def hf_names(self) -> list[str]:
        return [self.name]

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.name: shape}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        if not self.rope_head_dim:
            return files.read(self.name, box)
        rows = _interleaved_from_half(torch.arange(box[0].start, box[0].stop), self.rope_head_dim)
        wanted = rows.sort().values
        # The rows come in runs (a head's first and second halves): read each run, so no row is read twice.
        breaks = (torch.nonzero(wanted.diff() != 1).flatten() + 1).tolist()
        runs = torch.tensor_split(wanted, breaks)
        band = torch.cat([files.read(self.name, (slice(int(r[0]), int(r[-1]) + 1), *box[1:])) for r in runs])
        return band.index_select(0, torch.searchsorted(wanted, rows))

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        if self.rope_head_dim:
            order = _interleaved_from_half(torch.arange(whole.shape[0]), self.rope_head_dim)
            whole = torch.empty_like(whole).index_copy_(0, order, whole)
        yield self.name, whole.shape[0], 0, whole


@dataclass(frozen=True)
class Rows:
    name: str
    start: int
    total: int  # rows of the Hugging Face tensor

    def hf_names(self) -> list[str]:
        return [self.name]

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.name: (self.total, *shape[1:])}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        return files.read(self.name, (slice(self.start + box[0].start, self.start + box[0].stop), *box[1:]))

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        yield self.name, self.total, self.start, whole


@dataclass(frozen=True)
class Experts:
    pattern: str  # with {e} for the expert's index
    n_experts: int

    def hf_names(self) -> list[str]:
        return [self.pattern.format(e=e) for e in range(self.n_experts)]

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {name: (shape[2], shape[1]) for name in self.hf_names()}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        experts, inner, outer = box
        return torch.stack([files.read(self.pattern.format(e=e), (outer, inner)).t()
                            for e in range(experts.start, experts.stop)])

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        for e in range(whole.shape[0]):
            matrix = whole[e].t().contiguous()
            yield self.pattern.format(e=e), matrix.shape[0], 0, matrix


@dataclass(frozen=True)
class GateUp:
    gate: str
    up: str

    def hf_names(self) -> list[str]:
        return [self.gate, self.up]

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.gate: (shape[0], shape[2]), self.up: (shape[0], shape[2])}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        units, pair, inner = box
        names = (self.gate, self.up)[pair.start:pair.stop]
        return torch.stack([files.read(name, (units, inner)) for name in names], dim=1)

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        for index, name in enumerate((self.gate, self.up)):
            yield name, whole.shape[0], 0, whole[:, index].contiguous()


@dataclass(frozen=True)
class ExpertsGateUp:
    gate: str  # patterns with {e} for the expert's index
    up: str
    n_experts: int

    def hf_names(self) -> list[str]:
        return [pattern.format(e=e) for e in range(self.n_experts) for pattern in (self.gate, self.up)]

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {name: (shape[2] // 2, shape[1]) for name in self.hf_names()}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        experts, inner, columns = box
        units = slice(columns.start // 2, (columns.stop + 1) // 2)  # the hidden units whose columns the box holds
        first = columns.start - 2 * units.start
        out = []
        for e in range(experts.start, experts.stop):
            gate, up = (files.read(p.format(e=e), (units, inner)).t() for p in (self.gate, self.up))
            out.append(torch.stack((gate, up), dim=-1).flatten(-2)[:, first:first + columns.stop - columns.start])
        return torch.stack(out)

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        for e in range(whole.shape[0]):
            for index, pattern in enumerate((self.gate, self.up)):
                matrix = whole[e][:, index::2].t().contiguous()
                yield pattern.format(e=e), matrix.shape[0], 0, matrix


@dataclass(frozen=True)
class Absent:
    def hf_names(self) -> list[str]:
        return []

    def hf_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {}

    def read(self, files: SafetensorsFolder, box: Box) -> torch.Tensor:
        return torch.zeros(tuple(s.stop - s.start for s in box))

    def to_hf(self, whole: torch.Tensor) -> Iterator[tuple[str, int, int, torch.Tensor]]:
        return iter(())


def _attention(cfg: ModelConfig, kind: str, hf: str) -> dict[str, Source]:
    if cfg.attention == AttentionKind.mla:
        # DeepSeek's rotary parts are already in consecutive pairs (rope_interleave=true): no reordering.
        out: dict[str, Source] = {
            "wkv_a.weight": Rows(f"{hf}.kv_a_proj_with_mqa.weight", 0, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            "wk_rope.weight": Rows(f"{hf}.kv_a_proj_with_mqa.weight", cfg.kv_lora_rank,
                                   cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            "kv_norm.weight": Same(f"{hf}.kv_a_layernorm.weight"),
            "wkv_b.weight": Same(f"{hf}.kv_b_proj.weight"),
            "wo.weight": Same(f"{hf}.o_proj.weight"),
        }
        if cfg.q_lora_rank:
            out.update({"wq_a.weight": Same(f"{hf}.q_a_proj.weight"), "q_norm.weight": Same(f"{hf}.q_a_layernorm.weight"),
                        "wq_b.weight": Same(f"{hf}.q_b_proj.weight")})
        else:
            out["wq.weight"] = Same(f"{hf}.q_proj.weight")
        return out
    d = cfg.head_dim
    out = {"wq.weight": Same(f"{hf}.q_proj.weight", d), "wk.weight": Same(f"{hf}.k_proj.weight", d),
           "wv.weight": Same(f"{hf}.v_proj.weight"), "wo.weight": Same(f"{hf}.o_proj.weight")}
    if cfg.qk_norm:
        out.update({"q_norm.weight": Same(f"{hf}.q_norm.weight", d), "k_norm.weight": Same(f"{hf}.k_norm.weight", d)})
    return out


def _mlp(hf: str) -> dict[str, Source]:
    return {"w13.weight": GateUp(f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
            "w2.weight": Same(f"{hf}.down_proj.weight")}


def _moe(cfg: ModelConfig, kind: str, hf: str) -> dict[str, Source]:
    n = cfg.n_routed_experts
    if kind == "mixtral":
        hf = hf.replace(".mlp", ".block_sparse_moe")
        names = ("w1", "w2", "w3")
    else:
        names = ("gate_proj", "down_proj", "up_proj")
    out: dict[str, Source] = {
        "router.gate.weight": Same(f"{hf}.gate.weight"),
        "experts.w13": ExpertsGateUp(f"{hf}.experts.{{e}}.{names[0]}.weight", f"{hf}.experts.{{e}}.{names[2]}.weight",
                                     n),
        "experts.w2": Experts(f"{hf}.experts.{{e}}.{names[1]}.weight", n),
        "expert_bias": Same(f"{hf}.gate.e_score_correction_bias") if kind == "deepseek_v3" else Absent(),
    }
    if cfg.n_shared_experts:
        out.update({f"shared_experts.{k}": v for k, v in _mlp(f"{hf}.shared_experts").items()})
    return out


def tensor_sources(cfg: ModelConfig, kind: str) -> dict[str, Source]:
    """Our tensor name -> its source in a Hugging Face checkpoint of architecture `kind` (config.json model_type)."""
    sources: dict[str, Source] = {"tok_embeddings.weight": Same("model.embed_tokens.weight"),
                                  "norm.weight": Same("model.norm.weight"),
                                  "output.weight": Same("model.embed_tokens.weight" if cfg.tie_embeddings
                                                        else "lm_head.weight")}
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}"
        ours = f"layers.{i}"
        sources[f"{ours}.attention_norm.weight"] = Same(f"{hf}.input_layernorm.weight")
        sources[f"{ours}.ffn_norm.weight"] = Same(f"{hf}.post_attention_layernorm.weight")
        for key, source in _attention(cfg, kind, f"{hf}.self_attn").items():
            sources[f"{ours}.attention.{key}"] = source
        block = _moe(cfg, kind, f"{hf}.mlp") if cfg.is_moe_layer(i) else _mlp(f"{hf}.mlp")
        for key, source in block.items():
            sources[f"{ours}.feed_forward.{key}"] = source
    return sources


def expected_hf_names(sources: dict[str, Source]) -> set[str]:
    return {name for source in sources.values() for name in source.hf_names()}
