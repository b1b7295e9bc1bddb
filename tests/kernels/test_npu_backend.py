"""The Ascend backend's calls against torch_npu's real op signatures (copied from Ascend's op-plugin into CPU
stand-ins, fake_npu_ops.py): a model on the NPU backend computes the reference model's logits and gradients to 1e-5
(fp32) for GQA, QK-norm, MLA and MoE blocks (with and without capacity dropping), every fused op is called, the
routed experts read no group size on the host, and an op the installed torch_npu lacks (or lacks an argument of)
falls back with one logged line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import fake_npu_ops  # noqa: E402
from launch.device import NPU  # noqa: E402
from models import kernels as kernels_package  # noqa: E402
from models.kernels import REFERENCE, kernels_for  # noqa: E402
from models.kernels import npu as npu_backend  # noqa: E402
from models.kernels.npu import FUSED_OPS, NpuKernels, torch_npu_op  # noqa: E402
from models.kernels.reference import ReferenceKernels  # noqa: E402
from models.moe import MoE  # noqa: E402
from models.transformer import build_model  # noqa: E402
from parallel.materialize import materialize  # noqa: E402
from parallel.recompute import apply_recompute  # noqa: E402
from train.config import load_config  # noqa: E402

fake_npu_ops.install()

MODELS = {
    "gqa": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2"],
    "qwen3_style": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2", "model.qk_norm=true"],
    "mla_moe": ["model=tiny_moe", "model.n_layers=2"],  # query/key width 48 over value width 32
    # GQA with routed (top-2 of 4) and shared experts, then the same with capacity dropping, where the reference sort
    # runs and the fused permutation must not.
    "gqa_moe": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2", "model.n_routed_experts=4", "model.top_k=2",
                "model.moe_ffn_hidden=64", "model.n_shared_experts=1"],
    "gqa_moe_capacity": ["model=tiny", "model.n_layers=2", "model.n_kv_heads=2", "model.n_routed_experts=4",
                         "model.top_k=2", "model.moe_ffn_hidden=64", "model.n_shared_experts=1",
                         "model.moe.capacity_factor=0.5"],
}
PERMUTATION = {"npu_moe_token_permute", "npu_moe_token_unpermute"}


def _run(overrides: list[str], kernels, recompute: str = "none") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = load_config(overrides).model
    model = apply_recompute(materialize(build_model(cfg, kernels=kernels), cfg, torch.device("cpu"), seed=0), recompute)
    tokens = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return logits.detach(), {name.replace("_checkpoint_wrapped_module.", ""): p.grad
                             for name, p in model.named_parameters()}


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
    assert {"npu_rms_norm", "npu_rotary_mul", "npu_fusion_attention", "npu_swiglu"} <= called
    moe_blocks = sum(isinstance(m, MoE) for m in build_model(load_config(MODELS[model]).model).modules())
    # Per MoE block two products forward (gate and up as one, then down), and per product one m-axis and one
    # k-axis product backward.
    assert fake_npu_ops.CALLS.count("npu_grouped_matmul") == 6 * moe_blocks
    fused_permutation = moe_blocks > 0 and model != "gqa_moe_capacity"
    assert PERMUTATION & called == (PERMUTATION if fused_permutation else set())


def _install_torch_npu_without(monkeypatch, missing: str, why: str) -> None:
    """The backend's capability check answers (None, why) for `missing`, as for a torch_npu that lacks it."""
    def without(name, arguments, namespace="npu"):
        return (None, why) if name == missing else torch_npu_op(name, arguments, namespace)

    monkeypatch.setattr(npu_backend, "torch_npu_op", without)


def test_a_missing_op_falls_back_with_one_line(monkeypatch, caplog) -> None:
    _install_torch_npu_without(monkeypatch, "npu_rotary_mul",
                               "torch_npu's npu_rotary_mul takes no rotary_mode (a newer torch_npu has it)")
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


# Reads of a tensor's values into Python: on an NPU each is a stream sync.
_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "numpy")


@pytest.mark.parametrize("backend", ["npu", "reference"])
def test_routed_experts_read_no_group_size_on_the_host(backend: str, monkeypatch) -> None:
    """Forward and backward of the NPU backend's grouped matmul and token permutation never read a value on the
    host; the reference's loop over experts does (counts.tolist()), which shows the check can fail. The methods are
    counted on torch.Tensor itself (a torch-function mode is not active inside autograd's backward); reads inside
    the fake ops, CPU stand-ins that loop, are not the backend's and are not counted."""
    reads, inside_fake = [], [False]
    for name in _HOST_READS:
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if not inside_fake[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def outside_counting(op):
        def call(*args, **kwargs):
            inside_fake[0] = True
            try:
                return op(*args, **kwargs)
            finally:
                inside_fake[0] = False
        return call

    kernels = NpuKernels() if backend == "npu" else ReferenceKernels()
    if backend == "npu":
        for name in ("grouped_mm", "token_permute", "token_unpermute"):
            kernels._ops[name] = outside_counting(kernels._ops[name])
    torch.manual_seed(0)
    tokens = torch.randn(6, 16, requires_grad=True)
    chosen = torch.tensor([[0, 2], [2, 3], [0, 3], [3, 0], [2, 0], [0, 3]])  # expert 1 gets no token
    weights = torch.rand(6, 2, requires_grad=True)
    w1, w2 = torch.randn(4, 16, 8, requires_grad=True), torch.randn(4, 8, 16, requires_grad=True)
    counts = torch.zeros(4, dtype=torch.int64).scatter_add_(0, chosen.flatten(), torch.ones(12, dtype=torch.int64))
    rows, kept, mapping = kernels.permute_tokens(tokens, chosen, weights, counts)
    hidden = kernels.grouped_mm(rows, w1, kept).relu()
    out = kernels.unpermute_tokens(kernels.grouped_mm(hidden, w2, kept), mapping, weights)
    out.square().sum().backward()
    monkeypatch.undo()
    assert all(t.grad is not None for t in (tokens, weights, w1, w2))
    assert (reads == []) == (backend == "npu"), reads


def test_npu_grouped_experts_equal_reference_with_empty_experts_and_no_tokens() -> None:
    """An expert with no rows, and an expert-parallel rank that received no rows at all: output and gradients
    equal the reference loop's (zeros for the weights of experts without rows)."""
    backend = NpuKernels()
    torch.manual_seed(0)
    w = torch.randn(4, 16, 8)
    for counts in (torch.tensor([3, 0, 5, 2]), torch.tensor([0, 0, 0, 0])):
        results = []
        for kernels in (backend, REFERENCE):
            x = torch.randn(int(counts.sum()), 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
            weight = w.clone().requires_grad_()
            out = kernels.grouped_mm(x, weight, counts)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
            results.append((out, x.grad, weight.grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(results[0][2][1], torch.zeros(16, 8))


def test_permutation_ops_follow_each_other(monkeypatch, caplog) -> None:
    """npu_moe_token_unpermute reads npu_moe_token_permute's mapping: a torch_npu with one of them falls back on both
    with one line per cause, and the grouped matmul is unaffected."""
    _install_torch_npu_without(monkeypatch, "npu_moe_token_unpermute", "torch_npu has no npu_moe_token_unpermute")
    with caplog.at_level(logging.WARNING, logger="supertrain"):
        backend = NpuKernels()
    assert [r.getMessage() for r in caplog.records] == [
        "torch_npu has no npu_moe_token_unpermute: the token_unpermute kernel runs the reference ops instead",
        "torch_npu has npu_moe_token_permute without npu_moe_token_unpermute: the token permutation runs the "
        "reference ops instead"]
    assert backend.permute_tokens.__func__ is ReferenceKernels.permute_tokens
    assert backend.unpermute_tokens.__func__ is ReferenceKernels.unpermute_tokens
    assert backend.grouped_mm.__func__ is NpuKernels.grouped_mm


def test_grouped_mm_switched_off_keeps_every_routed_expert_kernel_on_the_reference() -> None:
    backend = NpuKernels(enabled=[kernel for kernel in npu_backend.KERNELS if kernel != "grouped_mm"])
    assert not {"grouped_mm", "token_permute", "token_unpermute"} & set(backend._ops)
    for method in ("grouped_mm", "permute_tokens", "unpermute_tokens"):
        assert getattr(backend, method).__func__ is getattr(ReferenceKernels, method), method


def test_start_up_warns_once_per_missing_op(monkeypatch, caplog) -> None:
    """The process set-up and the trainer both ask for the backend: the second gets the same instance, so a missing
    op's line is logged once per process."""
    _install_torch_npu_without(monkeypatch, "npu_grouped_matmul", "torch_npu has no npu_grouped_matmul")
    kernels_package._backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="supertrain"):
            first = kernels_for(NPU, "auto", ["swiglu", "grouped_mm", "rms_norm", "rope", "attention", "linear"])
            second = kernels_for(NPU, "auto", ["linear", "rms_norm", "swiglu", "rope", "attention", "grouped_mm"])
        other = kernels_for(NPU, "auto", ["rms_norm"])
    finally:
        kernels_package._backend.cache_clear()
    assert second is first and isinstance(first, NpuKernels)
    assert [r.getMessage() for r in caplog.records] == [
        "torch_npu has no npu_grouped_matmul: the grouped_mm kernel runs the reference ops instead"]
    assert first.grouped_mm.__func__ is ReferenceKernels.grouped_mm
    # The token permutation has ops of its own and still runs them.
    assert first.permute_tokens.__func__ is NpuKernels.permute_tokens
    assert other is not first and other.enabled == {"rms_norm"}  # other settings, another backend


def test_selective_recompute_keeps_the_grouped_matmul_outputs() -> None:
    """Under selective recompute the experts' products are kept, not run again in backward (as torch._grouped_mm's
    are on the other devices), and the gradients stay the reference's."""
    overrides = MODELS["gqa_moe"]
    want_logits, want_grads = _run(overrides, REFERENCE)
    fake_npu_ops.CALLS.clear()
    got_logits, got_grads = _run(overrides, NpuKernels(), recompute="selective")
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert fake_npu_ops.CALLS.count("npu_grouped_matmul") == 6 * 2  # two MoE layers; nothing recomputed
    assert fake_npu_ops.CALLS.count("npu_swiglu") > 4  # what is not kept is recomputed
