"""Positions and documents in the model: explicit positions 0..S-1 change nothing, and a packed sequence with
document masks gives each document the logits it has alone (GQA and MLA, each kernel backend on this machine)."""

import pytest
import torch

from configs.schema import ModelConfig
from models.kernels import kernels_for
from models.transformer import build_model
from parallel.materialize import materialize
from train.config import load_config

DENSE = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=97)


def _model(cfg: ModelConfig, kernels: str = "reference") -> torch.nn.Module:
    model = build_model(cfg, kernels=kernels_for("cpu", kernels))
    return materialize(model, cfg, torch.device("cpu"), seed=3).double()


def _configs() -> list[ModelConfig]:
    moe = load_config(["model=tiny_moe"]).model
    return [DENSE, moe]


@pytest.mark.parametrize("cfg", _configs(), ids=["gqa", "mla_moe"])
@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_positions_in_order_equal_the_plain_causal_model(cfg, kernels):
    torch.manual_seed(0)
    model = _model(cfg, kernels)
    tokens = torch.randint(0, 97, (2, 24))
    positions = torch.arange(24).expand(2, 24)
    torch.testing.assert_close(model(tokens, positions), model(tokens), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", _configs(), ids=["gqa", "mla_moe"])
def test_each_packed_document_sees_only_itself(cfg):
    torch.manual_seed(0)
    model = _model(cfg)
    lengths = [5, 11, 8]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    documents = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    logits = model(packed, positions, documents)
    alone = torch.cat([model(doc) for doc in docs], dim=1)
    # The MoE routes a different set of tokens in each call, and parts of routing run in fp32: 1e-6, not 1e-9.
    torch.testing.assert_close(logits, alone, rtol=1e-6, atol=1e-6)
    # and the mask matters: without it the later documents read the earlier ones
    assert not torch.allclose(model(packed)[:, lengths[0]:], alone[:, lengths[0]:])


def test_scattered_chunks_with_their_positions_equal_the_whole_sequence():
    """What a context-parallel rank computes when it holds every chunk: the same logits, in its chunk order."""
    torch.manual_seed(0)
    model = _model(DENSE)
    tokens = torch.randint(0, 97, (2, 16))
    order = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    logits = model(tokens[:, order], order.expand(2, 16))
    torch.testing.assert_close(logits, model(tokens)[:, order], rtol=1e-9, atol=1e-9)
