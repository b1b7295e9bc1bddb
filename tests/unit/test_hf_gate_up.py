"""SwiGLU's stored gate/up weights against Hugging Face's separate gate and up matrices: any block a rank holds
reads the right elements, and export gives back the matrices it was read from."""

from __future__ import annotations

import itertools

import torch

from train.hf.names import ExpertsGateUp, GateUp


class InMemoryFiles:
    """The one method a source reads through (SafetensorsFolder.read), over tensors held in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][box].clone()


def _slices(size: int) -> list[slice]:
    return [slice(a, b) for a, b in itertools.combinations(range(size + 1), 2)]


def test_dense_gate_up_reads_every_block_and_exports_back() -> None:
    hidden, d = 5, 3
    gate, up = torch.randn(hidden, d), torch.randn(hidden, d)
    source = GateUp("mlp.gate_proj.weight", "mlp.up_proj.weight")
    files = InMemoryFiles({source.gate: gate, source.up: up})
    whole = torch.stack((gate, up), dim=1)  # (hidden, 2, d): unit i's gate row, then its up row
    assert source.hf_shapes(tuple(whole.shape)) == {source.gate: (hidden, d), source.up: (hidden, d)}
    for units, pair, inner in itertools.product(_slices(hidden), _slices(2), [slice(0, d), slice(1, 3)]):
        box = (units, pair, inner)
        assert torch.equal(source.read(files, box), whole[box]), box
    exported = {name: piece for name, _, _, piece in source.to_hf(whole)}
    assert torch.equal(exported[source.gate], gate) and torch.equal(exported[source.up], up)


def test_expert_gate_up_reads_every_column_range_and_exports_back() -> None:
    experts, hidden, d = 3, 4, 2
    gates, ups = torch.randn(experts, hidden, d), torch.randn(experts, hidden, d)
    source = ExpertsGateUp("e.{e}.gate.weight", "e.{e}.up.weight", experts)
    files = InMemoryFiles({**{f"e.{e}.gate.weight": gates[e] for e in range(experts)},
                           **{f"e.{e}.up.weight": ups[e] for e in range(experts)}})
    # (experts, d, 2 * hidden): column 2i is unit i's gate, 2i + 1 its up
    whole = torch.stack((gates.transpose(1, 2), ups.transpose(1, 2)), dim=-1).flatten(-2)
    assert torch.equal(whole[1, :, 4], gates[1, 2]) and torch.equal(whole[1, :, 5], ups[1, 2])
    for rows, columns in itertools.product(_slices(experts), _slices(2 * hidden)):  # odd starts and ends too
        box = (rows, slice(0, d), columns)
        assert torch.equal(source.read(files, box), whole[box]), box
    exported = {name: piece for name, _, _, piece in source.to_hf(whole)}
    for e in range(experts):
        assert torch.equal(exported[f"e.{e}.gate.weight"], gates[e]) and torch.equal(exported[f"e.{e}.up.weight"], ups[e])
