"""Where metrics go: `run.dir/metrics.jsonl` and wandb on rank 0, nothing on the other ranks.

Other ranks get a `NullLogger`, so the loop never asks "am I rank 0?" before logging. The wandb API key is read by
wandb from its own environment or netrc; it is never put into our config, our files or our log lines.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from configs.errors import ConfigError
from train.config import LoggingConfig, LoggingMode


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a run resumed from there logs those steps again)."""

    def finish(self) -> None: ...


class NullLogger:
    """What every rank but 0 logs to."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per call to a file; NaN and infinity become null so that every line is valid JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:  # at start-up, not at the first logged step: a file that cannot be written is bad input
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.open("a").close()
        except OSError as error:
            raise ConfigError(f"{path} cannot be written ({error.strerror or error}): free it, or choose another "
                              f"run.dir") from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop the rows after `step`, so that each step appears once however often the run resumed. The file is
        replaced whole (written beside it, then renamed), so a crash here leaves the old one."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        spare = self.path.with_name(self.path.name + ".tmp")
        spare.write_text("".join(f"{line}\n" for line in kept))
        os.replace(spare, self.path)

    def finish(self) -> None:
        pass


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        if cfg.mode == LoggingMode.online and not _has_wandb_key():
            raise ConfigError(
                "logging.mode=online needs a wandb API key: run `wandb login` or set WANDB_API_KEY, "
                "or use logging.mode=offline"
            )
        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or run_name,
            dir=str(run_dir),
            config=config,
            mode=cfg.mode.value,
            # A resumed run appends to the same wandb run id instead of starting a second one.
            id=_stable_run_id(run_dir),
            resume="allow",
            # We log what we mean to log; wandb's stdout capture would wrap our progress bar and log lines.
            settings=wandb.Settings(console="off"),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: self._chartable(v) for k, v in metrics.items() if v is not None}, step=step)

    def rewind(self, step: int) -> None:
        pass  # wandb keeps a resumed run's history and ignores steps it already has

    def _chartable(self, value: Any) -> Any:
        """A list (tokens per expert) becomes a histogram whose bin i is expert i, so wandb can chart it."""
        if isinstance(value, list):
            return self._wandb.Histogram(np_histogram=(value, list(range(len(value) + 1))))
        return value

    def finish(self) -> None:
        self.run.finish()


def _stable_run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


class FanOutLogger:
    def __init__(self, loggers: list[MetricsLogger]) -> None:
        self.loggers = loggers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def rewind(self, step: int) -> None:
        for logger in self.loggers:
            logger.rewind(step)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_logger(cfg: LoggingConfig, rank: int, run_dir: Path, config: dict[str, Any]) -> MetricsLogger:
    if rank != 0:
        return NullLogger()
    loggers: list[MetricsLogger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.mode != LoggingMode.disabled:
        loggers.append(WandbLogger(cfg, run_dir, config, run_name=run_dir.name))
    return FanOutLogger(loggers)


class Throughput:
    """Tokens/s and MFU over the interval since the previous report.

    An accelerator runs ahead of the host, so the clock is read only after `synchronize` (the device's): otherwise an
    interval would end when the host had queued its steps, not when the device had run them. MFU is None where the
    device's peak is unknown.
    """

    def __init__(self, flops_per_token: float, peak_flops_per_device: Optional[float], world_size: int,
                 synchronize: Callable[[], None] = lambda: None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_total = peak_flops_per_device * world_size if peak_flops_per_device else None
        self.synchronize = synchronize
        self._start = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def restart(self) -> None:
        """Forget time spent outside training steps (evaluation, checkpointing)."""
        self.synchronize()
        self._start = time.perf_counter()
        self._tokens = 0

    def report(self) -> tuple[float, Optional[float]]:
        """(global tokens per second, model FLOPs utilisation) since the last report."""
        self.synchronize()
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        mfu = tokens_per_s * self.flops_per_token / self.peak_total if self.peak_total else None
        self.restart()
        return tokens_per_s, mfu


def format_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if "mfu" in metrics and metrics["mfu"] is not None and math.isfinite(metrics["mfu"]):
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    if "moe/max_mean_load" in metrics:
        parts.append(f"expert load max/mean {metrics['moe/max_mean_load']:.2f}")
    if "memory_bytes" in metrics:
        parts.append(f"mem {metrics['memory_bytes'] / 2**30:.2f} GiB")
    return " | ".join(parts)

