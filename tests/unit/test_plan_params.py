"""The parameter inventory against the real model and the parameter counts."""

from __future__ import annotations

import pytest

from models.counts import num_params
from models.transformer import build_model
from parallel.plan.config import load_plan_config
from parallel.plan.params import ParamTensor, chunk_rows, model_tensors, split_shape


def model(name: str):
    return load_plan_config([f"model={name}"]).model


@pytest.mark.parametrize("name, extra", [("tiny", []), ("tiny_moe", []), ("tiny", ["model.qk_norm=true"])])
def test_inventory_names_and_shapes_match_the_meta_model(name: str, extra: list[str]) -> None:
    cfg = load_plan_config([f"model={name}", *extra]).model
    real = {n: tuple(p.shape) for n, p in build_model(cfg, "meta").named_parameters()}
    assert {t.name: t.shape for t in model_tensors(cfg)} == real


@pytest.mark.parametrize("name", ["llama3_405b", "deepseek_v3", "tiny_moe", "qwen3_30b_a3b"])
def test_inventory_adds_up_to_the_parameter_count(name: str) -> None:
    cfg = model(name)
    assert sum(t.numel for t in model_tensors(cfg)) == num_params(cfg)


def test_tensor_and_expert_parallel_split_the_right_dimensions() -> None:
    wq = ParamTensor("wq.weight", (64, 32), 0)
    wo = ParamTensor("wo.weight", (32, 64), 1)
    wk = ParamTensor("wk.weight", (16, 32), 0, max_tp=2)
    experts = ParamTensor("experts.w1", (8, 32, 16), None, expert=True, moe_tp_dim=2)
    assert split_shape(wq, 4, 1) == (16, 32)
    assert split_shape(wo, 4, 1) == (32, 16)
    assert split_shape(wk, 2, 1) == (8, 32)
    assert split_shape(wk, 4, 1) == (16, 32)  # fewer kv heads than tp ranks: kept whole
    assert split_shape(experts, 4, 2) == (4, 32, 16)  # supertrain leaves experts to ep
    assert split_shape(experts, 4, 2, split_experts=True) == (4, 32, 4)


def test_fsdp_chunks_are_ceil_sized_from_the_front() -> None:
    assert [chunk_rows(10, 4, i) for i in range(4)] == [3, 3, 3, 1]
    assert [chunk_rows(3, 4, i) for i in range(4)] == [1, 1, 1, 0]
    assert sum(chunk_rows(1000, 96, i) for i in range(96)) == 1000
