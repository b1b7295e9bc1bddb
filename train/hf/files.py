"""Safetensors folders: read blocks of tensors (only the bytes asked for), write a sharded folder with its index.

A Hugging Face folder holds `model.safetensors`, or `model-*.safetensors` listed by `model.safetensors.index.json`.
Files are memory-mapped by safetensors, so reading a block of rows touches only those rows' pages. FP8 weights with
128 x 128 block scales (DeepSeek-V3's `weight_scale_inv` tensors, `quantization_config.weight_block_size`) are
dequantized on read: value = fp8 value x its block's scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from configs.errors import CheckpointError

INDEX = "model.safetensors.index.json"
_FP8 = {"F8_E4M3", "F8_E5M2"}


class SafetensorsFolder:
    """Read access to a Hugging Face checkpoint folder; counts the bytes it reads (`bytes_read`)."""

    def __init__(self, folder: Path, block_size: Optional[tuple[int, int]] = None) -> None:
        from safetensors import safe_open

        self.folder = folder
        self._open = safe_open
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0
        self.block_size = block_size or (128, 128)
        index = folder / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise CheckpointError(f"{index} is not a safetensors index ({error})") from None
        elif (folder / "model.safetensors").is_file():
            self.weight_map = {name: "model.safetensors" for name in self._handle("model.safetensors").keys()}
        else:
            raise CheckpointError(f"{folder} has neither {INDEX} nor model.safetensors: point checkpoint.init_from_hf "
                                  f"at a folder of safetensors weights")

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = self._open(str(path), framework="pt")
            except Exception as error:  # safetensors raises its own SafetensorError for a torn header
                raise CheckpointError(f"{path} is not a readable safetensors file ({error}): download it again"
                                      ) from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _slice(self, name: str) -> Any:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder} has no tensor {name}")
        return self._handle(self.weight_map[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """The block `box` (one slice per dimension, none open-ended) of tensor `name`, dequantized if FP8."""
        piece = self._slice(name)
        shape = tuple(piece.get_shape())
        if len(box) != len(shape) or any(s.stop > n for s, n in zip(box, shape)):
            raise CheckpointError(f"{self.folder}: {name} has shape {shape}, which does not hold the block "
                                  f"{[(s.start, s.stop) for s in box]} this model needs: the checkpoint is of "
                                  f"another model shape")
        values = piece[box] if shape else piece[:]
        self.bytes_read += values.numel() * values.element_size()
        if piece.get_dtype() in _FP8:
            return self._dequantize(name, values, box)
        return values

    def _dequantize(self, name: str, values: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        if scale_name not in self.weight_map or values.dim() != 2:
            raise CheckpointError(f"{self.folder}: {name} is FP8 without a block scale {scale_name}")
        rows, cols = self.block_size
        (r, c) = box
        first_row, first_col = r.start // rows, c.start // cols
        scale = self._slice(scale_name)[first_row:math.ceil(r.stop / rows), first_col:math.ceil(c.stop / cols)]
        self.bytes_read += scale.numel() * scale.element_size()
        scale = scale.float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
        scale = scale[r.start - first_row * rows:r.stop - first_row * rows, c.start - first_col * cols:
                      c.stop - first_col * cols]
        return values.float() * scale

    def tensor_bytes(self) -> int:
        """Bytes of every tensor in the folder (what reading it all once costs)."""
        total = 0
        for name in self.weight_map:
            piece = self._slice(name)
            itemsize = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2}.get(piece.get_dtype(), 1)
            total += math.prod(piece.get_shape()) * itemsize
        return total


def write_shard(folder: Path, file: str, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file of whole tensors, with the metadata transformers checks (format=pt)."""
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / file), metadata={"format": "pt"})


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
