"""Hand a model back as a Hugging Face folder: config.json plus sharded safetensors with their index.

Each tensor is made whole once (`full_tensor()`, a collective over the ranks that shard it) and kept by one writer
among the ranks that hold it, chosen from the tensor's name, so the writing is spread over all ranks and every rank
writes its own files (`model-<rank>-<n>.safetensors`, a new one past `shard_bytes`). A rank holds at most its files'
worth plus one whole tensor. Rank 0 writes the index and config.json last, after every rank's files exist.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from configs.errors import CheckpointError
from configs.schema import ModelConfig
from train.hf.config import architecture_of, hf_config_from_model
from train.hf.files import write_index, write_shard
from train.hf.load import held_tensors
from train.hf.names import tensor_sources

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Tokenizer and generation files copied from the folder a run started from, so the export is self-contained.
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "tokenizer.model", "vocab.json", "merges.txt")


def _all_gather(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class _Pending:
    """Rows of one Hugging Face tensor arriving from one or more of our tensors (MLA's kv latent and rotary key)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.pieces: dict[int, torch.Tensor] = {}

    def add(self, first_row: int, piece: torch.Tensor) -> Optional[torch.Tensor]:
        self.pieces[first_row] = piece
        if sum(p.shape[0] for p in self.pieces.values()) < self.rows:
            return None
        return torch.cat([self.pieces[k] for k in sorted(self.pieces)])


@torch.no_grad()
def export_hf(parts: Iterable[nn.Module], cfg: ModelConfig, out: Path, dtype: str = "bfloat16",
              source_folder: Optional[Path] = None, shard_bytes: int = 4 * 2**30) -> Path:
    """Write `out` (created; an existing folder is replaced only by rank 0 at the start). A collective."""
    kind = architecture_of(cfg)
    sources = tensor_sources(cfg, kind)
    rank = dist.get_rank() if dist.is_initialized() else 0
    held = [(name, tensor) for name, tensor in held_tensors(parts)
            if not (cfg.tie_embeddings and name == "output.weight")]  # the tied head is the embedding
    for name, tensor in held:
        if name.endswith("expert_bias") and not sources[name].hf_names():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if bool(local.ne(0).any()):
                raise CheckpointError(f"{name} holds a routing bias learned in training (model.moe.bias_update_rate > "
                                      f"0) that a {kind} checkpoint has no place for: export would change which "
                                      f"experts tokens reach; train with model.moe.bias_update_rate=0 to export")
    mine = sorted({hf for name, _ in held for hf in sources[name].hf_names()})
    holders: dict[str, list[int]] = {}
    for holder, names in enumerate(_all_gather(mine)):
        for hf_name in names:
            holders.setdefault(hf_name, []).append(holder)
    writer = {name: ranks[zlib.crc32(name.encode()) % len(ranks)] for name, ranks in holders.items()}

    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    target = _DTYPES[dtype]
    pending: dict[str, _Pending] = {}
    batch: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    batch_bytes, total_bytes, file_number = 0, 0, 0

    def flush() -> None:
        nonlocal batch, batch_bytes, file_number
        if batch:
            file = f"model-{rank:05d}-{file_number:04d}.safetensors"
            write_shard(out, file, batch)
            files.update({name: file for name in batch})
            file_number += 1
        batch, batch_bytes = {}, 0

    for name, tensor in held:
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        for hf_name, rows, first_row, piece in sources[name].to_hf(whole.detach()):
            if writer[hf_name] != rank:
                continue
            if hf_name not in pending:
                pending[hf_name] = _Pending(rows)
            complete = pending[hf_name].add(first_row, piece.to("cpu", target).clone())
            if complete is None:
                continue
            del pending[hf_name]
            batch[hf_name] = complete
            batch_bytes += complete.numel() * complete.element_size()
            total_bytes += complete.numel() * complete.element_size()
            if batch_bytes >= shard_bytes:
                flush()
        del whole
    flush()
    if pending:
        raise CheckpointError(f"export: {sorted(pending)[0]} was only partly written (a missing piece)")

    gathered = _all_gather((files, total_bytes))
    if rank == 0:
        weight_map = {name: file for rank_files, _ in gathered for name, file in rank_files.items()}
        write_index(out, weight_map, sum(size for _, size in gathered))
        config = hf_config_from_model(cfg, dtype)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in _COPIED:
            if source_folder is not None and (source_folder / file).is_file():
                shutil.copy2(source_folder / file, out / file)
    if dist.is_initialized():
        dist.barrier()
    return out
