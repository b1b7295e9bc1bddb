"""The C++ CPU kernels (models/kernels/cpu/native.py, csrc/): same values and gradients as ATen's ops, where they are
taken, and what happens when they cannot be built."""

import logging

import pytest
import torch
import torch.nn.functional as F

from configs.errors import ConfigError
from models.kernels import kernels_for
from models.kernels.cpu import native as cpu_native
from models.kernels.cpu.attention import QUERY_BLOCK

CPU = kernels_for("cpu")  # what the model runs on CPU
causal_attention, rms_norm, swiglu = CPU.causal_attention, CPU.rms_norm, CPU.swiglu
from models.transformer import build_model
from parallel.materialize import canonical_name, materialize
from parallel.recompute import apply_recompute
from train.config import load_config

needs_kernels = pytest.mark.skipif(not cpu_native.load(), reason="the C++ kernels are not built on this machine")


@pytest.fixture(params=["onednn", "aten"])
def matmul_library(request, monkeypatch):
    """The weight gradient multiplies through oneDNN where it runs, else through ATen's mm (CPUs without AVX-512):
    both routes, whatever this CPU."""
    if request.param == "onednn" and not cpu_native.onednn_matmul():
        pytest.skip("oneDNN's matmul does not run on this CPU")
    monkeypatch.setattr(cpu_native.Loaded, "onednn_matmul", request.param == "onednn")
    return request.param


def values_and_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def assert_all_close(ours, reference, names, rtol=1e-5, atol=1e-5):
    for name, a, b in zip(names, ours, reference):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


# ---- where they are taken ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, machine, capability, expected",
    [
        ("auto", "x86_64", "AVX512", True),
        ("auto", "x86_64", "AVX2", True),
        ("auto", "x86_64", "DEFAULT", False),  # no vector build for it
        ("auto", "aarch64", "SVE256", False),  # Kunpeng and other Arm hosts keep ATen's ops
        ("native", "x86_64", "AVX2", True),
        ("aten", "x86_64", "AVX512", False),
    ],
)
def test_route_table(route, machine, capability, expected):
    assert cpu_native.native_expected_for(route, machine, capability) is expected


def test_bad_routes_name_the_variable_and_the_fix():
    with pytest.raises(ValueError) as error:
        cpu_native.native_expected_for("fast", "x86_64", "AVX512")
    assert str(error.value) == "SUPERTRAIN_CPU_KERNELS='fast' is not a route: use one of auto, native, aten"
    with pytest.raises(ValueError) as error:
        cpu_native.native_expected_for("native", "aarch64", "SVE256")
    assert str(error.value) == ("SUPERTRAIN_CPU_KERNELS=native, but there is no build of the kernels for this CPU "
                                "(aarch64, SVE256): unset it or use aten")


def test_kernel_set_up_refuses_a_bad_route(monkeypatch):
    monkeypatch.setattr(cpu_native, "ROUTE_ERROR", "SUPERTRAIN_CPU_KERNELS='fast' is not a route")
    with pytest.raises(ConfigError, match="SUPERTRAIN_CPU_KERNELS='fast'"):
        kernels_for("cpu").prepare()


def test_taken_for_plain_fp32_cpu_tensors_only():
    x = torch.zeros(2, 8)
    assert cpu_native.native_applies(x, x) is cpu_native.load()
    assert not cpu_native.native_applies(x, x.bfloat16())
    assert not cpu_native.native_applies(x.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_native.native_applies(x, x)


# ---- a build that fails ----------------------------------------------------------------------------------------


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """A real build, by the real compiler, of a source that does not compile, in a private extensions folder."""
    source = tmp_path / "cpu_kernels.cpp"
    source.write_text("this is not C++;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpu_native, "SOURCE", source)
    # Its own name too: torch versions a name whose sources change, and the real build must keep its own.
    monkeypatch.setattr(cpu_native, "EXTENSION_NAME", "supertrain_cpu_kernels_broken")
    monkeypatch.setattr(cpu_native, "NATIVE_EXPECTED", True)
    cpu_native.load.cache_clear()
    yield
    cpu_native.load.cache_clear()  # the next caller loads the real build again (already in torch.ops)


@pytest.mark.skipif(not cpu_native.NATIVE_EXPECTED, reason="no build is attempted on this CPU")
def test_a_failed_build_under_auto_warns_once_and_falls_back(broken_build, caplog):
    with caplog.at_level(logging.WARNING, logger="supertrain"):
        assert cpu_native.load() is False
        assert cpu_native.load() is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("fused CPU kernels unavailable, using ATen's ops (set SUPERTRAIN_CPU_KERNELS=aten")
    assert "error" in warnings[0]
    assert not cpu_native.native_applies(torch.zeros(2, 8), torch.zeros(8))


@pytest.mark.skipif(not cpu_native.NATIVE_EXPECTED, reason="no build is attempted on this CPU")
def test_a_failed_build_under_native_stops_the_run(broken_build, monkeypatch):
    monkeypatch.setenv(cpu_native.ROUTE_VARIABLE, "native")
    expected = "SUPERTRAIN_CPU_KERNELS=native, but building cpu_kernels.cpp failed: .*error"
    with pytest.raises(ConfigError, match=expected):
        kernels_for("cpu").prepare()


# ---- values and gradients --------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 100, 96), (3, 512), (1, 1, 17), (70, 33)])
def test_rms_norm_matches_aten(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(shape[-1], generator=generator)
    grad = torch.randn(*shape, generator=generator)
    ours = values_and_grads(lambda x, w: cpu_native.rms_norm(x, w, 1e-5), (x, weight), grad)
    reference = values_and_grads(lambda x, w: F.rms_norm(x, (shape[-1],), w, 1e-5), (x, weight), grad)
    assert_all_close(ours, reference, ("out", "grad_x", "grad_weight"))


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 77, 100), (8192,), (2, 32), (5, 34)])  # 5 x 17 pairs: a scalar tail
def test_swiglu_matches_aten(shape):
    """(gate, up) pairs in, their gradients paired out."""
    generator = torch.Generator().manual_seed(sum(shape))
    gate_up = 3 * torch.randn(*shape, generator=generator)
    grad = 3 * torch.randn(*shape[:-1], shape[-1] // 2, generator=generator)
    ours = values_and_grads(cpu_native.swiglu, (gate_up,), grad)
    reference = values_and_grads(lambda x: F.silu(x[..., 0::2]) * x[..., 1::2], (gate_up,), grad)
    assert_all_close(ours, reference, ("out", "grad_gate_up"))


@needs_kernels
def test_swiglu_takes_a_strided_input_and_refuses_an_odd_width():
    x = torch.randn(6, 40)[::2]  # every other row: not contiguous
    torch.testing.assert_close(cpu_native.swiglu(x), F.silu(x[:, 0::2]) * x[:, 1::2])
    with pytest.raises(RuntimeError, match="must be even"):
        cpu_native.swiglu(torch.randn(3, 7))


def sdpa_reference(q, k, v):
    n_rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(n_rep, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize(
    "batch, seq, heads, kv_heads, qk_dim, v_dim, block",
    [
        (2, 512, 4, 4, 32, 32, 128),  # whole blocks
        (2, 512, 4, 4, 128, 128, QUERY_BLOCK),  # the block the model runs, at Llama's head width
        (1, 300, 3, 3, 16, 16, 128),  # a short last block
        (2, 130, 4, 2, 24, 16, 128),  # grouped-query heads, value narrower than query/key (MLA)
        (1, 64, 2, 1, 8, 8, 128),  # shorter than one block
        (1, 200, 2, 2, 8, 8, 48),  # a block that is not a power of two
        (1, 256, 4, 2, 128, 128, 128),  # Llama's head width: whole register tiles, kv heads packed once per pair
        (1, 160, 2, 2, 40, 56, 64),  # widths with a partial vector of columns after whole ones
    ],
)
def test_attention_matches_sdpa(batch, seq, heads, kv_heads, qk_dim, v_dim, block):
    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(batch, seq, heads, qk_dim, generator=generator)
    k = torch.randn(batch, seq, kv_heads, qk_dim, generator=generator)
    v = torch.randn(batch, seq, kv_heads, v_dim, generator=generator)
    grad = torch.randn(batch, seq, heads, v_dim, generator=generator)
    ours = values_and_grads(lambda q, k, v: cpu_native.causal_attention(q, k, v, block), (q, k, v), grad)
    reference = values_and_grads(sdpa_reference, (q, k, v), grad)
    assert_all_close(ours, reference, ("out", "grad_q", "grad_k", "grad_v"), atol=2e-5)


@needs_kernels
def test_attention_reads_strided_views():
    """q, k and v as column slices of one projection output, as multi-head latent attention hands them over."""
    qkv = torch.randn(2, 512, 3, 4, 16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(cpu_native.causal_attention(q, k, v, 128), sdpa_reference(q, k, v),
                               rtol=1e-5, atol=2e-5)


@needs_kernels
def test_attention_is_causal_and_repeatable():
    q, k, v = (torch.randn(1, 600, 2, 8) for _ in range(3))
    before = cpu_native.causal_attention(q, k, v, 128)
    assert torch.equal(before, cpu_native.causal_attention(q, k, v, 128))
    k2, v2 = k.clone(), v.clone()
    k2[:, 400:] += 5.0
    v2[:, 400:] -= 3.0
    after = cpu_native.causal_attention(q, k2, v2, 128)
    assert torch.equal(before[:, :400], after[:, :400])
    assert not torch.allclose(before[:, 400:], after[:, 400:])


@needs_kernels
@pytest.mark.parametrize("out_features, in_features", [(96, 32), (32, 96), (48, 48)])
def test_weight_gradient_matches_a_float64_product(out_features, in_features, matmul_library):
    grad = torch.randn(3, 100, out_features)
    x = torch.randn(3, 100, in_features)
    ours = torch.ops.supertrain_cpu.linear_weight_grad(grad, x, cpu_native.onednn_matmul())
    reference = grad.reshape(-1, out_features).double().t() @ x.reshape(-1, in_features).double()
    assert ours.is_contiguous() and ours.shape == (out_features, in_features)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-4)


# ---- in the model ------------------------------------------------------------------------------------------------


def _loss_and_grads(cfg, tokens, recompute="none"):
    model = materialize(apply_recompute(build_model(cfg.model, kernels=CPU), recompute), cfg.model, torch.device("cpu"), seed=0)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {canonical_name(name): p.grad for name, p in model.named_parameters()}


@needs_kernels
@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_model_loss_and_gradients_equal_the_aten_route(monkeypatch, model):
    """At 512 positions every fused kernel runs: norms, SwiGLU (dense and routed experts) and attention."""
    cfg = load_config([f"model={model}", "train.seq_len=512"])
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 513), generator=torch.Generator().manual_seed(0))
    native_loss, native_grads = _loss_and_grads(cfg, tokens)
    monkeypatch.setattr(cpu_native, "NATIVE_EXPECTED", False)
    aten_loss, aten_grads = _loss_and_grads(cfg, tokens)
    torch.testing.assert_close(native_loss, aten_loss, rtol=1e-5, atol=0)
    for name, grad in aten_grads.items():
        torch.testing.assert_close(native_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_kernels
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_reproduces_the_gradients(recompute):
    """Recompute re-runs the C++ forward ops in backward (selective keeps only matmul outputs)."""
    cfg = load_config(["model=tiny", "train.seq_len=512"])
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 513), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(cfg, tokens)
    recomputed_loss, recomputed_grads = _loss_and_grads(cfg, tokens, recompute)
    assert torch.equal(loss, recomputed_loss)
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name


@needs_kernels
def test_ops_entry_points_take_the_kernels_and_fall_back():
    x, weight = torch.randn(4, 16), torch.randn(16)
    assert torch.equal(rms_norm(x, weight, 1e-6), cpu_native.rms_norm(x, weight, 1e-6))
    assert torch.equal(swiglu(x), cpu_native.swiglu(x))
    q = torch.randn(1, 512, 2, 8)
    assert torch.equal(causal_attention(q, q, q), cpu_native.causal_attention(q, q, q, 128))
    # bf16 keeps ATen's ops
    torch.testing.assert_close(rms_norm(x.bfloat16(), weight.bfloat16(), 1e-6),
                               F.rms_norm(x.bfloat16(), (16,), weight.bfloat16(), 1e-6))


@needs_kernels
@pytest.mark.parametrize("seq, heads, kv_heads, dim", [(512, 4, 4, 32), (300, 4, 2, 24)])
def test_attention_rotates_q_and_k_like_apply_rope(seq, heads, kv_heads, dim):
    """The rotary embedding done inside the kernel's copies equals apply_rope before attention, gradients included."""
    from models.ops import apply_rope, rope_tables

    generator = torch.Generator().manual_seed(seq)
    q = torch.randn(2, seq, heads, dim, generator=generator)
    k, v = (torch.randn(2, seq, kv_heads, dim, generator=generator) for _ in range(2))
    grad = torch.randn(2, seq, heads, dim, generator=generator)
    rope = rope_tables(seq, dim, 10000.0, torch.device("cpu"))
    ours = values_and_grads(lambda q, k, v: cpu_native.causal_attention(q, k, v, 128, rope), (q, k, v), grad)
    reference = values_and_grads(lambda q, k, v: sdpa_reference(apply_rope(q, *rope), apply_rope(k, *rope), v),
                                 (q, k, v), grad)
    assert_all_close(ours, reference, ("out", "grad_q", "grad_k", "grad_v"), atol=2e-5)


@needs_kernels
def test_attention_gradients_come_back_side_by_side():
    """q, k and v gradients share one buffer, in that order, so a fused q/k/v projection takes them whole."""
    q, k, v = (torch.randn(1, 512, heads, 16, requires_grad=True) for heads in (4, 2, 2))
    grads = torch.autograd.grad(cpu_native.causal_attention(q, k, v, 128).sum(), (q, k, v))
    flat = [g.flatten(2) for g in grads]
    from models.kernels.cpu.linear import _side_by_side

    assert _side_by_side(flat) is not None
