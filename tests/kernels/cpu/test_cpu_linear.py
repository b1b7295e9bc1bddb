"""fp32 CPU projections through oneDNN: same values and gradients as F.linear, taken only where meant, repeatable,
kept whole by torch.compile and by selective recompute."""

import pytest
import torch
import torch.nn.functional as F

from models import layers
from models.kernels import kernels_for
from models.kernels.cpu import linear as cpu_linear
from models.kernels.cpu import native as cpu_native
from models.kernels.cpu.linear import LINEAR_OP, MIN_FORWARD_MACS, matmul_kernels, onednn_linear, onednn_linear_applies

CPU = kernels_for("cpu")  # what the model runs on CPU
linear = CPU.linear


class Linear(layers.Linear):
    kernels = CPU

pytestmark = pytest.mark.skipif(cpu_linear.ONEDNN_LINEAR is None, reason="this PyTorch build has no oneDNN")


def values_and_grads(fn, x, weight, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.fixture
def preferred(monkeypatch):
    """Take oneDNN whatever this host's CPU (`auto` keeps F.linear on some)."""
    monkeypatch.setattr(cpu_linear, "ONEDNN_PREFERRED", True)


@pytest.fixture
def any_size(monkeypatch, preferred):
    """Route even the small products of these tests through oneDNN."""
    monkeypatch.setattr(cpu_linear, "MIN_FORWARD_MACS", 0)


def assert_matches_f_linear(x, weight, grad_out):
    ours = values_and_grads(onednn_linear, x, weight, grad_out)
    reference = values_and_grads(F.linear, x, weight, grad_out)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 48), (3, 17, 48), (2, 5, 7, 48)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("out_features", [40, 48, 80], ids=["narrowing", "square", "widening"])
def test_values_and_gradients_equal_f_linear(shape, out_features):
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(out_features, 48)
    assert_matches_f_linear(x, weight, torch.randn(*shape[:-1], out_features))


@pytest.mark.parametrize("out_features", [24, 96], ids=["narrowing", "widening"])
def test_weight_gradient_is_contiguous(out_features):
    """The weight gradient is computed over transposed views, yet comes back in the weight's layout (optimizers,
    DDP buckets and FSDP's flat shards expect that)."""
    weight = torch.randn(out_features, 48, requires_grad=True)
    (grad,) = torch.autograd.grad(onednn_linear(torch.randn(64, 48), weight).sum(), weight)  # as the op returns it
    assert grad.is_contiguous()


def test_strided_input_and_gradient():
    torch.manual_seed(0)
    wide = torch.randn(4, 6, 96)
    x = wide[..., ::2]  # non-contiguous last dimension
    weight = torch.randn(24, 48)
    assert_matches_f_linear(x, weight, torch.randn(4, 24, 6).transpose(1, 2))  # a non-contiguous gradient too


def test_repeatable_bit_for_bit():
    torch.manual_seed(0)
    x, weight, grad_out = torch.randn(256, 128), torch.randn(96, 128), torch.randn(256, 96)
    first = values_and_grads(onednn_linear, x, weight, grad_out)
    second = values_and_grads(onednn_linear, x, weight, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_taken_for_big_enough_plain_fp32_cpu_products_without_bias_only(preferred, monkeypatch):
    x, weight = torch.zeros(MIN_FORWARD_MACS // (64 * 8), 8), torch.zeros(64, 8)  # exactly the threshold
    assert onednn_linear_applies(x, weight, None)
    assert not onednn_linear_applies(x[1:], weight, None)
    assert onednn_linear_applies(x, torch.nn.Parameter(weight), None)
    assert not onednn_linear_applies(x, weight, torch.zeros(3))
    assert not onednn_linear_applies(x.bfloat16(), weight.bfloat16(), None)
    assert not onednn_linear_applies(torch.zeros(8), weight, None)
    assert not onednn_linear_applies(torch.zeros(0, 8), weight, None)
    assert not onednn_linear_applies(x.to("meta"), weight.to("meta"), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear_applies(x, weight, None)
    monkeypatch.setattr(cpu_linear, "ONEDNN_PREFERRED", False)
    assert not onednn_linear_applies(x, weight, None)


@pytest.mark.parametrize("route, capability, vendor, expected", [
    ("auto", "AVX512", "AuthenticAMD", True),  # measured: MKL leaves AVX-512 unused there
    ("auto", "AVX2", "AuthenticAMD", False),  # measured: oneDNN's transposed-input copies lose in backward
    ("auto", "AVX512", "GenuineIntel", False),  # MKL's own CPUs
    ("auto", "AVX512", "unknown", True),
    ("aten", "AVX512", "AuthenticAMD", False),
    ("onednn", "AVX2", "GenuineIntel", True),
])
def test_route_follows_the_cpu_unless_overridden(route, capability, vendor, expected):
    assert cpu_linear.onednn_preferred_for(route, capability, vendor) is expected


def test_unknown_route_names_the_variable_and_the_choices():
    with pytest.raises(ValueError) as error:
        cpu_linear.onednn_preferred_for("mkl", "AVX2", "AuthenticAMD")
    assert str(error.value) == "SUPERTRAIN_CPU_LINEAR='mkl' is not a route: use one of auto, onednn, aten"


def test_bad_route_stops_the_kernel_set_up(monkeypatch):
    from configs.errors import ConfigError

    monkeypatch.setattr(cpu_linear, "LINEAR_ROUTE_ERROR", "SUPERTRAIN_CPU_LINEAR='mkl' is not a route")
    with pytest.raises(ConfigError, match="SUPERTRAIN_CPU_LINEAR='mkl'"):
        kernels_for("cpu").prepare()


def test_module_routes_through_the_op_and_keeps_nn_linear_names(monkeypatch, any_size):
    calls = []

    def recording(x, weight):
        calls.append(x.shape)
        return F.linear(x, weight)

    monkeypatch.setattr("models.kernels.cpu.onednn_linear", recording)
    layer = Linear(8, 3, bias=False)
    assert isinstance(layer, torch.nn.Linear) and [n for n, _ in layer.named_parameters()] == ["weight"]
    layer(torch.randn(2, 8))
    assert calls == [torch.Size([2, 8])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    assert len(calls) == 1


def test_selective_recompute_keeps_its_output():
    from torch.utils.checkpoint import CheckpointPolicy

    from parallel.recompute import _keep, saved_ops

    assert _keep(saved_ops(CPU), None, LINEAR_OP) == CheckpointPolicy.MUST_SAVE


def test_compiled_graph_keeps_the_op_and_its_gradients(any_size):
    torch.manual_seed(0)
    x, weight, grad_out = torch.randn(16, 32), torch.randn(8, 32), torch.randn(16, 8)

    def block(x, weight):
        return torch.relu(linear(x, weight)) * 2

    traced_ops = []

    def recording_backend(graph_module, example_inputs):
        traced_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch.compile(block, backend=recording_backend, fullgraph=True)(x, weight)  # fullgraph: no graph break
    assert any("supertrain.onednn_linear" in op for op in traced_ops)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, expected in zip(values_and_grads(compiled, x, weight, grad_out),
                             values_and_grads(block, x, weight, grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not cpu_native.load(), reason="the C++ kernels are not built on this machine")
def test_compiled_backward_keeps_the_weight_gradient_kernel(any_size):
    """Compiled, the weight gradient still runs the C++ kernel (kept whole in the backward graph), not oneDNN's linear
    over transposed views, which copies them first."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    x, weight, grad_out = torch.randn(16, 32), torch.randn(8, 32), torch.randn(16, 8)
    ran = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(func)
            return func(*args, **(kwargs or {}))

    compiled = torch.compile(lambda x, weight: linear(x, weight) * 2, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    out = compiled(*leaves)
    with Record():
        out.backward(grad_out)
    assert torch.ops.supertrain_cpu.linear_weight_grad.default in ran
    assert torch.ops.aten.copy_.default not in ran
    torch.testing.assert_close(leaves[1].grad, (grad_out * 2).t() @ x, rtol=1e-5, atol=1e-5)


def test_cpu_peak_counts_every_matmul_the_model_runs():
    assert set(matmul_kernels(torch.float32)) == {"torch_mm", "onednn"}
    assert set(matmul_kernels(torch.bfloat16)) == {"torch_mm"}
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    torch.testing.assert_close(matmul_kernels(torch.float32)["onednn"](a, b.t().contiguous()), a @ b,
                               rtol=1e-5, atol=1e-4)


def test_grouped_projections_equal_separate_layers(any_size):
    """q, k and v as one product against the stacked weights: the same outputs and gradients as three layers."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 48)
    weights = [torch.randn(out, 48) for out in (32, 16, 16)]
    grads_out = [torch.randn(2, 9, w.shape[0]) for w in weights]

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, *weights)]
        outs = fn(leaves[0], leaves[1:])
        torch.autograd.backward(outs, grads_out)
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    grouped = run(cpu_linear.onednn_linear_group)
    separate = run(lambda x, ws: [F.linear(x, w) for w in ws])
    for got, expected in zip(grouped, separate):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_project_groups_only_on_the_onednn_route(monkeypatch, preferred):
    layers = [Linear(48, 48, bias=False) for _ in range(3)]
    calls = []
    monkeypatch.setattr(cpu_linear, "onednn_linear_group", lambda x, ws: calls.append(len(ws)) or [x] * len(ws))
    monkeypatch.setattr("models.kernels.cpu.onednn_linear_group", cpu_linear.onednn_linear_group)
    project = CPU.project

    project(torch.randn(4, 48), layers)  # too small a product for oneDNN: each layer on its own
    assert calls == []
    monkeypatch.setattr(cpu_linear, "MIN_FORWARD_MACS", 0)
    project(torch.randn(4, 48), layers)
    assert calls == [3]
    project(torch.randn(4, 48).bfloat16(), [layer.bfloat16() for layer in layers])  # not fp32: each layer
    assert calls == [3]


def test_side_by_side_gradients_are_taken_whole_without_a_copy():
    whole = torch.randn(2, 5, 24)
    parts = whole.split([8, 8, 8], dim=-1)
    joined = cpu_linear._side_by_side(parts)
    assert joined is not None and joined.data_ptr() == whole.data_ptr() and torch.equal(joined, whole)
    assert cpu_linear._side_by_side([torch.randn(2, 5, 8) for _ in range(3)]) is None  # separate tensors
    assert cpu_linear._side_by_side([parts[0], parts[2], parts[1]]) is None  # out of order
    assert cpu_linear._side_by_side(torch.randn(2, 5, 30).split(8, dim=-1)[:3]) is None  # a gap after them
