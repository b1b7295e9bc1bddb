"""Typed configs: overrides compose as users expect, and every kind of mistake is one clear line."""

import pytest

from configs.errors import ConfigError
from configs.schema import DPEngine, Precision
from train.config import Config, load_config


def test_default_config_is_typed():
    cfg = load_config([])
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny"
    assert cfg.train.mixed_precision is Precision.bf16
    assert cfg.parallel.dp_engine is DPEngine.fsdp
    assert cfg.logging.mode.value == "offline"
    assert cfg.checkpoint.resume == "auto"


def test_overrides_compose():
    cfg = load_config(["model=llama3_8b", "optim.lr=1e-3", "train.steps=50", "train.seq_len=512", "run.dir=/tmp/x"])
    assert cfg.model.name == "llama3_8b" and cfg.train.seq_len == 512
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 50 and cfg.run.dir == "/tmp/x"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.foo=1", "model.foo: Key 'foo' not in 'ModelConfig'"),
        ("+model.foo=1", "model.foo: Key 'foo' not in 'ModelConfig'"),
        ("+trian.steps=1", "trian: Key 'trian' not in 'Config'"),
        ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.mixed_precision=fp16", "train.mixed_precision: Invalid value 'fp16', expected one of [bf16, fp32]"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("train.micro_batch=5", "train.micro_batch=5 does not divide train.global_batch=16"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 must be > 0 and divide n_heads=8"),
        ("train.seq_len=4096", "train.seq_len=4096 exceeds model.max_seq_len=1024"),
        ("model=tinyy", "Could not find 'model/tinyy'; available: "),
        ("device.type=tpu", "device.type='tpu' is not one of auto, cpu, cuda, npu"),
        ("parallel.pp_schedule=zb", "parallel.pp_schedule='zb' is not one of gpipe, 1f1b"),
        ("data=text", "data.source=text needs data.path"),
        ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    ],
)
def test_bad_config_is_one_line(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_derived_model_fields_come_from_the_chosen_model():
    """head_dim and n_kv_heads default from each model's own shape, not from the schema's defaults."""
    assert load_config(["model=llama3_405b"]).model.head_dim == 128
    cfg = load_config(["model=tiny", "model.n_kv_heads=null", "model.d_model=512"]).model
    assert (cfg.n_kv_heads, cfg.head_dim) == (8, 64)
