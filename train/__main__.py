"""`python -m train [group=option ...] [key=value ...]`, or under torchrun for many ranks.

The config is composed with Hydra's compose API rather than `@hydra.main`: every rank then shares one run folder
(rank 0 picks it and tells the others), nothing changes the working directory, and every config error reaches
the user as one line and exit code 2 instead of a multi-line Hydra report per rank.
Extra flags: `--cfg` prints the composed config and exits; `--help` lists the groups and their options.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from configs.errors import ConfigError
from launch.autoload import defer_device_backends

# Before anything imports torch (the imports above do not; the rest are made lazily): see launch/autoload.py.
defer_device_backends()

if TYPE_CHECKING:  # imported lazily at run time so that --help stays fast
    from launch.device import Device
    from launch.env import RankInfo
    from parallel.dims import ParallelDims
    from train.config import Config
    from train.trainer import Trainer

log = logging.getLogger("supertrain")


def _usage() -> str:
    from configs.loading import config_groups

    lines = [__doc__.strip(), "", "Config groups (pick one with group=option; ./configs/<group>/*.yaml adds options):"]
    for group, options in config_groups().items():
        lines.append(f"  {group:<11} {', '.join(options)}")
    lines.append("Fields and their meaning: configs/schema.py, train/config.py; current values: python -m train --cfg")
    return "\n".join(lines)


def _shared_run_dir(requested: Optional[str], model_name: str, distributed: bool) -> Path:
    """run.dir if given, else outputs/<model>-<time> chosen by rank 0 and broadcast, so all ranks agree."""
    name = [requested or f"outputs/{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(name[0]).resolve()


def _setup_logging(run_dir: Path, rank: int) -> None:
    from tqdm import tqdm

    class _Console(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)  # prints above a live progress bar

    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers.clear()
    console = _Console(level=logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    log.addHandler(console)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file)


def _error(message: str, rank: int) -> None:
    if rank == 0:
        print(f"supertrain: error: {message}", file=sys.stderr, flush=True)


def prepare(cfg: Config, info: RankInfo) -> tuple[Device, ParallelDims]:
    """Every check that needs no process group (device; the layout against the world, the model and the batch), then
    the process set-up: allocator switches, and the model's kernels built or loaded."""
    from configs.schema import DPEngine
    from launch.device import resolve_device
    from models.kernels import prepare_kernels
    from parallel.deepspeed import require_deepspeed
    from parallel.dims import ParallelDims

    device = resolve_device(cfg.device.type)
    dims = ParallelDims.from_config(cfg.parallel, info.world_size, cfg.model, cfg.train)
    if cfg.parallel.dp_engine == DPEngine.deepspeed:
        require_deepspeed()
    if cfg.parallel.compile and not device.supports_compile():
        raise ConfigError(f"parallel.compile=true is not supported on {device.kind}: torch_npu's graph backends have "
                          f"not run under supertrain; set parallel.compile=false")
    device.prepare_process()
    prepare_kernels(device.kind)
    return device, dims


def train_with(cfg: Config, info: RankInfo, device: Device, dims: ParallelDims) -> Trainer:
    """Build the mesh, the run folder and the trainer, and train. A distributed run needs its process group."""
    import torch.distributed as dist
    import yaml

    from launch.env import describe_timeouts, process_group_timeouts, set_group_timeouts
    from train.config import to_plain_dict
    from train.trainer import Trainer

    mesh = dims.build_mesh(device.kind) if info.distributed else None
    timeouts = process_group_timeouts(device, cfg.parallel.init_timeout_s, cfg.parallel.step_timeout_s)
    groups = [dist.group.WORLD, *mesh.groups()] if mesh is not None else []
    set_group_timeouts(groups, device, timeouts.init_s)  # the mesh's groups start with their backend's default
    run_dir = _shared_run_dir(cfg.run.dir, cfg.model.name, info.distributed)
    _setup_logging(run_dir, info.rank)
    if info.rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_plain_dict(cfg), sort_keys=False))
    if info.distributed:
        log.info(describe_timeouts(device, timeouts))
    barrier = _barrier if info.distributed else _no_barrier
    trainer = Trainer(cfg, device, dims, run_dir, info.rank, info.local_rank, mesh, barrier)
    set_group_timeouts(groups, device, timeouts.step_s)
    summary = trainer.fit()
    log.info("done: %s; run folder %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                                   if isinstance(v, float)), run_dir)
    return trainer


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _no_barrier() -> None:
    pass


def run(cfg: Config, info: RankInfo) -> int:
    from launch.env import init_distributed

    try:
        device, dims = prepare(cfg, info)
        if info.distributed:
            init_distributed(device, info, cfg.parallel.init_timeout_s, cfg.parallel.step_timeout_s)
        train_with(cfg, info, device, dims)
    except ConfigError as error:
        _error(str(error), info.rank)
        return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    show_config = "--cfg" in args
    args = [a for a in args if a != "--cfg"]

    from launch.env import rank_info
    from train.config import load_config, to_plain_dict

    info = rank_info()
    try:
        cfg = load_config(args)
    except ConfigError as error:
        _error(str(error), info.rank)
        return 2
    if show_config:
        import yaml

        print(yaml.safe_dump(to_plain_dict(cfg), sort_keys=False), end="")
        return 0
    return run(cfg, info)


if __name__ == "__main__":
    from launch.env import shutdown

    code = 1
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()  # before shutdown's os._exit, which would swallow it
    finally:
        shutdown(code, clean=code == 0)
