"""Parallel degrees: validated against the world size, the model and the batch (by the rules the planner uses too,
parallel/rules.py) before any process group exists, then turned into one named DeviceMesh.

Mesh dimensions, outermost first (parallel.layout.MESH_DIMS): pp, dp_replicate, efsdp, ep, cp, tp, where
dp_shard = efsdp x ep: expert parallelism is carved out of the data-parallel shard dimension (DeepSeek / torchtitan
convention), and `efsdp` counts the ranks that hold the same experts. Flattened views: `dp_shard` (efsdp x ep), `dp`
(dp_replicate x dp_shard: the ranks that split the batch), `dp_shard_cp` (what FSDP shards over when context parallel
is on), `pp_dp` (the ranks whose loss shares add up to the global loss under a pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from configs.errors import ConfigError
from configs.schema import ModelConfig, ParallelConfig, TrainConfig
from parallel.layout import MESH_DIMS, Layout
from parallel.rules import layout_problem

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


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
        cls, cfg: ParallelConfig, world_size: int, model: ModelConfig, train: TrainConfig
    ) -> "ParallelDims":
        """Resolve dp_shard=-1 and check every rule of parallel/rules.py, all without a process group."""
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
        product = dp_shard * fixed
        if product != world_size:
            dims._fail(
                f"the product {product} is not the world size",
                "make dp_replicate*dp_shard*cp*tp*pp equal the number of processes (dp_shard=-1 fills the rest)",
            )
        problem = layout_problem(Layout.of(cfg, dp_shard, train.micro_batch), model, train.global_batch,
                                 cfg.pp_layers, train.seq_len)
        if problem is not None:
            dims._fail(problem.what, problem.fix)
        return dims

    def _describe(self) -> str:
        return _degrees(self.dp_replicate, self.dp_shard, self.cp, self.tp, self.pp, self.ep)

    def _fail(self, problem: str, fix: str) -> None:
        raise LayoutError(f"{self._describe()}, WORLD_SIZE={self.world_size}: {problem}: {fix}")

    # ---- derived degrees ------------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Ranks that read different sequences: the batch is split dp ways."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Data-parallel ranks holding the same experts: the shard dimension left after expert parallelism."""
        return self.dp_shard // self.ep

    def grad_accumulation(self, train: TrainConfig) -> int:
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
            # Context-parallel ranks see different tokens of the same sequences: their losses add up too.
            "pp_dp_cp": world["pp", "dp_replicate", "efsdp", "ep", "cp"]._flatten("pp_dp_cp"),
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

    def groups(self) -> list:
        """This rank's process group of every mesh dimension and flattened view (each once)."""
        found = {}
        for mesh in (self.world, *self.flattened.values()):
            for group in mesh.get_all_groups():
                found[group.group_name] = group
        return list(found.values())


def _degrees(dp_replicate: int, dp_shard: int | str, cp: int, tp: int, pp: int, ep: int) -> str:
    return f"dp_replicate={dp_replicate} dp_shard={dp_shard} cp={cp} tp={tp} pp={pp} ep={ep}"
