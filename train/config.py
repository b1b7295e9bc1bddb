"""Typed configuration: one dataclass per config group, registered as Hydra structured configs.

`configs/train.yaml` composes the groups over the `config_schema` node, so a misspelt key or a value of the wrong
type is rejected while composing, and `__post_init__` checks reject impossible values, all before any process group
or model exists. `load_config` turns every such failure into a `ConfigError` whose message is one line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.config import ConfigError, ModelConfig
from train.data import DataConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class Precision(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


class LRSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggingMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class DPEngine(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class Recompute(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


# A plain tuple rather than an Enum: OmegaConf validates enums by member name, and "1f1b" is not an identifier.
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")


@dataclass
class DeviceConfig:
    # auto | cpu | cuda | npu; auto prefers npu, then cuda, then cpu.
    type: str = "auto"

    def __post_init__(self) -> None:
        from launch.device import DEVICE_KINDS

        if self.type not in DEVICE_KINDS:
            raise ConfigError(f"device.type={self.type!r} is not one of {', '.join(DEVICE_KINDS)}")


@dataclass
class ParallelConfig:
    """Degrees of each kind of parallelism. dp_replicate * dp_shard * cp * tp * pp = world size."""

    dp_replicate: int = 1
    # -1: whatever the world size leaves after the other degrees.
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved schedules).
    vpp: int = 1
    # Expert parallel degree, carved out of dp_shard * cp.
    ep: int = 1
    dp_engine: DPEngine = DPEngine.fsdp
    # ZeRO stage for dp_engine=deepspeed (1, 2 or 3).
    zero_stage: int = 1
    sequence_parallel: bool = False
    recompute: Recompute = Recompute.none
    pp_schedule: str = "1f1b"
    # Layers per pipeline stage, overriding the even split (length pp * vpp); empty = even split.
    pp_layers: list[int] = field(default_factory=list)
    compile: bool = False
    # Step time the planner predicted for this layout (it writes this field); the trainer reports its measured step
    # time beside it. None = not planned.
    predicted_step_s: Optional[float] = None
    # Seconds a rank waits for the others while starting up, and for one collective during training.
    init_timeout_s: int = 600
    step_timeout_s: int = 1800

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "cp", "tp", "pp", "vpp", "ep"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 for the rest of the world")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}")
        if self.init_timeout_s <= 0 or self.step_timeout_s <= 0:
            raise ConfigError("parallel.init_timeout_s and parallel.step_timeout_s must be > 0 seconds")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    # The cosine/linear schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: LRSchedule = LRSchedule.cosine

    def __post_init__(self) -> None:
        if self.name != "adamw":
            raise ConfigError(f"optim.name={self.name!r} is not supported: use optim.name=adamw")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.beta1} and optim.beta2={self.beta2} must lie in [0, 1)")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("optim.warmup_steps and optim.weight_decay must be >= 0 and optim.eps > 0")


@dataclass
class LoggingConfig:
    # offline: wandb writes locally (sync later with `wandb sync`); online: needs a key; disabled: no wandb.
    mode: LoggingMode = LoggingMode.offline
    # Steps between metric lines (metrics.jsonl, console, wandb).
    every: int = 10
    project: str = "supertrain"
    entity: Optional[str] = None
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"logging.every={self.every} must be >= 1")


@dataclass
class CheckpointConfig:
    # Steps between checkpoints; 0 = never (a final one is still written at the end unless 0 and no final).
    every: int = 100
    # auto: newest good checkpoint in run.dir, if any; none: start fresh; or the path of a step_<N> folder.
    resume: str = "auto"
    # Save at the last step as well.
    final: bool = True
    # Keep only the newest N committed checkpoints (0 = keep all).
    keep_last: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 (0 = never)")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 = keep all)")


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 0
    seq_len: int = 256
    # Sequences per optimizer step, whatever the layout.
    global_batch: int = 16
    # Sequences per rank per forward pass; gradient accumulation makes up the rest of the global batch.
    micro_batch: int = 8
    mixed_precision: Precision = Precision.bf16
    grad_clip: float = 1.0
    # Steps between evaluations on the held-out split (0 = never); eval_batches global batches each time.
    eval_every: int = 100
    eval_batches: int = 2

    def __post_init__(self) -> None:
        for key in ("steps", "seq_len", "global_batch", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.micro_batch={self.micro_batch} does not divide train.global_batch={self.global_batch}"
            )
        if self.grad_clip < 0 or self.eval_every < 0 or self.eval_batches < 1:
            raise ConfigError("train.grad_clip and train.eval_every must be >= 0 and train.eval_batches >= 1")


@dataclass
class RunConfig:
    # Folder for everything the run writes; default outputs/<model>-<time>, chosen once and shared by all ranks.
    # Point it at an earlier run to resume it.
    dir: Optional[str] = None


@dataclass
class Config:
    # MISSING rather than a default instance: ModelConfig.__post_init__ fills derived fields (head_dim, n_kv_heads),
    # and a default instance would carry the defaults' derived values into every model that does not set them.
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


# ---- loading -------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """Reduce a Hydra / OmegaConf error (often several lines with a traceback hint) to its essential line."""
    cause = error
    while cause.__cause__ is not None and isinstance(cause, HydraException):
        cause = cause.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    text = str(cause)
    if isinstance(cause, OmegaConfBaseException):
        full_key = getattr(cause, "full_key", None)
        message = text.splitlines()[0] if text else type(cause).__name__
        message = re.sub(r"\s+", " ", message).strip()
        if "not in" in message or "not in struct" in message:
            message += " (see every key with: python -m train --cfg)"
        return f"{full_key}: {message}" if full_key else message
    lines = [line.strip() for line in text.splitlines()]
    if "Could not find" in text and "Available options" in text:
        start = next(i for i, line in enumerate(lines) if "Available options" in line) + 1
        end = next((i for i in range(start, len(lines)) if not lines[i] or lines[i].endswith(":")), len(lines))
        return f"{lines[0]}; available: {', '.join(lines[start:end])}"
    lines = [line for line in lines if line]
    return "; ".join(lines[:2]) if lines else type(error).__name__


def _reject_unknown_keys(node: Any, schema: type, path: str) -> None:
    """Hydra's `+key=value` adds keys even to structured nodes; a typed config must not accept them."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full_key = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(f"{full_key}: Key '{key}' not in '{schema.__name__}' (see every key with: python -m train --cfg)")
        child_type = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(child_type):
            _reject_unknown_keys(node[key], child_type, full_key)


def compose_config(overrides: list[str], config_name: str = "train") -> Any:
    """The composed (not yet converted) DictConfig; raises ConfigError with a one-line message."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="supertrain"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None


def load_typed_config(overrides: list[str], config_name: str, schema: type) -> Any:
    """Compose configs/<config_name>.yaml with overrides into a validated instance of the dataclass `schema`."""
    composed = compose_config(overrides, config_name)
    _reject_unknown_keys(composed, schema, "")
    try:
        config = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None
    assert isinstance(config, schema)
    return config


def load_config(overrides: list[str]) -> Config:
    """Compose configs/train.yaml with command-line overrides into a validated `Config`."""
    return load_typed_config(overrides, "train", Config)


def to_plain_dict(config: Config) -> dict:
    """JSON-friendly dict of the whole config (enums as their values), for run.dir/config.yaml and wandb."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
