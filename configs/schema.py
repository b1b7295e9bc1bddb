"""The typed configuration shared by every package: model shapes, parallel degrees, the device kind and the training
run's batch and precision.

Each dataclass is one Hydra config group (registered as a structured config by `configs.loading`); `__post_init__`
rejects impossible values with a `ConfigError` whose message is one line naming the value and the fix, before any
process group or model exists. Groups only the trainer reads (data, optimizer, logging, checkpoints) live in
train/config.py; the planner's own fields in parallel/plan/config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from configs.errors import ConfigError


def require_finite(group: str, config: Any) -> None:
    """Every float field of a config must be a number: nan and inf pass every `<=` check and would poison training
    silently (optim.lr=nan, train.grad_clip=inf)."""
    for item in fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{group}.{item.name}={value} must be a finite number")

# ---- model ----------------------------------------------------------------------------------------------------


class Activation(str, Enum):
    swiglu = "swiglu"
    gelu = "gelu"


class AttentionKind(str, Enum):
    gqa = "gqa"
    mla = "mla"


class ScoreFn(str, Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


@dataclass
class MoEConfig:
    """Routing behaviour of the MoE layers (shapes live in ModelConfig)."""

    score_fn: ScoreFn = ScoreFn.softmax
    # Renormalise the top-k scores so they sum to one (DeepSeek-V3 does, with sigmoid scores).
    route_norm: bool = True
    # Scale applied to the combined routed output (DeepSeek-V3 uses 2.5).
    route_scale: float = 1.0
    # Auxiliary-loss-free balancing: the per-expert bias moves by this much per step towards even load.
    bias_update_rate: float = 0.001
    # Weight of the optional sequence-wise auxiliary balancing loss (0 = off).
    aux_loss_coef: float = 0.0
    # Tokens an expert may take, as a multiple of the even share; 0 = unlimited (no dropping).
    capacity_factor: float = 0.0
    # Group-limited routing (DeepSeek-V3: 8 groups, 4 kept): experts form n_expert_groups equal groups and a token
    # picks its top_k only among the n_limited_groups groups whose two best experts score highest. 1, 1 = off.
    n_expert_groups: int = 1
    n_limited_groups: int = 1

    def __post_init__(self) -> None:
        require_finite("model.moe", self)
        if self.bias_update_rate < 0:
            raise ConfigError(f"model.moe.bias_update_rate={self.bias_update_rate} must be >= 0")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"model.moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        if self.capacity_factor < 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be >= 0 (0 = no dropping)")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ConfigError(
                f"model.moe.n_limited_groups={self.n_limited_groups} must lie in [1, n_expert_groups="
                f"{self.n_expert_groups}]"
            )


class RopeScalingKind(str, Enum):
    none = "none"
    llama3 = "llama3"  # Llama 3.1: low frequencies divided by `factor`, a smooth band between
    yarn = "yarn"  # YaRN (arXiv 2309.00071) as DeepSeek-V3 uses it; MLA's softmax scale gains mscale^2


@dataclass
class RopeScaling:
    """Rotary frequency scaling for context extension (Hugging Face's `rope_scaling` / `rope_parameters`)."""

    kind: RopeScalingKind = RopeScalingKind.none
    factor: float = 1.0
    # The context the model was pre-trained with, before extension.
    original_max_seq_len: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 0.0  # yarn

    def __post_init__(self) -> None:
        require_finite("model.rope_scaling", self)
        if self.kind != RopeScalingKind.none:
            if self.factor < 1:
                raise ConfigError(f"model.rope_scaling.factor={self.factor} must be >= 1")
            if self.original_max_seq_len <= 0:
                raise ConfigError(f"model.rope_scaling.kind={self.kind.value} needs "
                                  f"model.rope_scaling.original_max_seq_len > 0 (the pre-training context)")
        if self.kind == RopeScalingKind.llama3 and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer. Field names follow Llama / DeepSeek usage."""

    name: str = "custom"
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention).
    n_kv_heads: Optional[int] = None
    ffn_hidden: int = 768
    vocab_size: int = 512
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Per-head width; None means d_model // n_heads.
    head_dim: Optional[int] = None
    activation: Activation = Activation.swiglu
    init_std: float = 0.02
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # RMSNorm over each head's query and key before the rotation (Qwen3).
    qk_norm: bool = False

    # Multi-head latent attention (DeepSeek-V2/V3). Used when attention=mla.
    attention: AttentionKind = AttentionKind.gqa
    q_lora_rank: int = 0  # 0 = full-rank query projection
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    # Mixture of experts. n_routed_experts=0 means every layer is dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    # The first n_dense_layers layers use the dense MLP (ffn_hidden) even in an MoE model.
    n_dense_layers: int = 0
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        require_finite("model", self)
        for key in ("n_layers", "d_model", "n_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be > 0 and divide n_heads={self.n_heads}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide d_model={self.d_model}: set model.head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.attention == AttentionKind.gqa and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention == AttentionKind.mla:
            for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"model.attention=mla needs model.{key} > 0 (got {getattr(self, key)})")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.n_routed_experts:
            if self.top_k <= 0 or self.moe_ffn_hidden <= 0:
                raise ConfigError(
                    f"an MoE model (n_routed_experts={self.n_routed_experts}) needs model.top_k > 0 and "
                    f"model.moe_ffn_hidden > 0 (got top_k={self.top_k}, moe_ffn_hidden={self.moe_ffn_hidden})"
                )
            if self.top_k > self.n_routed_experts:
                raise ConfigError(
                    f"model.top_k={self.top_k} exceeds n_routed_experts={self.n_routed_experts}: "
                    f"lower top_k or add experts"
                )
            if not 0 <= self.n_dense_layers <= self.n_layers:
                raise ConfigError(
                    f"model.n_dense_layers={self.n_dense_layers} must lie in [0, n_layers={self.n_layers}]"
                )
            if self.n_shared_experts < 0:
                raise ConfigError(f"model.n_shared_experts={self.n_shared_experts} must be >= 0")
            groups = self.moe.n_expert_groups
            if self.n_routed_experts % groups:
                raise ConfigError(
                    f"model.moe.n_expert_groups={groups} must divide n_routed_experts={self.n_routed_experts}"
                )
            reachable = self.moe.n_limited_groups * self.n_routed_experts // groups
            if self.top_k > reachable:
                raise ConfigError(
                    f"model.top_k={self.top_k} exceeds the {reachable} experts in model.moe.n_limited_groups="
                    f"{self.moe.n_limited_groups} of {groups} groups: keep more groups or lower top_k"
                )

    # ---- derived shapes -------------------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.is_moe and layer_id >= self.n_dense_layers

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key dot product."""
        if self.attention == AttentionKind.mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == AttentionKind.mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Width of the part of each head that carries rotary position."""
        return self.qk_rope_head_dim if self.attention == AttentionKind.mla else self.head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.is_moe else 0


# ---- device, parallel layout, training run ----------------------------------------------------------------------


class Precision(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


class DPEngine(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class ContextParallelImpl(str, Enum):
    """How attention reaches the keys and values of the other context-parallel ranks (parallel/context.py)."""

    ring = "ring"
    allgather = "allgather"
    ulysses = "ulysses"


class Recompute(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


# Pipeline schedules by name. A plain tuple rather than an Enum: OmegaConf validates enums by member name, and "1f1b"
# is not an identifier. What each one requires lives in parallel/rules.py, shared by the trainer and the planner.
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")


@dataclass
class FusedKernels:
    """Per kernel: the device backend's own version (true) or the reference op (false). Names as models/kernels."""

    linear: bool = True
    rms_norm: bool = True
    swiglu: bool = True
    rope: bool = True
    attention: bool = True
    grouped_mm: bool = True

    def enabled(self) -> list[str]:
        return [item.name for item in fields(self) if getattr(self, item.name)]


@dataclass
class DeviceConfig:
    # auto | cpu | cuda | npu; auto prefers npu, then cuda, then cpu. The names are launch/device.py's, the one
    # module that names accelerators; the trainer's config checks the value against them as it loads.
    type: str = "auto"
    # auto: the device's kernel backend (models/kernels/); reference: plain PyTorch ops everywhere.
    kernels: str = "auto"
    fused: FusedKernels = field(default_factory=FusedKernels)
    # Dense BF16 TFLOP/s of one device (one die on Ascend 910C), for MFU; null = launch/device.py's table (or, on
    # CPU, a matmul measured at start-up). Needed for a device the table does not know.
    peak_tflops: Optional[float] = None

    def __post_init__(self) -> None:
        require_finite("device", self)
        if self.kernels not in ("auto", "reference"):
            raise ConfigError(f"device.kernels={self.kernels!r} must be auto (the device's backend) or reference")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"device.peak_tflops={self.peak_tflops} must be > 0 (or null for the built-in table)")


@dataclass
class ParallelConfig:
    """Degrees of each kind of parallelism. dp_replicate * dp_shard * cp * tp * pp = world size."""

    dp_replicate: int = 1
    # -1: whatever the world size leaves after the other degrees.
    dp_shard: int = -1
    cp: int = 1
    # ring | allgather | ulysses: how context-parallel attention exchanges keys and values (parallel/context.py).
    cp_impl: ContextParallelImpl = ContextParallelImpl.ring
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved schedules).
    vpp: int = 1
    # Expert parallel degree, carved out of dp_shard.
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
    # Seconds without progress (a step, a checkpoint) after which a rank reports the ranks that did not arrive and
    # the job stops (exit 4); 0 = off, leaving only the collectives' own timeout. The watch beats every 5 s, so the
    # default names a stalled rank within 105 s.
    stall_timeout_s: int = 100

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
        if self.stall_timeout_s < 0:
            raise ConfigError(f"parallel.stall_timeout_s={self.stall_timeout_s} must be >= 0 (0 = off)")


class NonFinite(str, Enum):
    stop = "stop"
    skip = "skip"
    rollback = "rollback"


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
    # A step whose gradient norm is not finite, or whose loss spikes: `stop` the run (exit 3), `skip` its update (at
    # most max_skips steps in a row), or `rollback` to the newest checkpoint and leave that batch out from then on
    # (at most max_rollbacks times). No update and no checkpoint is ever made from such a step.
    nonfinite: NonFinite = NonFinite.stop
    max_skips: int = 3
    max_rollbacks: int = 3
    # A loss spike: a loss above the mean of the previous spike_window steps' losses by more than spike_sigmas of
    # their standard deviation (needs spike_window steps first); 0 = no spike detection.
    spike_sigmas: float = 0.0
    spike_window: int = 50

    def __post_init__(self) -> None:
        require_finite("train", self)
        for key in ("steps", "seq_len", "global_batch", "micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.micro_batch={self.micro_batch} does not divide train.global_batch={self.global_batch}"
            )
        # One bound per line, naming the value given (train.grad_clip=-1.0), not every field the check covers.
        bounds = (("grad_clip", 0, ""), ("eval_every", 0, " (0 = never)"), ("eval_batches", 1, ""),
                  ("max_skips", 1, ""), ("max_rollbacks", 1, ""), ("spike_window", 2, ""),
                  ("spike_sigmas", 0, " (0 = off)"))
        for key, least, note in bounds:
            if getattr(self, key) < least:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= {least}{note}")
