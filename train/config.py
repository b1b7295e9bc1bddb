"""The trainer's typed configuration: the groups only the trainer reads (optimizer, logging, checkpoints, run folder;
data in train/data.py) and the root `Config` that composes them with the shared groups of configs/schema.py.

`configs/train.yaml` composes the groups over the `config_schema` node, so a misspelt key or a value of the wrong
type is rejected while composing, and `__post_init__` checks reject impossible values, all before any process group
or model exists. `load_config` turns every such failure into a `ConfigError` whose message is one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf

from configs.errors import ConfigError
from configs.loading import load_typed_config
from configs.schema import DeviceConfig, ModelConfig, ParallelConfig, TrainConfig, require_finite
from launch.device import DEVICE_KINDS
from train.data import DataConfig


class LRSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggingMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


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
        require_finite("optim", self)
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
    # On SIGTERM or SIGUSR1 (a scheduler's notice), every rank stops at the next step boundary and saves; a save that
    # has not finished this many seconds after the signal gives up (exit 75 either way).
    preempt_grace_s: int = 60
    # A Hugging Face model folder (config.json, *.safetensors, index) to start from when there is no checkpoint to
    # resume: each rank reads only the blocks it holds. Its tokenizer becomes data.tokenizer unless that is set.
    init_from_hf: Optional[str] = None
    # At the end of training, write run.dir/hf/: config.json and sharded safetensors that transformers loads.
    export_hf: bool = False
    # Data type of the exported weights: bfloat16 (as published checkpoints) or float32 (exact).
    export_hf_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.export_hf_dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"checkpoint.export_hf_dtype={self.export_hf_dtype!r} must be bfloat16, float16 or "
                              f"float32")
        if self.every < 0:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 (0 = never)")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 = keep all)")
        if self.preempt_grace_s < 1:
            raise ConfigError(f"checkpoint.preempt_grace_s={self.preempt_grace_s} must be >= 1 second")


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
        if self.device.type not in DEVICE_KINDS:
            raise ConfigError(f"device.type={self.device.type!r} is not one of {', '.join(DEVICE_KINDS)}")
        if self.model.name == "from_hf" and not self.checkpoint.init_from_hf:
            raise ConfigError("model=from_hf reads the model's shapes from checkpoint.init_from_hf=<Hugging Face "
                              "folder>: set it, or choose a model config")
        if self.checkpoint.init_from_hf:
            self._start_from_hf(Path(self.checkpoint.init_from_hf))
        uses_hf = self.checkpoint.init_from_hf or self.checkpoint.export_hf
        if uses_hf and self.parallel.dp_engine.value == "deepspeed":
            raise ConfigError("checkpoint.init_from_hf and checkpoint.export_hf need parallel.dp_engine=fsdp or ddp: "
                              "DeepSpeed keeps its own parameter partitions")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )

    def _start_from_hf(self, folder: Path) -> None:
        """checkpoint.init_from_hf: the folder is a Hugging Face model (config.json read now, so a wrong path fails at
        start-up); model=from_hf takes its shapes; its tokenizer is the default."""
        from train.hf.config import adopt_hf_shapes, read_hf_config

        read_hf_config(folder)
        if self.model.name == "from_hf":
            self.model = adopt_hf_shapes(self.model, folder)
        if self.data.tokenizer is None:
            if not (folder / "tokenizer.json").is_file():
                raise ConfigError(f"checkpoint.init_from_hf={folder} has no tokenizer.json to train with: set "
                                  f"data.tokenizer (byte, a tokenizer.json file or a model folder)")
            self.data.tokenizer = str(folder)


def load_config(overrides: list[str]) -> Config:
    """Compose configs/train.yaml with command-line overrides into a validated `Config` (ConfigError: one line)."""
    return load_typed_config(overrides, "train", Config, "config_schema")


def config_of_run(path: Path) -> Config:
    """The Config a run recorded in its config.yaml (`run.dir/config.yaml`), validated as at start-up."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a checkpoint's run folder holds the config.yaml of its run")
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    started_from = merged.checkpoint.init_from_hf
    if started_from and not Path(started_from).is_dir():
        merged.checkpoint.init_from_hf = None  # moved since: the run's own checkpoints hold the weights
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_plain_dict(config: Config) -> dict:
    """JSON-friendly dict of the whole config (enums as their values), for run.dir/config.yaml and wandb."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)
