"""The Ascend backend's calls against torch_npu's real op signatures (copied from Ascend's op-plugin into CPU
stand-ins, fake_npu_ops.py): a model on the NPU backend computes the reference model's logits and gradients to 1e-5
(fp32) for GQA, QK-norm, MLA and MoE blocks, every fused op is called, and an op the installed torch_npu lacks (or
lacks an argument of) falls back with one logged line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import fake_npu_ops  # noqa: E402
from models.kernels import REFERENCE  # noqa: E402
from models.kernels import npu as npu_backend  # noqa: E402
from models.kernels.npu import FUSED_OPS, NpuKernels, torch_npu_op  # noqa: E402
from models.transformer import build_model  # noqa: E402
from parallel.materialize import materialize  # noqa: E402
from train.config import load_config  # noqa: E402

fake_npu_ops.install()

MODELS = {
    "gqa": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2"],
    "qwen3_style": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2", "model.qk_norm=true"],
    "mla_moe": ["model=tiny_moe", "model.n_layers=2"],  # query/key width 48 over value width 32
}


def _run(overrides: list[str], kernels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = load_config(overrides).model
    model = materialize(build_model(cfg, kernels=kernels), cfg, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_npu_backend_equals_reference_with_every_fused_op_called(model: str) -> None:
    backend = NpuKernels()
    assert set(backend._ops) == set(FUSED_OPS)
    want_logits, want_grads = _run(MODELS[model], REFERENCE)
    fake_npu_ops.CALLS.clear()
    got_logits, got_grads = _run(MODELS[model], backend)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    called = set(fake_npu_ops.CALLS)
    assert {"npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention"} <= called
    if model != "mla_moe":  # its dense layer's MLP and shared experts use swiglu too
        assert "npu_swiglu" in called


def test_a_missing_op_falls_back_with_one_line(monkeypatch, caplog) -> None:
    real = torch_npu_op

    def without_rotary(name, arguments, namespace="npu"):
        if name == "npu_rotary_mul":
            return None, "torch_npu's npu_rotary_mul takes no rotary_mode (a newer torch_npu has it)"
        return real(name, arguments, namespace)

    monkeypatch.setattr(npu_backend, "torch_npu_op", without_rotary)
    with caplog.at_level(logging.WARNING, logger="supertrain"):
        backend = NpuKernels()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["torch_npu's npu_rotary_mul takes no rotary_mode (a newer torch_npu has it): the rope kernel "
                     "runs the reference ops instead"]
    assert "rope" not in backend._ops and backend.apply_rope is npu_backend.ops.rope_real
    x, cos, sin = torch.randn(1, 8, 2, 16), torch.rand(8, 8), torch.rand(8, 8)
    torch.testing.assert_close(backend.apply_rope(x, cos, sin), REFERENCE.apply_rope(x, cos, sin))


def test_capability_check_reads_the_installed_schema() -> None:
    """An older op without an argument the backend passes is refused by name, not called."""
    library = torch.library.Library("supertrain_old_npu", "DEF")
    library.define("npu_rotary_mul(Tensor self, Tensor r1, Tensor r2) -> Tensor")
    op, why = torch_npu_op("npu_rotary_mul", FUSED_OPS["rope"][1], namespace="supertrain_old_npu")
    assert op is None and why == "torch_npu's npu_rotary_mul takes no rotary_mode (a newer torch_npu has it)"
    op, why = torch_npu_op("npu_no_such_op", (), namespace="supertrain_old_npu")
    assert op is None and why == "torch_npu has no npu_no_such_op"
    assert torch_npu_op("npu_fusion_attention", FUSED_OPS["attention"][1])[0] is not None


def test_switched_off_kernels_use_the_npu_friendly_plain_ops() -> None:
    backend = NpuKernels(enabled=())
    assert backend._ops == {} and backend.apply_rope is npu_backend.ops.rope_real
    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    torch.testing.assert_close(backend.causal_attention(q, k, v), REFERENCE.causal_attention(q, k, v))
