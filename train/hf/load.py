"""Start a run from a Hugging Face checkpoint: each rank reads only the blocks of the tensors it holds.

The model is already built, parallelized and allocated (FSDP, TP, PP, EP and their compositions shard it); for each
tensor this rank holds, the block it owns (a contiguous range of each dimension, `parallel.materialize.local_block`)
is read from the safetensors files straight into the local shard. No rank builds a whole tensor it shards, and no
rank reads a tensor it does not hold: the bytes all ranks read add up to the checkpoint once, plus the replicas a
layout keeps (replicated norms, data-parallel replicas under DDP or HSDP).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from configs.errors import CheckpointError
from configs.schema import ModelConfig
from parallel.materialize import canonical_name, local_block
from train.hf.config import config_mismatch, model_config_from_hf, read_hf_config
from train.hf.files import SafetensorsFolder
from train.hf.names import expected_hf_names, tensor_sources

log = logging.getLogger("supertrain")

# Tensors a Hugging Face checkpoint may carry that compute nothing here, each with the reason it is left alone.
_IGNORED = (
    (re.compile(r".*rotary_emb\.inv_freq$"), "rotary frequencies (recomputed from config.json)"),
)


@dataclass
class ImportReport:
    tensors: int
    bytes_read: int
    seconds: float
    ignored: list[str]


def held_tensors(parts: Iterable[nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain-model name, tensor) of every parameter and checkpointed buffer this rank holds."""
    for part in parts:
        for name, param in part.named_parameters():
            yield canonical_name(name), param
        for name, buffer in part.named_buffers():
            if name.endswith("expert_bias"):  # the only persistent buffer (MoE balancing state)
                yield canonical_name(name), buffer


def _check_names(files: SafetensorsFolder, expected: set[str], hf: dict, cfg: ModelConfig) -> list[str]:
    """Every tensor this model needs is there, and every tensor there is used: else one line naming one.
    Returns the names knowingly left alone (logged), such as DeepSeek-V3's multi-token-prediction layers."""
    present = files.names()
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{files.folder} has no tensor {missing[0]}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": the checkpoint does not hold this "
            "architecture's weights; check config.json against the files")
    ignored: list[str] = []
    unused: list[str] = []
    mtp_layers = range(cfg.n_layers, cfg.n_layers + int(hf.get("num_nextn_predict_layers") or 0))
    for name in sorted(present - expected):
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in expected:
            continue  # an FP8 block scale, used when its weight is read
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) in mtp_layers:
            ignored.append(name)  # DeepSeek-V3's multi-token-prediction module: not modelled
        elif any(pattern.match(name) for pattern, _ in _IGNORED):
            ignored.append(name)
        else:
            unused.append(name)
    if unused:
        raise CheckpointError(f"{files.folder} holds {unused[0]}" + (
            f" and {len(unused) - 1} more tensors" if len(unused) > 1 else "") + " that this model would not use: "
            f"the checkpoint's architecture differs from config.json's model_type={hf['model_type']}")
    return ignored


def check_hf_config(folder: Path, cfg: ModelConfig) -> dict:
    """config.json read and compared with the run's model: a difference stops here, in one line."""
    hf = read_hf_config(folder)
    theirs = model_config_from_hf(hf)
    mismatch = config_mismatch(cfg, theirs)
    if mismatch is not None:
        path, ours, value = mismatch
        raise CheckpointError(f"checkpoint.init_from_hf={folder}: config.json gives {path}={value} and this run has "
                              f"{path}={ours}: choose the matching model config or override {path}={value}")
    return hf


@torch.no_grad()
def load_hf_weights(parts: Iterable[nn.Module], cfg: ModelConfig, folder: Path) -> ImportReport:
    """Fill every tensor this rank holds from the Hugging Face folder (see the module docstring)."""
    start = time.perf_counter()
    hf = check_hf_config(folder, cfg)
    block = ((hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    files = SafetensorsFolder(folder, (int(block[0]), int(block[1])))
    sources = tensor_sources(cfg, hf["model_type"])
    ignored = _check_names(files, expected_hf_names(sources), hf, cfg)
    count = 0
    for name, tensor in held_tensors(parts):
        source = sources.get(name)
        if source is None:
            raise CheckpointError(f"this model's tensor {name} has no counterpart in a {hf['model_type']} checkpoint")
        full_shape, offset = local_block(tensor)
        for hf_name, shape in source.hf_shapes(full_shape).items():
            if files.shape(hf_name) != shape:
                raise CheckpointError(f"{folder}: {hf_name} has shape {files.shape(hf_name)} where this model's "
                                      f"{name} needs {shape}: the files do not match config.json")
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        local.copy_(source.read(files, box))
        count += 1
    return ImportReport(count, files.bytes_read, time.perf_counter() - start, ignored)
