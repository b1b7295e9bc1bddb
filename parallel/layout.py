"""A parallel layout as data: every degree plus the choices that trade memory for time. The trainer turns its config
into one (`Layout.of`) to check it against parallel/rules.py; the planner searches over them and writes the best
back as a config.

The rank order is `MESH_DIMS`: pp, dp_replicate, efsdp, ep, cp, tp (pp outermost), where dp_shard = efsdp x ep:
expert parallelism is carved out of the data-parallel shard dimension and `efsdp` counts the ranks that hold the
same experts. `group()` gives each dimension's (size, stride), which is all the topology needs to decide which link
a collective crosses. Pure arithmetic: no torch, so the planner can score hundreds of thousands of layouts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from configs.schema import PP_SCHEDULES, ContextParallelImpl, DPEngine, ParallelConfig, Recompute

# Mesh dimensions, outermost first (parallel/dims.py builds the DeviceMesh in this order).
MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")
SCHEDULES = PP_SCHEDULES
RECOMPUTE = tuple(mode.value for mode in Recompute)
DP_ENGINES = tuple(engine.value for engine in DPEngine)
# ZeRO stage each engine amounts to; DeepSpeed takes its stage from the config.
ENGINE_ZERO_STAGE = {DPEngine.fsdp.value: 3, DPEngine.ddp.value: 0}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    # How context-parallel attention exchanges keys and values: ring | allgather | ulysses (parallel/context.py).
    cp_impl: str = "ring"
    dp_replicate: int = 1
    dp_shard: int = 1
    micro_batch: int = 1
    recompute: str = "none"
    # fsdp = FSDP2 (parameters, gradients and optimizer state sharded over dp_shard: ZeRO-3), ddp = replicated
    # (ZeRO-0), deepspeed = ZeRO stage `zero_stage`.
    dp_engine: str = "fsdp"
    zero_stage: int = 3
    schedule: str = "1f1b"
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        """Ranks that read different sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def stages(self) -> int:
        """Model chunks: pp ranks times vpp chunks each."""
        return self.pp * self.vpp

    @property
    def state_shards(self) -> int:
        """Ranks over which sharded training state is split (FSDP's dp_shard_cp mesh)."""
        return self.dp_shard * self.cp

    @property
    def expert_shards(self) -> int:
        """Ranks over which FSDP shards each expert-parallel rank's experts (the efsdp mesh)."""
        return self.dp_shard // self.ep

    def shard_index(self, rank: int) -> int:
        """This global rank's position in the dp_shard_cp (FSDP) group."""
        cp_i = (rank // self.tp) % self.cp
        shard_i = (rank // (self.tp * self.cp)) % self.dp_shard  # efsdp-major, ep-minor: the dp_shard order
        return shard_i * self.cp + cp_i

    def pp_rank(self, rank: int) -> int:
        return rank // (self.tp * self.cp * self.dp)

    def group(self, dim: str) -> tuple[int, int]:
        """(size, stride) of the process groups along one mesh dimension."""
        inner = {"tp": 1, "cp": self.tp, "ep": self.tp * self.cp, "efsdp": self.tp * self.cp * self.ep,
                 "dp_shard": self.tp * self.cp, "dp_replicate": self.tp * self.cp * self.dp_shard,
                 "pp": self.tp * self.cp * self.dp}
        sizes = {"tp": self.tp, "cp": self.cp, "ep": self.ep, "efsdp": self.dp_shard // self.ep,
                 "dp_shard": self.dp_shard, "dp_replicate": self.dp_replicate, "pp": self.pp}
        return sizes[dim], inner[dim]

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches each pipeline runs per optimizer step."""
        return global_batch // (self.dp * self.micro_batch)

    @classmethod
    def of(cls, parallel: ParallelConfig, dp_shard: int, micro_batch: int) -> "Layout":
        """The layout a trainer config describes, as configured (dp_shard resolved against the world size)."""
        engine = parallel.dp_engine.value
        return cls(
            tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp, cp=parallel.cp, ep=parallel.ep,
            cp_impl=parallel.cp_impl.value, dp_replicate=parallel.dp_replicate, dp_shard=dp_shard, micro_batch=micro_batch,
            recompute=parallel.recompute.value, dp_engine=engine,
            zero_stage=ENGINE_ZERO_STAGE.get(engine, parallel.zero_stage), schedule=parallel.pp_schedule,
            sequence_parallel=parallel.sequence_parallel,
        )

    def to_parallel_config(self, pp_layers: tuple[int, ...] = (), **extra: Any) -> ParallelConfig:
        """The trainer config that runs this layout (`extra`: other ParallelConfig fields, e.g. predicted_step_s)."""
        return ParallelConfig(
            dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, cp=self.cp,
            cp_impl=ContextParallelImpl(self.cp_impl), tp=self.tp, pp=self.pp, vpp=self.vpp,
            ep=self.ep, dp_engine=DPEngine(self.dp_engine),
            # ParallelConfig reads zero_stage only for DeepSpeed; its default otherwise.
            zero_stage=self.zero_stage if self.dp_engine == DPEngine.deepspeed.value else ParallelConfig.zero_stage,
            sequence_parallel=self.sequence_parallel, recompute=Recompute(self.recompute), pp_schedule=self.schedule,
            pp_layers=list(pp_layers) if self.pp > 1 else [], **extra,
        )

    def canonical(self) -> "Layout":
        """The same run with the choices that do not matter to it normalised, as the planner enumerates layouts: DDP
        replicates over every data-parallel rank whatever the split, a run without a pipeline has no schedule
        (recorded as 1f1b), and sequence parallelism needs tensor parallelism."""
        changes: dict[str, Any] = {}
        if self.dp_engine == DPEngine.ddp.value:
            changes.update(dp_replicate=self.dp, dp_shard=1)
        if self.pp == 1:
            changes["schedule"] = "1f1b"
        if self.tp == 1:
            changes["sequence_parallel"] = False
        return replace(self, **changes)

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else "")]
        if self.cp > 1:
            parts.append(f"cp{self.cp}-{self.cp_impl}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        hsdp = self.dp_engine == "fsdp" and self.dp_replicate > 1 and self.dp_shard > 1
        parts.append(f"dp{self.dp_replicate}x{self.dp_shard}" if hsdp else f"dp{self.dp}")
        return " ".join(parts)

    def engine_label(self) -> str:
        if self.dp_engine == "deepspeed":
            return f"zero{self.zero_stage}"
        return "hsdp" if self.dp_engine == "fsdp" and self.dp_replicate > 1 else self.dp_engine
