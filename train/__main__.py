"""`python -m train [group=option ...] [key=value ...]`, or under torchrun for many ranks.

The config is composed with Hydra's compose API rather than `@hydra.main`: every rank then shares one run folder
(rank 0 picks it and tells the others), nothing changes the working directory, and every config error reaches
the user as one line and exit code 2 instead of a multi-line Hydra report per rank.
Extra flags: `--cfg` prints the composed config and exits; `--help` lists the groups and their options.
"""

from __future__ import annotations

import logging
import os
import re
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
    from launch.env import RankInfo, Started
    from launch.heartbeat import Heartbeat
    from parallel.dims import ParallelDims
    from train.config import Config
    from train.preempt import PreemptionNotice
    from train.trainer import Trainer

log = logging.getLogger("supertrain")


def _usage() -> str:
    from configs.loading import config_groups

    lines = [__doc__.strip(), "", "Config groups (pick one with group=option; ./configs/<group>/*.yaml adds options):"]
    for group, options in config_groups().items():
        lines.append(f"  {group:<11} {', '.join(options)}")
    lines.append("Fields and their meaning: configs/schema.py, train/config.py; current values: python -m train --cfg")
    return "\n".join(lines)


def _shared_run_dir(requested: Optional[str], model_name: str, info: RankInfo) -> Path:
    """run.dir if given, else outputs/<model>-<time>: rank 0 picks it, makes and locks it (train/rundir.py) and tells
    the others, so that all ranks agree, and a folder another job holds stops every rank with rank 0's line."""
    from train.rundir import RunDirError, claim

    path = Path(requested or f"outputs/{model_name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    problem = ""
    if info.rank == 0:
        try:
            claim(path)
        except RunDirError as error:
            problem = str(error)
    if info.distributed:
        import torch.distributed as dist

        shared = [str(path), problem]
        dist.broadcast_object_list(shared, src=0)
        path, problem = Path(shared[0]), shared[1]
    if problem:
        raise RunDirError(problem)
    if info.rank != 0:  # rank 0 made it; a rank on another node sees the folder through its own mount
        try:
            (path / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"run.dir={path} cannot be used on this node: {error.strerror or error}: put run.dir "
                              f"on a filesystem every node shares") from None
    return path


def _setup_logging(run_dir: Path, rank: int) -> None:
    from tqdm import tqdm

    class _Console(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with tqdm.external_write_mode(file=sys.stderr):  # above a live progress bar; one write per line
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()

    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers.clear()
    console = _Console(level=logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    log.addHandler(console)
    file = logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file)


def prepare(cfg: Config, info: RankInfo) -> tuple[Device, ParallelDims]:
    """Every check that needs no process group (device; the layout against the world, the model and the batch), then
    the process set-up: allocator switches, and the model's kernels built or loaded."""
    from configs.schema import DPEngine, NonFinite
    from launch.device import resolve_device
    from models.kernels import kernels_for
    from parallel.deepspeed import require_deepspeed
    from parallel.dims import ParallelDims

    device = resolve_device(cfg.device.type)
    dims = ParallelDims.from_config(cfg.parallel, info.world_size, cfg.model, cfg.train)
    if cfg.parallel.dp_engine == DPEngine.deepspeed:
        require_deepspeed()
        if cfg.train.nonfinite == NonFinite.skip:
            raise ConfigError("train.nonfinite=skip cannot drop an update under DeepSpeed (its engine steps before "
                              "the check): use train.nonfinite=stop or rollback")
    if cfg.parallel.compile and not device.supports_compile():
        raise ConfigError(f"parallel.compile=true is not supported on {device.kind}: torch_npu's graph backends have "
                          f"not run under supertrain; set parallel.compile=false")
    device.prepare_process()
    kernels_for(device.kind, cfg.device.kernels, cfg.device.fused.enabled()).prepare()
    return device, dims


def train_with(cfg: Config, info: RankInfo, device: Device, dims: ParallelDims,
               notice: Optional[PreemptionNotice] = None, started: Optional[Started] = None) -> Trainer:
    """Build the mesh, the run folder and the trainer, and train. A distributed run needs its process group;
    `started` (what init_distributed set up) brings the timeouts and the job's store for the stalled-rank watch."""
    import torch.distributed as dist

    from launch.env import describe_timeouts, flight_recorder_file, set_group_timeouts
    from train.rundir import release
    from train.trainer import Trainer

    mesh = dims.build_mesh(device.kind) if info.distributed else None
    groups = [dist.group.WORLD, *mesh.groups()] if mesh is not None else []
    if started is not None:
        set_group_timeouts(groups, device, started.timeouts.init_s)  # the mesh's groups start with their default
    run_dir = _shared_run_dir(cfg.run.dir, cfg.model.name, info)
    _setup_logging(run_dir, info.rank)
    flight_recorder_file(device, str(run_dir / "logs"))
    watch = _watch(cfg, info, started)
    if started is not None:
        log.info(describe_timeouts(device, started.timeouts))
    barrier = _barrier if info.distributed else _no_barrier
    try:
        trainer = Trainer(cfg, device, dims, run_dir, info.rank, info.local_rank, mesh, barrier, notice,
                          watch.progress if watch else _no_progress)
        if started is not None:
            set_group_timeouts(groups, device, started.timeouts.step_s)
        summary = trainer.fit()
    finally:
        if watch is not None:
            watch.stop()
    if info.rank == 0:
        release(run_dir)
    log.info("done: %s; run folder %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                                   if isinstance(v, float)), run_dir)
    return trainer


def _watch(cfg: Config, info: RankInfo, started: Optional[Started]) -> Optional[Heartbeat]:
    """The stalled-rank watch (launch/heartbeat.py) on its own connection to the job's store; None on one rank or
    with parallel.stall_timeout_s=0."""
    from launch.env import connect_job_store
    from launch.heartbeat import Heartbeat

    stall = cfg.parallel.stall_timeout_s
    if started is None or started.store is None or stall == 0:
        return None
    store = connect_job_store(info, started.timeouts.init_s) or started.store
    slow = max(stall, cfg.parallel.init_timeout_s)  # start-up and the first step build, compile and connect

    def budget_s(phase: str) -> float:
        return stall if phase in ("train step", "evaluation") else slow

    def on_stall(message: str) -> None:
        from train.failures import EXIT_PEER, PeerFailure, report

        log.error(message)
        report(PeerFailure(message), info.rank, True, started.store)
        logging.shutdown()
        os._exit(EXIT_PEER)  # the main thread is blocked in a collective: only this ends the process

    return Heartbeat(store, info.rank, info.world_size, budget_s, on_stall).start()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _no_barrier() -> None:
    pass


def _no_progress(step: int, phase: str) -> None:
    pass


def run(cfg: Config, info: RankInfo, notice: PreemptionNotice) -> int:
    """Train; return the exit code (train/failures.py), having printed the failure's line where it is news."""
    from launch.env import init_distributed
    from train.failures import report

    notice.grace_s = cfg.checkpoint.preempt_grace_s
    try:
        device, dims = prepare(cfg, info)
    except ConfigError as error:  # the config and the layout: the same on every rank, so rank 0 says it
        return report(error, info.rank, info.distributed, everyone=False)
    started = None
    try:
        if info.distributed:
            started = init_distributed(device, info, cfg.parallel.init_timeout_s, cfg.parallel.step_timeout_s)
        train_with(cfg, info, device, dims, notice, started)
    except BaseException as error:  # DCP's CheckpointException and KeyboardInterrupt are not Exceptions
        return _failed(error, info, started.store if started is not None else None)
    finally:
        notice.uninstall()
    return 0


def _failed(error: BaseException, info: RankInfo, store: Optional[object]) -> int:
    """The exit code of a failed run, after its one line (and, for a bug, the traceback) where it is news: a rank
    whose collective broke because another rank failed first stays silent, with exit 4."""
    from train.failures import EXIT_PEER, PeerFailure, first_failure, is_ours, looks_collective, report

    if info.distributed and not is_ours(error) and looks_collective(error):
        if first_failure(store) is not None:
            return EXIT_PEER
        error = PeerFailure(f"a collective failed ({_first_line(error)}): another rank stopped or died; its log "
                            f"(run.dir/logs/rank_<r>.log) or the launcher's summary names it")
    bug = not is_ours(error) and not isinstance(error, KeyboardInterrupt)
    _to_log_files(error, traceback=bug)
    if bug:
        if not info.distributed or first_failure(store) is None:
            import traceback

            traceback.print_exception(error)
    return report(error, info.rank, info.distributed, store)


def _to_log_files(error: BaseException, traceback: bool) -> None:
    """The failure (and a bug's traceback) into this rank's log file, whatever the console shows."""
    from train.failures import error_line

    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, error_line(error, None), (),
                            (type(error), error, error.__traceback__) if traceback else None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _first_line(error: BaseException) -> str:
    """The gist of a collective's error: its first sentence, without gloo's source-file prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text).split(". ")[0]
    return f"{type(error).__name__}: {text[:200]}"


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_usage())
        return 0
    show_config = "--cfg" in args
    args = [a for a in args if a != "--cfg"]

    from launch.env import rank_info
    from train.config import load_config, to_plain_dict
    from train.failures import report
    from train.preempt import PreemptionNotice

    try:
        info = rank_info()
    except ConfigError as error:
        sys.stderr.write(f"supertrain: error: {error}\n")
        return 2
    # From the start: when rank 1 stops on a config error first, torchrun's SIGTERM must not end rank 0 before it
    # has printed the line (the grace period is set once the config is read).
    notice = PreemptionNotice(grace_s=60).install()
    try:
        cfg = load_config(args)
    except ConfigError as error:
        return report(error, info.rank, info.distributed, everyone=False)
    if show_config:
        import yaml

        print(yaml.safe_dump(to_plain_dict(cfg), sort_keys=False), end="")
        return 0
    return run(cfg, info, notice)


if __name__ == "__main__":
    from launch.env import shutdown

    code = 1
    try:
        code = main()
    except KeyboardInterrupt:  # before run() took over (reading the config)
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()  # before shutdown's os._exit, which would swallow it
    finally:
        shutdown(code, clean=code == 0)
