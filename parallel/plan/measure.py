"""Measure on real tensors what the memory model predicts, to check it: training-state bytes of a rank, and the
activation bytes one forward pass leaves for backward.

State bytes are counted from storages (deduplicated: FSDP2 gradients of one unit share a buffer, DDP gradients are
views of their buckets), so padding is counted as PyTorch allocates it. Activations are measured two ways:
saved-tensor hooks see exactly what autograd saves (when nothing is checkpointed), and a dispatch-mode tracker sees
every tensor the forward created that is still alive when it returns (what checkpointing keeps, too).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs.schema import DPEngine, ModelConfig, ParallelConfig, Precision, TrainConfig
from parallel.layout import Layout


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding the data: a DTensor's local shard, an async collective result's element."""
    # _local_tensor, not to_local(): the latter returns a fresh view that dies at once.
    tensor = getattr(tensor, "_local_tensor", tensor)
    return getattr(tensor, "elem", tensor)


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (local shards of DTensors)."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in tensors:
        local = _local(tensor)
        if local.numel() == 0 and local.untyped_storage().nbytes() == 0:
            continue
        key = _storage_key(local)
        seen[key] = key[1]
    return sum(seen.values())


def state_bytes(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes this rank holds. Optimizer state is counted by element (it is
    allocated per tensor, unpadded), parameters and gradients by storage."""
    optim = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = _local(value)
                optim += local.numel() * local.element_size()
    return {
        "parameters": storage_bytes(parameters),
        "gradients": storage_bytes(p.grad for p in parameters if p.grad is not None),
        "optimizer": optim,
    }


class SavedTensorMeter:
    """Bytes of distinct storages autograd saves for backward, parameters excluded. Counted when asked, so storage
    that FSDP frees after the forward (resharded weights, saved as views of the gathered buffer) counts as zero."""

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        self._exclude = {_storage_key(_local(p)) for p in parameters}
        self._saved: dict[int, torch.Tensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        local = _local(tensor)
        leaf_parameter = tensor.requires_grad and tensor.grad_fn is None
        if local.device.type != "meta" and not leaf_parameter:
            self._saved[id(local)] = local
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def saved_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        skip = self._exclude | {_storage_key(_local(t)) for t in exclude}
        seen = set()
        for tensor in self._saved.values():
            try:
                seen.add(_storage_key(tensor))
            except RuntimeError:
                continue  # a wrapper without storage of its own; its data is saved under its element
        return sum(key[1] for key in seen if key not in skip)

    @property
    def bytes(self) -> int:
        return self.saved_bytes()


class LiveTensorMeter(TorchDispatchMode):
    """Bytes of storages created inside the context that are still alive when asked (call after the forward,
    while its graph is held): what the forward left behind for backward, recompute or not. A storage is alive
    while any tensor created on it (an op output, a detached copy in a checkpoint cache) is."""

    def __init__(self) -> None:
        super().__init__()
        self._tensors: dict[tuple[int, int], list[weakref.ref]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                local = _local(tensor)  # a DTensor's shard lives as long as the DTensor
                try:
                    key = _storage_key(local)
                except RuntimeError:
                    continue  # a wrapper subclass (e.g. an async collective's result) has no storage of its own
                self._tensors.setdefault(key, []).append(weakref.ref(local))
        return out

    def live_bytes(self, exclude: Iterable[torch.Tensor] = ()) -> int:
        """Current size of every storage still referenced (FSDP frees gathered weights by resizing them to 0)."""
        skip = {_storage_key(_local(t)) for t in exclude}
        total = 0
        for key, refs in self._tensors.items():
            alive = next((t for t in (ref() for ref in refs) if t is not None), None)
            if alive is not None and key not in skip:
                try:
                    total += alive.untyped_storage().nbytes()
                except RuntimeError:
                    continue
        return total


# ---- one rank of a real layout --------------------------------------------------------------------------------


def case_config(model: list[str], layout: dict[str, Any], seq: int, micro_batch: int,
                global_batch: int) -> tuple[ModelConfig, ParallelConfig, TrainConfig]:
    """The configs of a measurement case: a model (config overrides), a layout (parallel.* values), fp32."""
    from omegaconf import OmegaConf

    from parallel.plan.config import load_plan_config

    model_cfg = load_plan_config([*model, "cluster=local"]).model
    parallel = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ParallelConfig), layout))
    train = TrainConfig(seq_len=seq, global_batch=global_batch, micro_batch=micro_batch,
                        mixed_precision=Precision.fp32)
    return model_cfg, parallel, train


def measure_rank(model: list[str], layout: dict[str, Any], seq: int, micro_batch: int, global_batch: int) -> dict:
    """On a rank of an initialized process group: build this rank's part of the model exactly as `train` does
    (parallel/apply.py), run one micro-batch forward and backward and one AdamW step, and measure its training
    state and the activations the forward left for backward. Each pipeline stage is fed its own input, so the
    activations are one micro-batch's on this stage."""
    import torch.distributed as dist

    from models.kernels import kernels_for
    from models.transformer import build_model
    from parallel.apply import parallelize, pipeline_plan
    from parallel.context import BatchSplit
    from parallel.data import apply_ddp
    from parallel.dims import ParallelDims
    from parallel.engine import token_cross_entropy
    from parallel.materialize import materialize
    from parallel.pipeline import build_stage

    model_cfg, parallel, train = case_config(model, layout, seq, micro_batch, global_batch)
    world = dist.get_world_size()
    dims = ParallelDims.from_config(parallel, world, model_cfg, train)
    meshes = dims.build_mesh("cpu")
    device = torch.device("cpu")
    torch.manual_seed(0)
    if dims.pp > 1:
        plan = pipeline_plan(model_cfg, parallel, dims)
        stages = plan.stages_of_rank(meshes["pp"].get_local_rank())
        assert len(stages) == 1, "measure one chunk per pipeline rank"
        first, last = stages[0] == 0, stages[0] == plan.n_stages - 1
        built = build_stage(model_cfg, plan, stages[0], kernels_for("cpu"))
    else:
        first = last = True
        built = build_model(model_cfg, device="meta", kernels=kernels_for("cpu"))
    module = materialize(parallelize(built, model_cfg, parallel, dims, meshes, None), model_cfg, device, 0)
    runner = module
    if parallel.dp_engine == DPEngine.ddp and dims.dp > 1:
        runner = apply_ddp(module, meshes["dp"])
    parameters = list(module.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq))
    # Under context parallelism the rank runs its chunks of the sequence, with their positions.
    cp_rank = meshes["cp"].get_local_rank() if dims.cp > 1 else 0
    tokens, _, extra = BatchSplit(dims.cp, cp_rank)(tokens, tokens)
    local = tokens.shape[1]
    inputs = tokens if first else torch.randn(micro_batch, local, model_cfg.d_model, requires_grad=True)
    # Under tensor parallelism the logits stay split over the vocabulary and the loss runs on the shards.
    loss_context = contextlib.nullcontext
    if dims.tp > 1 and last:
        from torch.distributed.tensor.parallel import loss_parallel as loss_context
    with SavedTensorMeter(parameters) as saved, LiveTensorMeter() as live, loss_context():
        out = runner(inputs, **extra)
        loss = token_cross_entropy(out, tokens) if last else (out.float() * 1e-3).sum()
    # Weights FSDP still holds gathered (the last block, kept for backward) are working state, not activations.
    # A pipeline stage keeps the tensor it received and the one it sent until their backward, like torch's
    # pipelining does; the last stage's logits die once the loss has its log-softmax.
    current = list(module.parameters()) + [inputs, *extra.values()]
    if last:
        del out
    activations = (saved.saved_bytes(exclude=current) if parallel.recompute.value == "none"
                   else live.live_bytes(exclude=current))
    kept = [inputs] if not first else []  # made outside the meters
    if not last and parallel.recompute.value == "none":
        kept.append(out)  # alive, so the live meter already has it; autograd does not save it
    activations += storage_bytes(kept)
    with loss_context():
        loss.backward()
    measured = state_bytes(parameters, optimizer)  # gradients now exist; the optimizer state does not yet
    optimizer.step()
    measured["optimizer"] = state_bytes(parameters, optimizer)["optimizer"]
    measured["activations"] = activations
    return measured


def measure_cases(cases: list[tuple]) -> list[dict]:
    return [measure_rank(*case) for case in cases]


def predict_rank(model: list[str], layout: dict[str, Any], seq: int, micro_batch: int, global_batch: int,
                 rank: int, world: int) -> dict:
    """What the planner predicts for the same case on the same rank."""
    from parallel.plan.config import load_plan_config
    from parallel.plan.estimate import Estimator, Workload
    from parallel.plan.software import SUPERTRAIN_CPU
    from parallel.plan.topology import build_cluster

    model_cfg, p, _ = case_config(model, layout, seq, micro_batch, global_batch)
    dp_shard = p.dp_shard if p.dp_shard > 0 else world // (p.dp_replicate * p.cp * p.tp * p.pp)
    plan_layout = Layout.of(p, dp_shard, micro_batch)
    cluster = build_cluster(load_plan_config(["model=tiny", "cluster=local", f"cluster.num_devices={world}"]).cluster)
    estimator = Estimator(Workload(model_cfg, seq, global_batch, "fp32"), cluster, SUPERTRAIN_CPU,
                          split=tuple(p.pp_layers))
    plans = estimator.rank_plans(plan_layout)
    plan = plans[plan_layout.pp_rank(rank)]
    states = estimator.rank_states(plan_layout, plan, plan_layout.shard_index(rank))[0]
    return {"parameters": states.parameters, "gradients": states.gradients, "optimizer": states.optimizer,
            "activations": estimator.rank_activations(plan_layout, plan).per_micro_batch,
            "stage_layers": list(estimator.stage_split(plan_layout.stages))}
