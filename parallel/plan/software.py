"""What the training software does, as far as memory and time depend on it.

The planner plans for supertrain itself (`SUPERTRAIN`): FSDP2 / DDP / DeepSpeed state handling, fused (flash)
attention through SDPA, no dropout, DTensor tensor parallelism without communication overlap. The published runs we
check against used Megatron-LM, whose behaviour in each era is a documented fact of the run, not a fitted constant:
the 2021 runs (Narayanan et al.) had no flash attention (FlashAttention appeared in 2022), dropout 0.1 in GPT-3
style models, fp16 gradients all-reduced after the backward pass; the 2022 runs (Korthikanti et al.) added sequence
parallelism and selective recompute of the attention core; Megatron-Core 0.6 (2024) runs use flash attention,
the distributed optimizer with fp32 gradient buffers, and no gradient-reduce overlap unless `--overlap-grad-reduce`.
`plan.software=` (SOFTWARE_CHOICES) plans for any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.errors import ConfigError
from models.kernels import kernels_for
from parallel.layout import Layout


@dataclass(frozen=True)
class Software:
    name: str
    # Attention as one fused kernel (no seq x seq matrix in memory); unfused kernels write and re-read it.
    flash_attention: bool = True
    # Dropout after attention probabilities and each residual branch (GPT-3 recipe), with its byte masks.
    dropout: bool = False
    # Gradient reduction runs while the backward pass still computes (DDP buckets, FSDP prefetch, ZeRO-2/3).
    overlap_grad_reduce: bool = True
    # FSDP / ZeRO-3 parameter all-gathers run one block ahead of compute.
    overlap_param_gather: bool = True
    # Megatron's distributed optimizer: fp32 master weights and Adam moments sharded over data parallel ranks,
    # bf16 parameters and fp32 gradient buffers replicated.
    distributed_optimizer: bool = False
    # Bytes per element of the gradients that cross the data-parallel links.
    grad_reduce_bytes: int = 4
    # Megatron's mixed precision: bf16/fp16 parameters, fp32 gradient buffers, fp32 master weights and moments.
    megatron_states: bool = False
    # Pipeline sends split over the tensor-parallel ranks and re-gathered on the fast link (Narayanan et al.
    # 2021, s4.1 "scatter/gather"); with sequence parallelism the boundary tensor is already split.
    scatter_gather_p2p: bool = False
    # Tensor parallelism also splits routed and shared experts (Megatron-Core's default expert tensor parallel
    # degree is tp). supertrain leaves MoE blocks whole under tp and shards experts with ep only.
    tp_splits_experts: bool = False
    # The fused attention kernel also takes q/k and v of different head widths (MLA's 192/128). PyTorch's CPU
    # flash kernel does not: SDPA falls back to the math path, which keeps the seq x seq probabilities.
    fused_unequal_head_dims: bool = True
    # The kernel backend (models/kernels/) whose attention the planner asks what it keeps (the CPU's block-causal
    # kernel keeps its probabilities, about seq/2 per query and head, instead of a log-sum-exp); "" = SDPA's.
    kernels: str = ""
    # fp32 RMSNorm, SwiGLU and blocked attention run the CPU backend's fused C++ kernels: a norm keeps its
    # input and 1/rms (not x/rms too), SwiGLU its two inputs (not silu's output too), and selective recompute
    # recomputes the whole attention call (the Python kernel's P @ V outputs were kept as matmul outputs).
    native_cpu_kernels: bool = False
    # Layouts must pass the trainer's rules (parallel/rules.py): true for supertrain, whose plans are run; false for
    # published runs of other software, whose layouts are facts to score, not plans.
    trainer_rules: bool = True
    # Sequence parallelism exists (Megatron-LM gained it in 2022, Korthikanti et al.).
    sequence_parallel: bool = True
    # Under sequence parallelism the linear after a norm saves its all-gathered input (DTensor's SequenceParallel
    # in supertrain); Megatron saves the sequence shard and gathers it again in the backward (Korthikanti et al.
    # 2022 s4.2.2), so norms and their outputs cost 1/tp.
    sp_saves_gathered_input: bool = True
    # Recompute modes the software offers ("selective" is op-level in supertrain; in Megatron it recomputes the
    # attention core: QK^T, softmax, dropout and AV, Korthikanti et al. 2022 s5).
    recompute_modes: tuple[str, ...] = ("none", "selective", "full")
    # Pipeline schedules the software runs (Megatron: 1F1B, interleaved with
    # --virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage).
    schedules: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")

    def fused_attention(self, qk_dim: int, v_dim: int) -> bool:
        return self.flash_attention and (qk_dim == v_dim or self.fused_unequal_head_dims)


SUPERTRAIN = Software("supertrain")
# supertrain on CPU ranks (the `local` cluster): gloo runs its collectives on the same cores that compute, so
# nothing overlaps; PyTorch's CPU flash kernel needs equal q/k and v head widths; fp32 attention of 512-1024
# positions runs our blocked kernel; where this machine builds the C++ kernels, its fused kernels run.
SUPERTRAIN_CPU = Software("supertrain-cpu", overlap_grad_reduce=False, overlap_param_gather=False,
                          fused_unequal_head_dims=False, kernels="cpu",
                          native_cpu_kernels=kernels_for("cpu").native)
MEGATRON_SCHEDULES = ("1f1b", "interleaved_1f1b")
# Narayanan et al. 2021: no flash attention, dropout, fp16 gradients all-reduced after the backward, scatter/gather
# pipeline sends; no sequence parallelism and no selective recompute yet.
MEGATRON_2021 = Software(
    "megatron-lm 2021", flash_attention=False, dropout=True, overlap_grad_reduce=False, overlap_param_gather=False,
    distributed_optimizer=False, grad_reduce_bytes=2, megatron_states=True, scatter_gather_p2p=True,
    tp_splits_experts=True, trainer_rules=False, sequence_parallel=False, recompute_modes=("none", "full"),
    schedules=MEGATRON_SCHEDULES,
)
# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): 2021's Megatron-LM plus
# sequence parallelism and selective recompute of the attention core; still no flash attention.
MEGATRON_2022 = Software(
    "megatron-lm 2022", flash_attention=False, dropout=True, overlap_grad_reduce=False, overlap_param_gather=False,
    distributed_optimizer=False, grad_reduce_bytes=2, megatron_states=True, scatter_gather_p2p=True,
    tp_splits_experts=True, trainer_rules=False, sp_saves_gathered_input=False, schedules=MEGATRON_SCHEDULES,
)
# Megatron-Core 0.6 (2024), and MindSpeed-LLM on Ascend, which runs Megatron's training loop: flash attention,
# sequence parallelism, the distributed optimizer, no gradient-reduce overlap unless --overlap-grad-reduce.
MEGATRON_CORE = Software(
    "megatron-core 0.6", flash_attention=True, dropout=False, overlap_grad_reduce=False, overlap_param_gather=False,
    distributed_optimizer=True, grad_reduce_bytes=4, megatron_states=True, scatter_gather_p2p=True,
    tp_splits_experts=True, trainer_rules=False, sp_saves_gathered_input=False, schedules=MEGATRON_SCHEDULES,
)
SOFTWARE = {s.name: s for s in (SUPERTRAIN, SUPERTRAIN_CPU, MEGATRON_2021, MEGATRON_2022, MEGATRON_CORE)}
# The names plan.software and the `software` column of a published-runs CSV take.
SOFTWARE_CHOICES = {"supertrain": SUPERTRAIN, "megatron-core": MEGATRON_CORE, "megatron-lm-2021": MEGATRON_2021,
                    "megatron-lm-2022": MEGATRON_2022}


def software_named(name: str, host: bool = False) -> Software:
    """The profile for a plan.software / CSV name; supertrain on CPU ranks (`host`) is its CPU profile."""
    if name not in SOFTWARE_CHOICES:
        raise ConfigError(f"software {name!r} is not one of {', '.join(SOFTWARE_CHOICES)}")
    software = SOFTWARE_CHOICES[name]
    return SUPERTRAIN_CPU if host and software is SUPERTRAIN else software


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter element of each training state, and which ones are sharded over data parallel."""

    param: int
    grad: int
    # fp32 master copy kept beside low-precision parameters (0 when the parameters themselves are fp32).
    master: int
    # Adam's two moments.
    moments: int
    # Bytes of the copy gathered or cast for compute.
    compute: int
    param_sharded: bool
    grad_sharded: bool
    optimizer_sharded: bool


def state_bytes(layout: Layout, software: Software, precision: str) -> StateBytes:
    """How each engine stores training state. `precision` is bf16 (mixed) or fp32.

    supertrain's FSDP2 and DDP keep fp32 parameters and gradients and cast to bf16 for compute; DeepSpeed's bf16
    mode keeps bf16 parameters and gradients plus an fp32 master copy, sharding more of them at each ZeRO stage.
    """
    low = 2 if precision == "bf16" else 4
    if software.megatron_states:
        sharded = software.distributed_optimizer
        return StateBytes(low, 4, 4 if low == 2 else 0, 8, low, False, False, sharded)
    if layout.dp_engine == "deepspeed":
        stage = layout.zero_stage
        return StateBytes(low, low, 4 if low == 2 else 0, 8, low, stage >= 3, stage >= 2, stage >= 1)
    sharded = layout.dp_engine == "fsdp"
    return StateBytes(4, 4, 0, 8, low, sharded, sharded, sharded)
