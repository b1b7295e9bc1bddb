"""The dense model: FLOPs, tied embeddings, causality, and a seeded init that ignores the layout (parameter counts
against the modules and the published figures: test_model_params.py)."""

import pytest
import torch

from configs.schema import ModelConfig
from models.counts import flops_per_token, num_params
from models.transformer import build_model
from parallel.materialize import canonical_name, materialize
from train.config import load_config


def model_cfg(name: str) -> ModelConfig:
    return load_config([f"model={name}"]).model


def test_flops_per_token_is_6n_plus_attention():
    cfg = model_cfg("llama3_8b")
    n_matmul = num_params(cfg) - cfg.vocab_size * cfg.d_model  # the embedding lookup does no matmul
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 8192
    assert flops_per_token(cfg, 8192) == 6 * n_matmul + attention


def test_tied_embeddings_count_once():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, ffn_hidden=64, vocab_size=100, tie_embeddings=True)
    model = materialize(build_model(cfg), cfg, torch.device("cpu"), seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def tiny_model(seed: int = 0, **overrides) -> tuple[ModelConfig, torch.nn.Module]:
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=97, **overrides)
    return cfg, materialize(build_model(cfg), cfg, torch.device("cpu"), seed)


def test_forward_is_causal():
    _, model = tiny_model()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    out_a, out_b = model(tokens), model(changed)
    assert out_a.shape == (2, 16, 97)
    torch.testing.assert_close(out_a[:, :10], out_b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(out_a[:, 10:], out_b[:, 10:])


def test_init_is_seeded_per_parameter_name():
    _, a = tiny_model(seed=1)
    _, b = tiny_model(seed=1)
    _, c = tiny_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_init_does_not_depend_on_which_layers_exist():
    """A pipeline stage keeping only layer 1 gets the same layer-1 weights as the whole model."""
    cfg, whole = tiny_model(seed=3)
    stage = build_model(cfg)
    del stage.layers["0"]
    stage.tok_embeddings = None
    stage = materialize(stage, cfg, torch.device("cpu"), seed=3)
    whole_params = dict(whole.named_parameters())
    for name, param in stage.named_parameters():
        assert torch.equal(param, whole_params[name]), name


def test_wrapper_prefixes_are_ignored_for_names():
    assert canonical_name("module.layers.0._checkpoint_wrapped_module.attention.wq.weight") == "layers.0.attention.wq.weight"
    assert canonical_name("_orig_mod.output.weight") == "output.weight"


def test_residual_projections_are_scaled_down():
    cfg, model = tiny_model(seed=0)
    wo = model.layers["0"].attention.wo.weight.std().item()
    wq = model.layers["0"].attention.wq.weight.std().item()
    assert wo == pytest.approx(cfg.init_std / (2 * cfg.n_layers) ** 0.5, rel=0.1)
    assert wq == pytest.approx(cfg.init_std, rel=0.1)


def test_gelu_model_has_two_matrices_per_mlp():
    cfg, model = tiny_model(activation="gelu")
    assert [n for n, _ in model.layers["0"].feed_forward.named_parameters()] == ["w1.weight", "w2.weight"]
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    assert model(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)
