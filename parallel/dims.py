"""Parallel degrees: validated against the world size and the model before any process group exists, then turned
into one named DeviceMesh.

Mesh dimensions, outermost first: pp, dp_replicate, efsdp, ep, cp, tp, where dp_shard = efsdp x ep: expert
parallelism is carved out of the data-parallel shard dimension (DeepSeek / torchtitan convention), and `efsdp`
counts the ranks that hold the same experts. Flattened views: `dp_shard` (efsdp x ep), `dp` (dp_replicate x dp_shard:
the ranks that split the batch), `dp_shard_cp` (what FSDP shards over when context parallel is on), `pp_dp` (the
ranks whose loss shares add up to the global loss under a pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from models.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from train.config import ParallelConfig, TrainConfig

MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")


class LayoutError(ConfigError):
    """A parallel layout that cannot run. The message names every degree, the world size and the fix."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    vpp: int
    ep: int
    world_size: int

    # ---- construction and validation ------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, cfg: "ParallelConfig", world_size: int, model: Optional[ModelConfig] = None,
        train: Optional["TrainConfig"] = None,
    ) -> "ParallelDims":
        """Resolve dp_shard=-1 and check everything that can be checked without a process group."""
        fixed = cfg.dp_replicate * cfg.cp * cfg.tp * cfg.pp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise LayoutError(
                    f"{_degrees(cfg.dp_replicate, 'auto', cfg.cp, cfg.tp, cfg.pp, cfg.ep)}: their product {fixed} "
                    f"does not divide WORLD_SIZE={world_size}: change a degree or the number of processes"
                )
            dp_shard = world_size // fixed
        dims = cls(cfg.dp_replicate, dp_shard, cfg.cp, cfg.tp, cfg.pp, cfg.vpp, cfg.ep, world_size)
        dims._check_world()
        if model is not None:
            dims._check_model(model)
        if train is not None:
            dims._check_batch(train)
        return dims

    def _describe(self) -> str:
        return _degrees(self.dp_replicate, self.dp_shard, self.cp, self.tp, self.pp, self.ep)

    def _fail(self, problem: str, fix: str) -> None:
        raise LayoutError(f"{self._describe()}, WORLD_SIZE={self.world_size}: {problem}: {fix}")

    def _check_world(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp
        if product != self.world_size:
            self._fail(
                f"the product {product} is not the world size",
                "make dp_replicate*dp_shard*cp*tp*pp equal the number of processes (dp_shard=-1 fills the rest)",
            )
        if self.ep > 1 and self.dp_shard % self.ep:
            self._fail(f"ep={self.ep} does not divide dp_shard={self.dp_shard}",
                       "experts are sharded over the data-parallel shard ranks: pick ep dividing dp_shard")
        if self.vpp > 1 and self.pp == 1:
            self._fail(f"vpp={self.vpp} needs pipeline parallelism", "set pp > 1 or vpp=1")

    def _check_model(self, model: ModelConfig) -> None:
        if self.tp > 1:
            for key in ("n_heads", "ffn_hidden", "vocab_size"):
                value = getattr(model, key)
                if value % self.tp:
                    self._fail(f"tp={self.tp} does not divide {key}={value}", f"pick tp dividing {key}")
            if model.is_moe and model.moe_ffn_hidden % self.tp:
                self._fail(f"tp={self.tp} does not divide moe_ffn_hidden={model.moe_ffn_hidden}",
                           "pick tp dividing moe_ffn_hidden")
        stages = self.pp * self.vpp
        if stages > model.n_layers:
            self._fail(f"pp*vpp={stages} stages exceed n_layers={model.n_layers}", "lower pp or vpp")
        if self.pp > 1 and model.tie_embeddings:
            self._fail("tied embeddings cannot be split across pipeline stages", "set model.tie_embeddings=false")
        if self.ep > 1:
            if not model.is_moe:
                self._fail(f"ep={self.ep} needs an MoE model ({model.name} is dense)", "set ep=1")
            if model.n_routed_experts % self.ep:
                self._fail(f"ep={self.ep} does not divide n_routed_experts={model.n_routed_experts}",
                           "pick ep dividing the number of routed experts")

    def _check_batch(self, train: "TrainConfig") -> None:
        per_step = self.dp * train.micro_batch
        if train.global_batch % per_step:
            self._fail(
                f"train.global_batch={train.global_batch} is not a multiple of dp*micro_batch="
                f"{self.dp}*{train.micro_batch}={per_step}",
                "change train.global_batch or train.micro_batch",
            )

    # ---- derived degrees ------------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Ranks that read different sequences: the batch is split dp ways."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Data-parallel ranks holding the same experts: the shard dimension left after expert parallelism."""
        return self.dp_shard // self.ep

    def grad_accumulation(self, train: "TrainConfig") -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        return train.global_batch // (self.dp * train.micro_batch)

    def build_mesh(self, device_type: str) -> "Meshes":
        """The world mesh with every dimension (size-1 ones too, so names always resolve) plus flattened views."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(getattr(self, name) for name in MESH_DIMS)
        world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        flat = {
            "dp_shard": world["efsdp", "ep"]._flatten("dp_shard"),
            "dp": world["dp_replicate", "efsdp", "ep"]._flatten("dp"),
            "dp_shard_cp": world["efsdp", "ep", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": world["dp_replicate", "efsdp", "ep", "cp"]._flatten("dp_cp"),
            "pp_dp": world["pp", "dp_replicate", "efsdp", "ep"]._flatten("pp_dp"),
        }
        return Meshes(world, flat)

    def __str__(self) -> str:
        return self._describe()


class Meshes:
    """The world DeviceMesh and its flattened views, looked up by name: meshes["tp"], meshes["dp"].

    Flattened views are kept here rather than sliced again from the root mesh, which torch is deprecating.
    """

    def __init__(self, world: "DeviceMesh", flattened: dict[str, "DeviceMesh"]) -> None:
        self.world = world
        self.flattened = flattened

    def __getitem__(self, names: str | tuple[str, ...]) -> "DeviceMesh":
        if isinstance(names, str) and names in self.flattened:
            return self.flattened[names]
        return self.world[names]


def _degrees(dp_replicate: int, dp_shard: int | str, cp: int, tp: int, pp: int, ep: int) -> str:
    return f"dp_replicate={dp_replicate} dp_shard={dp_shard} cp={cp} tp={tp} pp={pp} ep={ep}"
