"""ParallelDims: degrees resolved and checked against the world size, the model and the batch, before any process
group exists; every error is one line naming every degree, the world size and the fix."""

import pytest

from configs.errors import ConfigError
from parallel.dims import LayoutError, ParallelDims
from train.config import load_config


def dims(world_size: int, *overrides: str) -> ParallelDims:
    cfg = load_config(list(overrides))
    return ParallelDims.from_config(cfg.parallel, world_size, cfg.model, cfg.train)


def test_dp_shard_fills_the_world():
    d = dims(8, "parallel.dp_replicate=2", "train.micro_batch=2")
    assert (d.dp_replicate, d.dp_shard, d.dp) == (2, 4, 8)


def test_grad_accumulation_keeps_the_global_batch():
    cfg = load_config(["train.global_batch=32", "train.micro_batch=2"])
    d = ParallelDims.from_config(cfg.parallel, 4, cfg.model, cfg.train)
    assert d.grad_accumulation(cfg.train) * d.dp * cfg.train.micro_batch == 32


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        (4, ["parallel.dp_shard=3"], "the product 3 is not the world size"),
        (6, ["parallel.tp=4"], "their product 4 does not divide WORLD_SIZE=6"),
        (4, ["train.global_batch=6", "train.micro_batch=2"], "train.global_batch=6 is not a multiple of dp*micro_batch=4*2=8"),
        (2, ["parallel.vpp=2"], "vpp=2 needs pipeline parallelism"),
        (2, ["parallel.ep=2"], "ep=2 needs an MoE model"),
        (2, ["parallel.pp=2", "model.tie_embeddings=true"], "tied embeddings cannot be split across pipeline stages"),
        (8, ["parallel.pp=8", "model.n_layers=4"], "pp*vpp=8 stages exceed n_layers=4"),
        (2, ["parallel.dp_engine=deepspeed", "parallel.dp_replicate=2"], "dp_engine=deepspeed runs data parallelism only"),
        (2, ["parallel.dp_engine=deepspeed", "parallel.zero_stage=0"], "needs parallel.zero_stage=1, 2 or 3"),
    ],
)
def test_bad_layouts_fail_with_one_line(world, overrides, expected):
    with pytest.raises(ConfigError) as error:
        dims(world, *overrides)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_error_names_every_degree_and_the_world():
    with pytest.raises(LayoutError) as error:
        dims(4, "parallel.dp_shard=3")
    assert str(error.value).startswith("dp_replicate=1 dp_shard=3 cp=1 tp=1 pp=1 ep=1, WORLD_SIZE=4:")


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        (3, ["parallel.tp=3"], "tp=3 does not divide n_heads=8"),
        (2, ["parallel.tp=2", "model.ffn_hidden=771"], "tp=2 does not divide ffn_hidden=771"),
        (2, ["parallel.tp=2", "model.vocab_size=513"], "tp=2 does not divide vocab_size=513"),
        (2, ["parallel.tp=4"], "their product 4 does not divide WORLD_SIZE=2"),
    ],
)
def test_bad_tensor_parallel_layouts(world, overrides, expected):
    with pytest.raises(ConfigError) as error:
        dims(world, *overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_kv_heads_neither_dividing_nor_divided_by_tp():
    three_kv = ["model.n_heads=12", "model.n_kv_heads=3", "model.d_model=384", "model.ffn_hidden=768",
                "model.vocab_size=768"]
    with pytest.raises(LayoutError, match="tp=4 with n_kv_heads=3"):
        dims(4, *three_kv, "parallel.tp=4", "train.micro_batch=16")
    assert dims(3, *three_kv, "parallel.tp=3", "train.micro_batch=16").tp == 3  # splits evenly
    assert dims(4, "model.n_kv_heads=2", "parallel.tp=4", "train.micro_batch=16").tp == 4  # replicated kv heads


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        (3, ["model=tiny_moe", "parallel.ep=3"], "ep=3 does not divide n_routed_experts=8"),
        (4, ["model=tiny_moe", "parallel.ep=4", "parallel.dp_shard=2", "parallel.tp=2"], "ep=4 does not divide dp_shard=2"),
        (1, ["model=tiny_moe", "model.top_k=9"], "model.top_k=9 exceeds n_routed_experts=8"),
        (2, ["model=tiny_moe", "parallel.ep=2", "parallel.dp_engine=ddp"], "ep=2 needs dp_engine=fsdp"),
    ],
)
def test_bad_moe_layouts(world, overrides, expected):
    with pytest.raises(ConfigError) as error:
        dims(world, *overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_deepspeed_without_the_extra_is_one_line(monkeypatch):
    import importlib.util

    from launch.env import RankInfo
    from train.__main__ import prepare

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *more: None if name == "deepspeed" else real_find_spec(name, *more))
    cfg = load_config(["device=cpu", "parallel.dp_engine=deepspeed"])
    with pytest.raises(ConfigError) as error:
        prepare(cfg, RankInfo(rank=0, local_rank=0, world_size=2))
    assert "pip install 'supertrain[deepspeed]'" in str(error.value) and "\n" not in str(error.value)
