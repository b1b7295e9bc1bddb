"""Initialisation draws each rank's own block of each parameter: blocks equal the same elements of a single-device
model, bitwise, and no rank allocates a whole tensor it shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs.schema import ModelConfig
from models.counter_rng import CHUNK_ELEMENTS, fill_normal_, stream_key
from models.transformer import build_model
from parallel.materialize import canonical_name, materialize

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=96)


@pytest.mark.parametrize("offset, shape", [((0, 0), (37, 53)), ((5, 30), (10, 20)), ((36, 0), (1, 53)),
                                           ((0, 52), (37, 1)), ((12, 7), (0, 5))])
def test_any_block_equals_the_same_elements_of_the_whole(offset, shape) -> None:
    key = stream_key(7, 1234)
    whole = fill_normal_(torch.empty(37, 53), key, (37, 53), (0, 0))
    block = fill_normal_(torch.empty(shape), key, (37, 53), offset)
    rows, cols = (slice(o, o + s) for o, s in zip(offset, shape))
    assert torch.equal(block, whole[rows, cols])


def test_blocks_larger_than_a_chunk_and_of_three_dimensions(monkeypatch) -> None:
    monkeypatch.setattr("models.counter_rng.CHUNK_ELEMENTS", 64)  # many chunks
    key = stream_key(0, 99)
    whole = fill_normal_(torch.empty(6, 10, 12), key, (6, 10, 12), (0, 0, 0))
    block = fill_normal_(torch.empty(4, 3, 12), key, (6, 10, 12), (2, 5, 0))
    assert torch.equal(block, whole[2:6, 5:8, :])


def test_values_are_standard_normal_and_keys_independent() -> None:
    values = fill_normal_(torch.empty(1_000_000), stream_key(0, 1), (1_000_000,), (0,))
    assert abs(values.mean().item()) < 0.005 and abs(values.std().item() - 1) < 0.005
    assert values.abs().max().item() <= 6
    third_moment, fourth_moment = (values ** 3).mean().item(), (values ** 4).mean().item()
    assert abs(third_moment) < 0.02 and abs(fourth_moment - 2.9) < 0.05  # Irwin-Hall(12): kurtosis 3 - 0.1
    other = fill_normal_(torch.empty(1_000_000), stream_key(0, 2), (1_000_000,), (0,))
    assert abs(torch.corrcoef(torch.stack([values, other]))[0, 1].item()) < 0.005


class _LargestAllocation(TorchDispatchMode):
    """The most elements any op produced on this rank while active (a DTensor's: its local shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                self.largest = max(self.largest, local.numel())
        return out


def check_fsdp_rank(rank: int) -> None:
    """One rank of 4 under a fake process group (collectives answered locally): its FSDP shards equal the same rows
    of a single-device model, and nothing it allocates while materializing is larger than its largest shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    single = materialize(build_model(CFG), CFG, torch.device("cpu"), seed=3)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
    model = build_model(CFG)
    mesh = init_device_mesh("cpu", (4,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with _LargestAllocation() as meter:
        materialize(model, CFG, torch.device("cpu"), seed=3)
    whole = dict(single.named_parameters())
    largest_shard = 0
    for name, param in model.named_parameters():
        local = param.to_local()
        rows = -(-param.shape[0] // 4)  # FSDP2's torch.chunk rule: ceil-sized chunks from the front
        assert torch.equal(local, whole[canonical_name(name)][rank * rows:(rank + 1) * rows]), name
        largest_shard = max(largest_shard, local.numel())
    dist.destroy_process_group()
    assert meter.largest <= largest_shard < max(p.numel() for p in single.parameters()), meter.largest
    assert largest_shard <= CHUNK_ELEMENTS


@pytest.mark.parametrize("rank", [0, 3])
def test_an_fsdp_rank_draws_only_its_shards_and_they_equal_the_single_device_model(rank: int) -> None:
    # A process of its own per rank: a process group is initialised once per process in real runs, and torch keeps
    # mesh state across re-initialisations in one process.
    here = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", f"import test_init; test_init.check_fsdp_rank({rank})"],
                            cwd=here, env={**os.environ, "PYTHONPATH": f"{here.parents[1]}{os.pathsep}{here}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
