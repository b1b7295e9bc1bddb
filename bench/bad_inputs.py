"""Bad input, rejected cleanly: `python -m train` given a bad config, corpus, shard, checkpoint, run folder or
environment must stop with a non-zero exit code (2, bad input), one line `supertrain: error: ...` naming the cause,
and nothing already saved lost.

`python -m bench bad_inputs` runs every case in `CASES` as a real process (a few under torchrun with 2 ranks) and
reports how many were rejected cleanly; tests/e2e/test_bad_inputs.py runs the same table under pytest.

Each case runs against a run folder that already holds a finished good run (two checkpoints, config.yaml,
metrics.jsonl): `run.dir` is that folder unless the case points it elsewhere. Rejected cleanly means:

  * exit code 2; under torchrun, whose launcher exits 1, its summary shows the first rank to fail exiting 2 and
    any other exiting 2 too or stopped by the launcher (SIGTERM);
  * exactly one line starting `supertrain: error:`, the last our processes printed, containing the case's text;
    every other line is the run's own progress log (`[HH:MM:SS rankN] ...`), which a good start prints too; no
    traceback, no warning from a library; torchrun's own lines after ours are ignored;
  * every file the good run held is still there, byte for byte (its log files may only grow, and `.lock` holds
    whoever locked the folder last).

A case that shows a known product defect carries `known_defect` (the test marks it xfail, strict): it stays in the
table so that the fix shows up as an unexpected pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench.quick_run import FAST

REPO = Path(__file__).resolve().parent.parent

# The quick run (bench/quick_run.py) with a smaller model (a checkpoint of 2 MB rather than 40) and two steps:
# whatever a case starts, it ends in seconds. It is the good run's command (two committed checkpoints, step_1 and
# step_2) and every case's before its own overrides: a case that changes nothing else is the good run started again.
BASE = [*FAST, "model.d_model=64", "model.ffn_hidden=128", "train.steps=2", "checkpoint.every=1"]

ERROR_PREFIX = "supertrain: error:"
# A line of the run's own log on the console (train/__main__.py `_setup_logging`).
_PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d rank\d+\] ")
# torchrun's own lines: its logger's (glog style: W1206 11:54:06.123000 123 path:line] ...) and the summary of
# ChildFailedError that ends its output.
_LAUNCHER = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_LAUNCHER_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")

Setup = Callable[[Path], Optional[Callable[[], None]]]


@dataclass(frozen=True)
class Case:
    """One bad input. `overrides` and `env` values may name `{work}` (the case's folder), `{run}` (the good run's
    folder, run.dir unless an override sets it) and `{ckpt}` (its checkpoints/). `setup(work)` writes what the case
    needs into the folder after the good run is there and may return a clean-up to call after the run."""

    id: str
    overrides: tuple[str, ...]
    expect: str
    setup: Optional[Setup] = None
    env: dict[str, str] = field(default_factory=dict)
    nproc: int = 1
    # Why the case is not run here (None: it runs).
    skip: Optional[Callable[[], Optional[str]]] = None
    # A product defect this case shows (the test expects it to fail until the defect is fixed).
    known_defect: Optional[str] = None
    timeout_s: float = 180


# ---- the good run ------------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """As a user's shell would start it (tests/conftest.py `clean_env`): no launcher variables, no wandb key."""
    prefixes = ("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC",
                "TORCH_DEVICE_BACKEND_AUTOLOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    if "TORCH_EXTENSIONS_DIR" not in env:  # built kernels stay found when a case points HOME elsewhere
        from torch.utils.cpp_extension import get_default_build_root

        env["TORCH_EXTENSIONS_DIR"] = get_default_build_root()
    env.update(extra)
    return env


def build_good_run(run_dir: Path, timeout_s: float = 300) -> Path:
    """Train the good run every case starts from into `run_dir` (about ten seconds); RuntimeError if it fails."""
    result = _launch([sys.executable, "-m", "train", *BASE, f"run.dir={run_dir}"], clean_env(), timeout_s)
    if result.returncode != 0 or not (run_dir / "checkpoints" / "step_2" / "COMMITTED").is_file():
        raise RuntimeError(f"the good run failed (exit {result.returncode}): {result.stderr[-2000:]}")
    return run_dir


def _launch(cmd: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; past `timeout_s` the whole session (torchrun's ranks too) is killed and the
    result's returncode is None."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, None, out, err)  # type: ignore[arg-type]


# ---- what a case must leave alone --------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under run_dir but `.lock` (its line names the last holder)."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name != ".lock":
            data = path.read_bytes()
            files[path.relative_to(run_dir).as_posix()] = (len(data), _digest(data))
    return files


def lost(run_dir: Path, before: dict[str, tuple[int, str]]) -> list[str]:
    """What of `before` is gone or changed: a log file (logs/) may grow, every other file must be the same bytes."""
    problems = []
    for name, (size, digest) in before.items():
        path = run_dir / name
        if not path.is_file():
            problems.append(f"{name} is gone")
            continue
        data = path.read_bytes()
        if name.startswith("logs/"):
            data = data[:size]
        if len(data) != size or _digest(data) != digest:
            problems.append(f"{name} changed")
    return problems


# ---- judging the output ------------------------------------------------------------------------------------------


def _ours_and_launcher(stderr: str) -> tuple[list[str], list[str]]:
    """Split torchrun's stderr into our ranks' lines and the launcher's (from its first own line on)."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if _LAUNCHER.match(line):
            return lines[:i], lines[i:]
    # No logger line: the launcher's summary is its final traceback of ChildFailedError.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback") and any("ChildFailedError" in rest for rest in lines[i:]):
            return lines[:i], lines[i:]
    return lines, []


def judge(case: Case, result: subprocess.CompletedProcess) -> Optional[str]:
    """None when the process output is a clean rejection for `case`, else why not (short)."""
    if result.returncode is None:
        return f"no exit within {case.timeout_s:.0f}s (hang?); stderr ends: {_tail(result.stderr)}"
    if result.returncode == 0:
        return f"exit 0: the bad input was accepted; stderr ends: {_tail(result.stderr)}"
    if case.nproc == 1:
        ours, launcher = result.stderr.splitlines(), []
        if result.returncode != 2:
            return f"exit {result.returncode}, not 2; stderr ends: {_tail(result.stderr)}"
    else:
        ours, launcher = _ours_and_launcher(result.stderr)
        # The first rank to fail exits 2; torchrun then stops the others with SIGTERM (-15) unless they were done.
        codes = {int(c) for c in _LAUNCHER_EXIT.findall("\n".join(launcher))}
        if 2 not in codes or not codes <= {2, -15}:
            return f"the ranks exited with {sorted(codes) or 'no code torchrun reported'}, not 2; " \
                   f"stderr ends: {_tail(result.stderr)}"
    errors = [line for line in ours if line.startswith(ERROR_PREFIX)]
    if len(errors) != 1:
        return f"{len(errors)} error lines, not 1: {_tail(result.stderr)}"
    if case.expect not in errors[0]:
        return f"the line lacks {case.expect!r}: {errors[0]}"
    others = [line for line in ours if line.strip() and not line.startswith(ERROR_PREFIX) and not _PROGRESS.match(line)]
    if others:
        return f"{len(others)} other line(s) besides the error line, first: {others[0][:200]}"
    if case.nproc == 1 and ours[-1] != errors[0]:
        return f"the error line is not the last line; last: {ours[-1][:200]}"
    return None


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(line[:300] for line in kept) or "(empty)"


# ---- one case ----------------------------------------------------------------------------------------------------


def check(case: Case, workdir: Path, good_run: Optional[Path] = None) -> Optional[str]:
    """Run `case` as a real process in `workdir` (made if need be; it must not hold a `run/` yet) against a copy of
    `good_run` (built there when None); None when it was rejected cleanly, else a short reason. The copy is removed
    when the case passed."""
    workdir.mkdir(parents=True, exist_ok=True)
    if good_run is None:
        good_run = build_good_run(workdir / "good")
    run_dir = workdir / "run"
    shutil.copytree(good_run, run_dir)
    _relocate(run_dir)
    names = {"work": str(workdir), "run": str(run_dir), "ckpt": str(run_dir / "checkpoints")}
    args = [*BASE] + [f"run.dir={run_dir}"] * (not any(o.startswith("run.dir=") for o in case.overrides))
    args += [o.format(**names) for o in case.overrides]
    env = clean_env(**{k: v.format(**names) for k, v in case.env.items()})
    if case.nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
               "-m", "train", *args]
    cleanup = case.setup(workdir) if case.setup is not None else None
    try:
        before = snapshot(run_dir)
        result = _launch(cmd, env, case.timeout_s)
    finally:
        if cleanup is not None:
            cleanup()
    reason = judge(case, result)
    gone = lost(run_dir, before)
    if gone:
        reason = f"{reason}; " if reason else ""
        reason += f"the good run lost: {', '.join(gone[:4])}{' ...' if len(gone) > 4 else ''}"
    if reason is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return reason


def _relocate(run_dir: Path) -> None:
    """Make the copy's config.yaml say run.dir=<the copy>, as if the good run had been trained there: the same
    command started again then finds the same config (train/rundir.py `write_config` keeps it as it is)."""
    import yaml

    path = run_dir / "config.yaml"
    text = path.read_text()
    config = yaml.safe_load(text)
    if yaml.safe_dump(config, sort_keys=False) != text:
        raise RuntimeError(f"{path} is not as train/rundir.py writes it")
    config["run"]["dir"] = str(run_dir)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# ---- set-ups -----------------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _text(name: str, data: bytes | str) -> Setup:
    """A corpus file or folder of files at work/corpus/<name>."""

    def setup(work: Path) -> None:
        _write(work / "corpus" / name, data)

    return setup


def _empty_folder(work: Path) -> None:
    (work / "corpus").mkdir()


def _shards(tokens: list[int] | None = None, vocab_size: int = 257, meta: Optional[dict] = None,
            short_by: int = 0, write_meta: bool = True) -> Setup:
    """Pre-tokenized shards at work/shards as `python -m train.data prepare` writes them, then spoilt as asked."""

    def setup(work: Path) -> None:
        import numpy as np

        folder = work / "shards"
        folder.mkdir()
        data = np.asarray(tokens if tokens is not None else [i % 256 for i in range(20_000)], dtype=np.uint16)
        (folder / "shard_00000.bin").write_bytes(data.tobytes()[: len(data) * 2 - short_by * 2])
        content = {"format": "supertrain-tokens-v1", "dtype": "uint16", "vocab_size": vocab_size, "eos_id": None,
                   "tokenizer": "byte", "num_tokens": len(data),
                   "shards": [{"file": "shard_00000.bin", "tokens": len(data)}]}
        content.update(meta or {})
        if write_meta:
            (folder / "meta.json").write_text(json.dumps(content))

    return setup


def _shards_meta_text(text: str) -> Setup:
    def setup(work: Path) -> None:
        _shards()(work)
        (work / "shards" / "meta.json").write_text(text)

    return setup


def _tokenizer(work: Path) -> None:
    """A real Hugging Face tokenizers file (word level, a handful of words, no end-of-document token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate("def return import class self".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(work / "tokenizer.json"))


def _hf_folder(work: Path) -> None:
    """A Hugging Face folder at work/hf holding the `tiny` model (4 layers), exported by our own code."""
    import torch

    from configs.schema import ModelConfig
    from models.transformer import build_model
    from parallel.materialize import materialize
    from train.hf.export import export_hf

    # `tiny`'s shape, written out: the cases run in threads, and Hydra's compose is not re-entrant.
    cfg = ModelConfig(name="tiny", n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, ffn_hidden=768, vocab_size=512)
    export_hf([materialize(build_model(cfg), cfg, torch.device("cpu"), seed=0)], cfg, work / "hf", "float32")


def _copy_step(step: int = 2, to: str = "bad") -> Callable[[Path], Path]:
    """Copy the good run's step_<step> to work/<to>/step_<step> (so the good run's own stays intact)."""

    def copy(work: Path) -> Path:
        target = work / to / f"step_{step}"
        shutil.copytree(work / "run" / "checkpoints" / f"step_{step}", target)
        return target

    return copy


def _damaged(spoil: Callable[[Path], None], in_run: bool = False) -> Setup:
    """A copy of step_2 at work/bad/step_2, spoilt; `in_run`: spoil every checkpoint of the good run itself."""

    def setup(work: Path) -> None:
        if in_run:
            for folder in sorted((work / "run" / "checkpoints").glob("step_*")):
                spoil(folder)
        else:
            spoil(_copy_step()(work))

    return setup


def _truncate_shard(folder: Path) -> None:
    shard = folder / "__0_0.distcp"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)


def _delete(name: str) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        (folder / name).unlink()

    return spoil


def _overwrite(name: str, data: bytes) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return spoil


def _mark_engine(engine: str) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        info = json.loads((folder / "COMMITTED").read_text())
        (folder / "COMMITTED").write_text(json.dumps({**info, "engine": engine}))

    return spoil


def _uncommitted(work: Path) -> None:
    (_copy_step()(work) / "COMMITTED").unlink()


def _lock_holder(work: Path) -> Callable[[], None]:
    """Another live job holding the good run's lock (train/rundir.py `claim`), stopped after the case."""
    code = ("import sys, time; from pathlib import Path; from train.rundir import claim; claim(Path(sys.argv[1])); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(work / "run")], cwd=REPO, env=clean_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "locked":
        holder.kill()
        raise RuntimeError("the lock holder did not start")

    def stop() -> None:
        holder.kill()
        holder.wait()

    return stop


def _regular_file(name: str) -> Setup:
    def setup(work: Path) -> None:
        _write(work / name, "not a folder\n")

    return setup


def _read_only_folder(work: Path) -> Callable[[], None]:
    folder = work / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return lambda: folder.chmod(0o700)


def _metrics_folder(work: Path) -> None:
    (work / "fresh" / "metrics.jsonl").mkdir(parents=True)


def _empty_home(work: Path) -> None:
    (work / "home").mkdir()


def _root() -> Optional[str]:
    return "running as root, whom chmod does not stop from writing" if os.geteuid() == 0 else None


# ---- the table ---------------------------------------------------------------------------------------------------

_LONG = "x" * 300
# train/__main__.py `train_with` writes run.dir/config.yaml (the previous one moved aside as config.1.yaml) before
# Trainer.fit() loads the checkpoint and reads the first batch: a start refused there has replaced the good run's.
def _cases() -> list[Case]:
    c = Case
    on_file = "{work}/bad/step_2"  # a damaged copy of the good run's step_2
    return [
        # -- config keys and types --
        c("unknown_model_key", ("model.foo=1",), "model.foo: Key 'foo' not in 'ModelConfig'"),
        c("unknown_top_key", ("nosuch=1",), "nosuch"),
        c("unknown_added_key", ("+optim.momentum=0.9",), "optim.momentum: Key 'momentum' not in 'OptimConfig'"),
        c("wrong_type_int", ("train.steps=many",), "train.steps"),
        c("wrong_type_float", ("optim.lr=fast",), "optim.lr"),
        # -- sizes --
        c("zero_layers", ("model.n_layers=0",), "model.n_layers=0 must be > 0"),
        c("negative_d_model", ("model.d_model=-64",), "model.d_model=-64 must be > 0"),
        c("zero_micro_batch", ("train.micro_batch=0",), "train.micro_batch=0 must be >= 1"),
        c("heads_not_dividing", ("model.n_heads=3", "model.n_kv_heads=3"),
          "model.n_heads=3 does not divide d_model=64"),
        # -- numbers that are not numbers, or out of range --
        c("lr_inf", ("optim.lr=inf",), "optim.lr=inf must be a finite number"),
        c("lr_nan", ("optim.lr=nan",), "optim.lr=nan must be a finite number"),
        c("lr_negative", ("optim.lr=-1",), "optim.lr=-1.0 must be > 0"),
        c("grad_clip_nan", ("train.grad_clip=nan",), "train.grad_clip=nan must be a finite number"),
        c("grad_clip_negative", ("train.grad_clip=-1",), "train.grad_clip=-1.0 must be >= 0"),
        c("grad_clip_inf", ("train.grad_clip=inf",), "train.grad_clip=inf must be a finite number"),
        c("eps_nan", ("optim.eps=nan",), "optim.eps=nan must be a finite number"),
        c("norm_eps_nan", ("model.norm_eps=nan",), "model.norm_eps=nan must be a finite number"),
        c("route_scale_inf", ("model.moe.route_scale=-inf",), "model.moe.route_scale=-inf must be a finite number"),
        c("peak_tflops_nan", ("device.peak_tflops=nan",), "device.peak_tflops=nan must be a finite number"),
        # -- enums and names --
        c("nonfinite_maybe", ("train.nonfinite=maybe",), "train.nonfinite"),
        c("pp_schedule_unknown", ("parallel.pp_schedule=zigzag",), "parallel.pp_schedule='zigzag' is not one of"),
        c("mixed_precision_fp8", ("train.mixed_precision=fp8",), "train.mixed_precision"),
        c("model_option_unknown", ("model=nosuch",), "'model/nosuch'"),
        # -- layouts --
        c("tp_three", ("parallel.tp=3",), "does not divide WORLD_SIZE=1"),
        c("batch_not_divisible", ("train.global_batch=6",), "train.micro_batch=4 does not divide train.global_batch=6"),
        c("pp_beyond_layers", ("parallel.pp=2", "model.n_layers=1"), "pp*vpp=2 stages exceed n_layers=1", nproc=2),
        # -- timeouts, checkpoints, guards --
        c("stall_timeout_negative", ("parallel.stall_timeout_s=-1",), "parallel.stall_timeout_s=-1 must be >= 0"),
        c("preempt_grace_zero", ("checkpoint.preempt_grace_s=0",), "checkpoint.preempt_grace_s=0 must be >= 1"),
        c("checkpoint_every_negative", ("checkpoint.every=-1",), "checkpoint.every=-1 must be >= 0"),
        c("max_skips_zero", ("train.max_skips=0",), "train.max_skips=0 must be >= 1"),
        c("spike_window_one", ("train.spike_window=1",), "train.spike_window=1 must be >= 2"),
        c("skip_under_deepspeed", ("train.nonfinite=skip", "parallel.dp_engine=deepspeed"),
          "train.nonfinite=skip cannot drop an update under DeepSpeed"),
        # -- devices, routes, accounts --
        c("device_npu_missing", ("device=npu",), "device=npu needs torch_npu"),
        c("cpu_linear_route", (), "SUPERTRAIN_CPU_LINEAR='blas' is not a route", env={"SUPERTRAIN_CPU_LINEAR": "blas"}),
        c("wandb_online_without_key", ("logging.mode=online",), "logging.mode=online needs a wandb API key",
          setup=_empty_home, env={"HOME": "{work}/home"}),
        # -- corpora, shards and tokenizers --
        c("text_missing_path", ("data=text", "data.path={work}/nosuch"), "does not exist"),
        c("text_empty_folder", ("data=text", "data.path={work}/corpus"), "is a folder with no files in it",
          setup=_empty_folder),
        c("text_nul_bytes", ("data=text", "data.path={work}/corpus"), "blob.txt is not a text file (it holds NUL",
          setup=_text("blob.txt", b"print('hi')\n\0\0\0\x01\x02" * 2000)),
        c("text_random_bytes", ("data=text", "data.path={work}/corpus/noise.bin"), "noise.bin is not a text file",
          setup=_text("noise.bin", bytes((i * 167 + 13) % 128 + 128 for i in range(50_000)))),
        c("text_too_small", ("data=text", "data.path={work}/corpus/tiny.txt"), "use more text or a shorter",
          setup=_text("tiny.txt", "a few words, far fewer than one sequence of 64 tokens\n")),
        c("tokenizer_missing", ("data.tokenizer={work}/nosuch.json",), "is neither 'byte' nor an existing"),
        c("eos_not_in_vocab", ("data.tokenizer={work}/tokenizer.json", "data.eos_token='<|nosuch|>'"),
          "data.eos_token='<|nosuch|>' is not in the vocabulary", setup=_tokenizer),
        c("memmap_no_meta", ("data=memmap", "data.path={work}/shards"), "has no meta.json",
          setup=_shards(write_meta=False)),
        c("memmap_wrong_format", ("data=memmap", "data.path={work}/shards"), "format is 'something-else'",
          setup=_shards(meta={"format": "something-else"})),
        c("memmap_short_shard", ("data=memmap", "data.path={work}/shards"), "shard_00000.bin is missing or not",
          setup=_shards(short_by=100)),
        c("memmap_beyond_vocab", ("data=memmap", "data.path={work}/shards", "checkpoint.resume=none"),
          "beyond the vocabulary of 257 ids", setup=_shards(tokens=[300] * 20_000, vocab_size=257)),
        c("memmap_vocab_above_model", ("data=memmap", "data.path={work}/shards"),
          "model.vocab_size=512 is smaller than the tokenizer's 1000 ids", setup=_shards(vocab_size=1000)),
        c("text_missing_torchrun", ("data=text", "data.path={work}/nosuch"), "does not exist", nproc=2),
        # -- Hugging Face checkpoints --
        c("hf_not_a_model_folder", ("checkpoint.init_from_hf={work}/corpus",), "has no config.json",
          setup=_empty_folder),
        c("hf_without_tokenizer", ("checkpoint.init_from_hf={work}/hf",), "has no tokenizer.json to train with",
          setup=_hf_folder),
        c("hf_config_mismatch", ("checkpoint.init_from_hf={work}/hf", "data.tokenizer=byte", "checkpoint.resume=none"),
          "config.json gives model.d_model=256 and this run has model.d_model=", setup=_hf_folder),
        c("from_hf_without_folder", ("model=from_hf",), "model=from_hf reads the model's shapes from"),
        c("hf_under_deepspeed", ("checkpoint.export_hf=true", "parallel.dp_engine=deepspeed"),
          "need parallel.dp_engine=fsdp or ddp"),
        c("hf_export_dtype", ("checkpoint.export_hf_dtype=int8",), "checkpoint.export_hf_dtype='int8' must be"),
        # -- checkpoints --
        c("resume_missing", ("checkpoint.resume={work}/nosuch/step_9",), "does not exist"),
        c("resume_uncommitted", (f"checkpoint.resume={on_file}",), "has no COMMITTED marker", setup=_uncommitted),
        c("resume_truncated_shard", (f"checkpoint.resume={on_file}",), "__0_0.distcp is truncated",
          setup=_damaged(_truncate_shard)),
        c("resume_no_metadata", (f"checkpoint.resume={on_file}",), "its DCP .metadata is missing",
          setup=_damaged(_delete(".metadata"))),
        c("resume_corrupt_metadata", (f"checkpoint.resume={on_file}",), "its DCP .metadata cannot be read",
          setup=_damaged(_overwrite(".metadata", b"\x80\x04garbage" * 10))),
        c("resume_corrupt_trainer_state", (f"checkpoint.resume={on_file}",), "trainer_state.json does not parse",
          setup=_damaged(_overwrite("trainer_state.json", b'{"step": 2, "sampler"'))),
        c("resume_other_d_model", ("model.d_model=32",),
          "was saved with shape (512, 64) and this model's is (512, 32)"),
        c("resume_more_layers", ("model.n_layers=5", "train.steps=3"), "has no tensor layers.4"),
        c("resume_fewer_layers", ("model.n_layers=3", "train.steps=3"), "layers.3"),
        c("resume_steps_equal", (), "train.steps=2 is not beyond step 2 of the checkpoint"),
        c("resume_steps_below", ("train.steps=1",), "train.steps=1 is not beyond step 2 of the checkpoint"),
        c("resume_deepspeed_by_native", (f"checkpoint.resume={on_file}",), "written by the deepspeed engine",
          setup=_damaged(_mark_engine("deepspeed"))),
        c("resume_auto_all_damaged", (), "no intact checkpoint in", setup=_damaged(_truncate_shard, in_run=True)),
        # -- run folder --
        c("rundir_name_too_long", (f"run.dir={{work}}/{_LONG}",), "File name too long"),
        c("rundir_under_proc", ("run.dir=/proc/supertrain-run",), "run.dir=/proc/supertrain-run cannot be used"),
        c("rundir_under_proc_sys", ("run.dir=/proc/sys/supertrain-run",), "run.dir=/proc/sys/supertrain-run cannot"),
        c("rundir_is_file", ("run.dir={work}/a-file",), "cannot be used", setup=_regular_file("a-file")),
        c("rundir_in_use", (), "is in use by another run (host", setup=_lock_holder),
        c("rundir_read_only", ("run.dir={work}/locked/run",), "Permission denied", setup=_read_only_folder,
          skip=_root),
        c("metrics_is_folder", ("run.dir={work}/fresh",), "metrics.jsonl", setup=_metrics_folder),
    ]


CASES: list[Case] = _cases()


def run_cases(cases: list[Case], good_run: Path, root: Path, workers: int = 2) -> dict[str, Optional[str]]:
    """`check` of each case (in root/<id>), by id. A case is one process start, single-threaded CPU work: `workers`
    single-process cases run at once (two on the 2-core development machine), then torchrun's, whose ranks need the
    cores, one by one. A set-up that fails is that case's reason; the other cases still run."""

    def one(case: Case) -> tuple[str, Optional[str]]:
        try:
            reason = check(case, root / case.id, good_run)
        except Exception as error:
            reason = f"the check itself failed: {type(error).__name__}: {error}"
        if reason is None:
            shutil.rmtree(root / case.id, ignore_errors=True)
        return case.id, reason

    with ThreadPoolExecutor(workers) as pool:
        results = dict(pool.map(one, [case for case in cases if case.nproc == 1]))
    results.update(one(case) for case in cases if case.nproc > 1)
    return {case.id: results[case.id] for case in cases}


def run() -> dict:
    """Every case against one good run, in a temporary folder: the figures for `python -m bench bad_inputs`.
    `failed` counts the known defects too (`known_defects` says how many of them); `fixed` lists the cases marked
    with a known defect that were rejected cleanly after all."""
    skipped = {case.id: case.skip() for case in CASES if case.skip is not None and case.skip()}
    cases = [case for case in CASES if case.id not in skipped]
    with tempfile.TemporaryDirectory(prefix="bad_inputs-") as tmp:
        results = run_cases(cases, build_good_run(Path(tmp) / "good"), Path(tmp))
    known = {case.id: case.known_defect for case in cases if case.known_defect}
    failures = {name: reason + (f" [known defect: {known[name]}]" if name in known else "")
                for name, reason in results.items() if reason is not None}
    return {"tried": len(cases), "rejected_cleanly": len(cases) - len(failures), "failed": len(failures),
            "known_defects": sum(1 for name in failures if name in known), "skipped": len(skipped),
            "fixed": [name for name in known if results[name] is None], "failures": failures, "skips": skipped}
