"""The block-causal CPU attention kernel: same values and gradients as SDPA, and taken only where it is meant to be."""

import pytest
import torch
import torch.nn.functional as F

from models.kernels import kernels_for
from models.kernels.cpu import attention as cpu_attention
from models.kernels.cpu import native as cpu_native
from models.kernels.cpu.attention import blocked_attention_applies, blocked_causal_attention
from models.ops import apply_rope, rope_real, rope_tables

causal_attention = kernels_for("cpu").causal_attention  # what the model runs on CPU


def sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)


def values_and_grads(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "batch, seq, heads, qk_dim, v_dim",
    [
        (2, 512, 4, 32, 32),  # whole blocks
        (1, 300, 3, 16, 16),  # a short last block
        (2, 130, 2, 24, 16),  # value narrower than query/key, as in multi-head latent attention
        (1, 48, 2, 8, 8),  # shorter than one block
    ],
)
def test_matches_sdpa_values_and_gradients(batch, seq, heads, qk_dim, v_dim):
    generator = torch.Generator().manual_seed(seq)
    q, k = (torch.randn(batch, seq, heads, qk_dim, generator=generator) for _ in range(2))
    v = torch.randn(batch, seq, heads, v_dim, generator=generator)
    grad_out = torch.randn(batch, seq, heads, v_dim, generator=generator)
    ours = values_and_grads(blocked_causal_attention, q, k, v, grad_out)
    reference = values_and_grads(sdpa_reference, q, k, v, grad_out)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), ours, reference):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=name)


def test_later_positions_do_not_reach_earlier_outputs():
    q, k, v = (torch.randn(1, 600, 2, 8) for _ in range(3))
    before = blocked_causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 400:] += 5.0
    v2[:, 400:] -= 3.0
    after = blocked_causal_attention(q, k2, v2)
    assert torch.equal(before[:, :400], after[:, :400])
    assert not torch.allclose(before[:, 400:], after[:, 400:])


def test_taken_for_fp32_cpu_in_its_sequence_range_only():
    def operands(seq, dtype=torch.float32):
        return [torch.zeros(1, seq, 2, 8, dtype=dtype) for _ in range(3)]

    assert blocked_attention_applies(*operands(cpu_attention.MIN_POSITIONS))
    assert blocked_attention_applies(*operands(cpu_attention.MAX_POSITIONS))
    assert not blocked_attention_applies(*operands(cpu_attention.MIN_POSITIONS - 1))
    assert not blocked_attention_applies(*operands(cpu_attention.MAX_POSITIONS + 1))
    assert not blocked_attention_applies(*operands(512, torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not blocked_attention_applies(*operands(512))


@pytest.mark.parametrize("native", [False, True], ids=["python", "cpp"])
def test_causal_attention_routes_grouped_query_heads_through_the_kernel(monkeypatch, native):
    """The Python kernel gets kv heads expanded to every query head; the C++ one reads the shared heads in place."""
    if native and not cpu_native.load():
        pytest.skip("the C++ kernels are not built on this machine")
    monkeypatch.setattr(cpu_native, "NATIVE_EXPECTED", native)
    calls = []
    kernel = cpu_native.causal_attention if native else blocked_causal_attention

    def recording_kernel(*operands):
        calls.append(operands)
        return kernel(*operands)

    monkeypatch.setattr("models.kernels.cpu.native.causal_attention" if native else "models.kernels.cpu.blocked_causal_attention",
                        recording_kernel)
    q = torch.randn(1, 512, 4, 16)
    k, v = torch.randn(1, 512, 2, 16), torch.randn(1, 512, 2, 16)
    out = causal_attention(q, k, v)
    assert len(calls) == 1 and calls[0][1].shape[2] == (2 if native else 4)
    expanded = [t.repeat_interleave(2, dim=2) for t in (k, v)]
    torch.testing.assert_close(out, sdpa_reference(q, *expanded), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rope", [apply_rope, rope_real], ids=["complex", "real"])
def test_rope_rotates_each_pair_by_its_angle(rope):
    seq, dim = 5, 8
    cos, sin = rope_tables(seq, dim, 10000.0, torch.device("cpu"))
    c, s = cos[None, :, None], sin[None, :, None]

    def by_hand(x):
        even, odd = x[..., 0::2].float(), x[..., 1::2].float()
        return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)

    x = torch.randn(2, seq, 3, dim)
    torch.testing.assert_close(rope(x, cos, sin), by_hand(x))
    x = x.bfloat16()  # computed in fp32, returned in the input's dtype
    assert rope(x, cos, sin).dtype == torch.bfloat16
    torch.testing.assert_close(rope(x, cos, sin), by_hand(x))
