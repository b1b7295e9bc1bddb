"""Kernel backends against the reference ops: a model whose layers run a device's backend computes the reference
model's logits and gradients to 1e-5 (fp32), for dense GQA, MLA and MoE blocks. The CUDA and NPU backends' code
paths that run on CPU tensors are checked here too (their device-only kernels are not). Switching kernels off
returns exactly the reference op."""

from __future__ import annotations

import pytest
import torch

from configs.errors import ConfigError
from launch.device import CPU, CUDA, NPU
from models.kernels import KERNELS, REFERENCE, kernels_for
from models.kernels.cpu import CpuKernels
from models.kernels.cuda import CudaKernels
from models.kernels.npu import NpuKernels
from models.transformer import build_model
from parallel.materialize import materialize
from train.config import load_config

BACKENDS = {CPU: CpuKernels, CUDA: CudaKernels, NPU: NpuKernels}
MODELS = {
    # 512 positions: the CPU's block-causal attention kernel takes fp32 sequences of 512-1024.
    "gqa": (["model=tiny", "model.n_layers=2", "model.n_kv_heads=2"], 512),
    "qwen3_style": (["model=tiny", "model.n_layers=2", "model.n_kv_heads=2", "model.qk_norm=true"], 64),
    "mla_moe": (["model=tiny_moe", "model.n_layers=2"], 512),
    "gqa_moe": (["model=tiny", "model.n_layers=2", "model.n_routed_experts=4", "model.top_k=2",
                 "model.moe_ffn_hidden=64", "model.n_shared_experts=1"], 64),
}


def _logits_and_grads(overrides: list[str], seq: int, kernels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = load_config(overrides).model
    model = materialize(build_model(cfg, kernels=kernels), cfg, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_model_equals_reference_forward_and_backward(backend: str, model: str) -> None:
    overrides, seq = MODELS[model]
    want_logits, want_grads = _logits_and_grads(overrides, seq, REFERENCE)
    got_logits, got_grads = _logits_and_grads(overrides, seq, BACKENDS[backend]())
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _masked_logits_and_grads(overrides: list[str], kernels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Packed documents (positions restarting, attention kept within each): the backends' masked attention."""
    from parallel.context import document_positions

    cfg = load_config(overrides).model
    model = materialize(build_model(cfg, kernels=kernels), cfg, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 6, (2, 64), generator=torch.Generator().manual_seed(0))  # id 0 ends documents
    positions, documents = document_positions(tokens, 0)
    logits = model(tokens, positions, documents)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("model", ["gqa", "mla_moe"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_masked_attention_equals_reference(backend: str, model: str) -> None:
    overrides, _ = MODELS[model]
    want_logits, want_grads = _masked_logits_and_grads(overrides, REFERENCE)
    got_logits, got_grads = _masked_logits_and_grads(overrides, BACKENDS[backend]())
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_every_kernel_switched_off_is_the_reference_op() -> None:
    backend = kernels_for("cpu", enabled=[])
    for method in ("linear", "project", "rms_norm", "swiglu", "apply_rope", "causal_attention", "masked_attention",
                   "grouped_mm",
                   "permute_tokens", "unpermute_tokens"):
        assert getattr(backend, method).__func__ is getattr(type(REFERENCE), method), method
    on = kernels_for("cpu")
    assert on.rms_norm.__func__ is CpuKernels.rms_norm


def test_device_config_switches_name_every_kernel() -> None:
    cfg = load_config(["device.fused.attention=false"]).device
    assert set(cfg.fused.enabled()) == set(KERNELS) - {"attention"}
    assert load_config(["device.kernels=reference"]).device.kernels == "reference"
    with pytest.raises(ConfigError, match="device.kernels='fast' must be auto"):
        load_config(["device.kernels=fast"])
    assert kernels_for("cpu", "reference").name == "reference"


def test_the_model_is_built_with_the_chosen_backend() -> None:
    cfg = load_config(["model=tiny_moe"]).model
    model = build_model(cfg, kernels=kernels_for("cpu"))
    runs = {type(m).__name__: m.kernels.name for m in model.modules() if hasattr(m, "kernels")}
    assert runs and set(runs.values()) == {"cpu"}
    assert {"Linear", "RMSNorm", "MultiHeadLatentAttention", "GroupedExperts", "FeedForward"} <= set(runs)
