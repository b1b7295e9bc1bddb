"""The planner's typed configuration: `configs/plan.yaml` composes `model/` and `cluster/` over this schema.

`python -m parallel.plan model=deepseek_v3 cluster=cloudmatrix384 plan.global_batch=1536 plan.tp=8` — every plan.*
degree left null is searched; any degree set is kept as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from configs.errors import ConfigError
from configs.loading import load_typed_config
from configs.schema import ModelConfig
from parallel.plan.search import FixedChoices
from parallel.plan.topology import ClusterConfig


@dataclass
class PlanFields(FixedChoices):
    """plan.*: the workload, what to write, and (inherited) every degree or choice the user may fix, null = search:
    tp pp vpp cp ep dp_replicate dp_shard micro_batch recompute (none | selective | full) schedule (gpipe | 1f1b |
    interleaved_1f1b | zero_bubble | dualpipev) dp_engine (fsdp | ddp | deepspeed) zero_stage sequence_parallel."""

    # Sequences per optimizer step; null = 2 per device.
    global_batch: Optional[int] = None
    # Tokens per sequence; null = min(4096, model.max_seq_len).
    seq_len: Optional[int] = None
    # bf16 (mixed precision) or fp32.
    precision: str = "bf16"
    # The training software planned for: supertrain (the default: plans this trainer runs), or the Megatron
    # generation of a published run: megatron-core (0.6+, also MindSpeed-LLM), megatron-lm-2022 (Korthikanti et
    # al.: sequence parallelism and selective recompute, no flash attention), megatron-lm-2021 (Narayanan et al.).
    # Other software's plans are printed, not written as a supertrain parallel config. See parallel/plan/software.py.
    software: str = "supertrain"
    # Rows of the ranked table printed.
    top: int = 10
    # Write the ranked candidates (best first) to this JSON file.
    out: Optional[str] = None
    # Candidates kept in the JSON.
    keep: int = 200
    # Name of the written configs/parallel/<name>.yaml; null = plan_<model>_<cluster>_<devices>.
    name: Optional[str] = None
    # Folder for the parallel config; null = configs/parallel under the current directory, where `python -m train
    # parallel=<name>` finds it when run from that directory.
    config_dir: Optional[str] = None
    # Write the best layout as a parallel config.
    write_config: bool = True
    # PNG of the chosen layout's memory breakdown and pipeline timeline; null = outputs/plan/<name>.png under the
    # current directory; "" = none. Needs matplotlib (the `plot` extra).
    plot: Optional[str] = None
    # Build one rank's real sharded model and optimizer on the meta device under a fake process group of the full
    # world size, and compare its parameter and optimizer bytes with the prediction.
    dry_run: bool = False
    # Which global rank the dry run builds.
    dry_run_rank: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"plan.precision={self.precision!r} must be bf16 or fp32")
        for key in ("global_batch", "seq_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"plan.{key}={value} must be >= 1 (or null for the default)")
        from parallel.plan.software import SOFTWARE_CHOICES

        if self.software not in SOFTWARE_CHOICES:
            raise ConfigError(f"plan.software={self.software!r} is not one of {', '.join(SOFTWARE_CHOICES)}")
        if self.top < 1 or self.keep < 0:
            raise ConfigError(f"plan.top={self.top} must be >= 1 and plan.keep={self.keep} >= 0")


@dataclass
class PlanConfig:
    # MISSING, not ModelConfig(): a default instance would carry its derived fields (head_dim, n_kv_heads) into
    # every model file that leaves them unset (as train/config.py does for the same reason).
    model: ModelConfig = MISSING
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanFields = field(default_factory=PlanFields)


def load_plan_config(overrides: list[str]) -> PlanConfig:
    """Compose configs/plan.yaml with overrides into a validated PlanConfig (ConfigError with one line)."""
    return load_typed_config(overrides, "plan", PlanConfig, "plan_schema")
