"""Write any step folder of a run as a Hugging Face folder, on one process or many.

    python -m train.export_hf outputs/run/checkpoints/step_500 [--out DIR] [--dtype bfloat16|float16|float32]
    torchrun --nproc_per_node=8 -m train.export_hf outputs/run/checkpoints/step_500

The model comes from the run's config.yaml; the layout is plain FSDP over the ranks of this command, whatever the
run trained with (the checkpoint reshards on load), so each rank loads and writes about 1/N of the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from configs.errors import ConfigError
from launch.autoload import defer_device_backends

defer_device_backends()


def export_step(step: Path, out: Path, dtype: str) -> Path:
    """Load `step` under FSDP over this job's ranks and export it (a collective under torchrun)."""
    from configs.schema import DPEngine, ParallelConfig
    from launch.env import init_distributed, rank_info
    from parallel.apply import build_engine
    from train.__main__ import prepare
    from train.config import config_of_run
    from train.hf.export import export_hf
    from train.optim import build_optimizer

    config = config_of_run(step.parent.parent / "config.yaml")
    config = dataclasses.replace(config, parallel=ParallelConfig(dp_engine=DPEngine.fsdp))
    info = rank_info()
    device, dims = prepare(config, info)
    if info.distributed:
        init_distributed(device, info, config.parallel.init_timeout_s, config.parallel.step_timeout_s)
    mesh = dims.build_mesh(device.kind) if info.distributed else None
    engine = build_engine(config.model, config.parallel, config.train, device, dims, mesh, info.local_rank,
                          lambda module: build_optimizer(module, config.optim))
    engine.load(step)
    source = Path(config.checkpoint.init_from_hf) if config.checkpoint.init_from_hf else None
    return export_hf(engine.parts, config.model, out, dtype, source)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", type=Path, help="a run's checkpoints/step_<N> folder")
    parser.add_argument("--out", type=Path, help="default: <run>/hf-step_<N>")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    from launch.env import shutdown

    code = 0
    try:
        if not (args.step / ".metadata").is_file():
            raise ConfigError(f"{args.step} is not a checkpoint step folder (no .metadata): point at "
                              f"<run.dir>/checkpoints/step_<N>")
        out = args.out or args.step.parent.parent / f"hf-{args.step.name}"
        written = export_step(args.step.absolute(), out.absolute(), args.dtype)
        sys.stderr.write(f"wrote {written}\n")
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        code = 2
    shutdown(code, clean=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
