"""Reliability under torchrun: faults injected into real runs (2 CPU ranks over gloo, `python -m torch.distributed.run
--standalone --nproc_per_node=2 -m train`), each trial in a fresh temporary folder.

kill           `--max-restarts=2`, train.steps=40, checkpoint.every=5. Once rank 0 has logged step K (K spread over
               8..30 across the trials), the worker with RANK=1 is SIGKILLed; torchrun restarts the whole group, which
               resumes from the newest checkpoint. Survived: torchrun exits 0, every step 1..40 has exactly one loss
               row in metrics.jsonl, and the losses equal (bitwise) those of one uninterrupted run. Figures: survived
               out of tried, the trials that needed more than one restart round, and every "connectFullMesh" line
               (gloo failing to reconnect a restarted group).
crash_in_save  One process, a 25M-parameter model (a save takes about a second), checkpoint.every=1: SIGKILL while
               `step_<N>.tmp` is being written (N and the delay into the save vary per trial). Kept: the newest
               committed checkpoint is the previous good one (or step_<N>, where the save won the race), it verifies
               (train/checkpoint.py `problem`), and the same command run again resumes from it and finishes (exit 0).
stall          parallel.stall_timeout_s=10 (the watch beats every 5 s): after a few steps the RANK=1 worker is
               SIGSTOPped; figure: seconds until torchrun's stderr shows `supertrain: error: rank 0: no progress for
               ... ranks not there: rank 1 ...` (expected 10-16 s); rank 0 must exit 4, and that line must be the only
               `supertrain: error` line. Everything left is then SIGKILLed.
preemption     train.steps=60, checkpoint.every=100: SIGTERM to torchrun (not the workers) after step ~15; torchrun
               forwards it, the ranks stop at the next step boundary, save step_<k> and exit 75, printing one
               `supertrain: stopped: rank <r>: ...` line (r: the first rank to report, often 1); the same command
               run again resumes from step k, and the per-step losses of the whole run equal the uninterrupted
               run's bitwise, each step once. Also once with one
               process (`python -m train`, SIGTERM to it directly).

The uninterrupted references run with checkpoint.every=0, so the comparison also shows that saving perturbs nothing.
Each worker's start (RANK, restart attempt, pid) and exit code are recorded by a `sitecustomize` probe put on the
workers' PYTHONPATH from the trial's temporary folder (it wraps os._exit and sys.exit, which is how a rank ends):
torchrun does not report its workers' exit codes when it is itself stopped by a signal. A kill trial's restart rounds
are the attempts the probe saw (TORCHELASTIC_RESTART_COUNT).

A failed trial keeps its processes' stderr and the run's logs in its folder (the problem names it);
SUPERTRAIN_FAULT_KEEP=1 keeps every trial's whole folder.
Trial counts: KILL_TRIALS, SAVE_TRIALS, STALL_TRIALS, PREEMPT_TRIALS below, or SUPERTRAIN_FAULT_TRIALS, e.g.
"kill=2,save=1,stall=1,preempt=1". `python -m bench faults`; with the default counts (10/5/3/2) 9 to 11 minutes on
the 2-core development machine, shared with other jobs (a kill trial about 35 s, a crash-in-save trial 30 s, a stall
trial 25 s, a preemption trial 45 s, plus about 90 s for the two uninterrupted reference runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from bench.quick_run import FAST

REPO = Path(__file__).resolve().parent.parent

KILL_TRIALS, SAVE_TRIALS, STALL_TRIALS, PREEMPT_TRIALS = 10, 5, 3, 2

RANKS = 2
TWO_RANKS = [*FAST, f"parallel.dp_shard={RANKS}"]
# A model large enough (about 25M parameters, 300 MB with Adam state) that a save takes about a second.
LARGE = ["model.d_model=512", "model.n_layers=8", "model.ffn_hidden=1536"]
STALL_TIMEOUT_S = 10

STALL_LINE = re.compile(r"^supertrain: error: rank 0: no progress for \d+ s in step \d+ \([^)]*\); "
                        r"ranks not there: rank 1 ")
STOPPED_LINE = re.compile(r"^supertrain: stopped: (?:rank (\d+): )?SIGTERM received: saved (\S+) at step (\d+); "
                          r"run the same command again to resume from it$")

PROBE = '''\
import os, sys
_dir = os.environ.get("SUPERTRAIN_FAULT_PROBE")
if _dir and "RANK" in os.environ:
    _tag = "rank%s_attempt%s_pid%d" % (os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
                                       os.getpid())
    open(os.path.join(_dir, _tag + ".start"), "w").close()

    def _record(code):
        try:
            with open(os.path.join(_dir, _tag + ".exit"), "w") as handle:
                handle.write(str(code))
        except Exception:
            pass

    _real_exit, _real_sys_exit = os._exit, sys.exit

    def _exit(code):
        _record(code)
        _real_exit(code)

    def _sys_exit(code=0):
        _record(code if isinstance(code, int) else (0 if code is None else 1))
        _real_sys_exit(code)

    os._exit, sys.exit = _exit, _sys_exit
'''


def _trial_counts() -> dict[str, int]:
    counts = {"kill": KILL_TRIALS, "save": SAVE_TRIALS, "stall": STALL_TRIALS, "preempt": PREEMPT_TRIALS}
    for item in filter(None, os.environ.get("SUPERTRAIN_FAULT_TRIALS", "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in counts:
            raise ValueError(f"SUPERTRAIN_FAULT_TRIALS: {key!r} is not one of {', '.join(counts)}")
        counts[key.strip()] = int(value)
    return counts


# ---- processes -------------------------------------------------------------------------------------------------


class Trial:
    """A fresh temporary folder with the probe, the run folder, and the processes started in it."""

    def __init__(self, name: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"supertrain-faults-{name}-"))
        self.probe = self.root / "probe"
        self.probe.mkdir()
        (self.probe / "sitecustomize.py").write_text(PROBE)
        self.run_dir = self.root / "run"
        self.procs: list[Run] = []
        self.keep_logs = False

    def env(self) -> dict[str, str]:
        # As a user's shell would start it (tests/conftest.py clean_env), plus the probe.
        prefixes = ("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC",
                    "TORCH_DEVICE_BACKEND_AUTOLOAD")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update({"PYTHONPATH": f"{self.probe}{os.pathsep}{REPO}", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                    "SUPERTRAIN_FAULT_PROBE": str(self.probe)})
        # Not PYTHONUNBUFFERED: unbuffered, a rank writes a line and its newline in two calls, and the ranks' lines,
        # which share torchrun's stderr, can then be spliced into one another.
        env.pop("PYTHONUNBUFFERED", None)
        return env

    def start(self, args: list[str], nproc: int = RANKS, max_restarts: int = 0) -> "Run":
        if nproc == 1:
            cmd = [sys.executable, "-m", "train", *args, f"run.dir={self.run_dir}"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   f"--max-restarts={max_restarts}", "-m", "train", *args, f"run.dir={self.run_dir}"]
        run = Run(cmd, self.env())
        self.procs.append(run)
        return run

    def workers(self) -> list[dict[str, Any]]:
        """Every worker started so far: rank, attempt, pid and exit code (None: it did not exit through Python)."""
        found = []
        for start in self.probe.glob("*.start"):
            match = re.fullmatch(r"rank(\d+)_attempt(\d+)_pid(\d+)", start.stem)
            if match is None:
                continue
            rank, attempt, pid = (int(g) for g in match.groups())
            exit_file = start.with_suffix(".exit")
            code = int(exit_file.read_text() or "-1") if exit_file.is_file() else None
            found.append({"rank": rank, "attempt": attempt, "pid": pid, "exit": code})
        return sorted(found, key=lambda w: (w["attempt"], w["rank"]))

    def worker_pid(self, rank: int, deadline: float) -> Optional[int]:
        """The live worker process of `rank` in the newest attempt."""
        while time.monotonic() < deadline:
            live = [w for w in self.workers() if w["rank"] == rank and w["exit"] is None and self._ours(w["pid"])]
            if live:
                return max(live, key=lambda w: w["attempt"])["pid"]
            time.sleep(0.05)
        return None

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is a live process started in this trial (its environment names this trial's probe)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z" and f"SUPERTRAIN_FAULT_PROBE={self.probe}".encode() in environ

    def kill_all(self) -> None:
        """SIGKILL whatever this trial started and is still there (a stopped process ignores SIGTERM), then reap."""
        pids = [w["pid"] for w in self.workers()] + [r.proc.pid for r in self.procs]
        for pid in pids:
            if self._ours(pid):
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
        for run in self.procs:
            run.close()

    def close(self) -> None:
        self.kill_all()
        keep_all = bool(os.environ.get("SUPERTRAIN_FAULT_KEEP"))
        if keep_all or self.keep_logs:
            for i, run in enumerate(self.procs):
                (self.root / f"process_{i}.stderr").write_text(run.stderr + "\n")
        if keep_all:
            return
        if self.keep_logs:  # the run's logs and metrics, not its checkpoints (hundreds of MB)
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.run_dir / "wandb", ignore_errors=True)
            return
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Trial":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Run:
    """A process whose stderr is read as it streams, each line with the monotonic time it arrived."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None when it is still running after `timeout` seconds."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)  # the workers may hold the pipe a moment longer
        return code

    def wait_line(self, pattern: re.Pattern, deadline: float, after: int = 0) -> Optional[tuple[float, str]]:
        """The first stderr line from index `after` on that matches, waiting until `deadline` (monotonic) or until
        the process has exited and its output is read."""
        while True:
            for when, line in self.lines[after:]:
                if pattern.search(line):
                    return when, line
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                return None
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# ---- metrics ---------------------------------------------------------------------------------------------------


def loss_rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every loss row in metrics.jsonl, in file order; a line still being written is left out."""
    rows = []
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            rows.append((record["step"], record["loss"]))
    return rows


def wait_for_step(run: Run, run_dir: Path, step: int, deadline: float) -> int:
    """Wait until rank 0 has logged `step` (or later), the process exited, or the deadline passed; the last step
    logged."""
    while True:
        rows = loss_rows(run_dir)
        last = max((s for s, _ in rows), default=0)
        if last >= step or run.proc.poll() is not None or time.monotonic() > deadline:
            return last
        time.sleep(0.05)


def compare_losses(rows: list[tuple[int, float]], reference: dict[int, float], steps: int) -> list[str]:
    """What is wrong with a run's loss rows against the reference: missing or repeated steps, or any difference."""
    problems = []
    counts: dict[int, int] = {}
    for step, _ in rows:
        counts[step] = counts.get(step, 0) + 1
    missing = [s for s in range(1, steps + 1) if s not in counts]
    repeated = sorted(s for s, n in counts.items() if n > 1)
    extra = sorted(s for s in counts if not 1 <= s <= steps)
    if missing or repeated or extra:
        problems.append(f"loss rows: missing steps {missing}, repeated {repeated}, out of range {extra}")
    differ = [s for s, loss in rows if s in reference and loss != reference[s]]
    if differ:
        s = differ[0]
        problems.append(f"losses differ from the uninterrupted run at {len(differ)} step(s), first step {s}: "
                        f"{dict(rows)[s]!r} != {reference[s]!r}")
    return problems


_REFERENCES: dict[tuple[int, int, tuple[str, ...]], dict[int, float]] = {}


def reference_losses(steps: int, nproc: int = RANKS, extra: tuple[str, ...] = ()) -> dict[int, float]:
    """Per-step losses of one uninterrupted run (checkpoint.every=0), computed once per layout and length."""
    key = (steps, nproc, extra)
    if key not in _REFERENCES:
        base = TWO_RANKS if nproc > 1 else FAST
        with Trial("reference") as trial:
            run = trial.start([*base, *extra, f"train.steps={steps}"], nproc=nproc)
            code = run.wait(900)
            if code != 0:
                raise RuntimeError(f"the reference run exited {code}:\n{run.stderr[-3000:]}")
            rows = loss_rows(trial.run_dir)
        if [s for s, _ in rows] != list(range(1, steps + 1)):
            raise RuntimeError(f"the reference run logged steps {[s for s, _ in rows]}")
        _REFERENCES[key] = dict(rows)
    return _REFERENCES[key]


def _guarded(trial_fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A trial that raised is a failed trial with the exception as its problem, so that the others still run."""

    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return trial_fn(*args, **kwargs)
        except Exception as error:
            return {"passed": False, "problems": [f"{type(error).__name__}: {error}"]}

    wrapper.__name__ = trial_fn.__name__
    wrapper.__doc__ = trial_fn.__doc__
    return wrapper


def _finish(result: dict[str, Any], problems: list[str], trial: Optional[Trial] = None) -> dict[str, Any]:
    """The trial's result; a failed trial keeps its processes' stderr and the run's logs for a look afterwards."""
    if problems and trial is not None:
        trial.keep_logs = True
        problems = [*problems, f"(stderr and logs kept in {trial.root})"]
    result["problems"] = problems
    result["passed"] = not problems
    return result


def _said(run: Run, prefix: str) -> list[str]:
    """Each occurrence of `prefix` in the stderr, from there to the end of its line (wherever in a line it starts:
    processes that share the stream can splice their lines)."""
    return [line[i:] for _, line in run.lines for i in (m.start() for m in re.finditer(re.escape(prefix), line))]


def _tail(run: Run, lines: int = 25) -> str:
    return "\n".join(line for _, line in run.lines[-lines:])


# ---- trials ----------------------------------------------------------------------------------------------------


@_guarded
def kill_trial(kill_at: int, steps: int = 40, every: int = 5, max_restarts: int = 2) -> dict[str, Any]:
    """SIGKILL the RANK=1 worker once step `kill_at` is logged; torchrun restarts the group, which resumes."""
    reference = reference_losses(steps)
    with Trial("kill") as trial:
        args = [*TWO_RANKS, f"train.steps={steps}", f"checkpoint.every={every}"]
        run = trial.start(args, max_restarts=max_restarts)
        reached = wait_for_step(run, trial.run_dir, kill_at, time.monotonic() + 300)
        if reached < kill_at:
            return _finish({}, [f"step {kill_at} never came (last logged {reached}, exit {run.proc.poll()}):\n"
                                f"{_tail(run)}"], trial)
        pid = trial.worker_pid(1, time.monotonic() + 10)
        if pid is None:
            return _finish({}, [f"no live RANK=1 worker at step {reached}"], trial)
        os.kill(pid, signal.SIGKILL)
        code = run.wait(600)
        stderr = run.stderr
        rounds = max(w["attempt"] for w in trial.workers())
        resumed = [int(m) for m in re.findall(r"resumed from \S*step_(\d+) at step", stderr)]
        result = {"killed_at_step": reached, "restart_rounds": rounds, "resumed_from": resumed,
                  "connect_full_mesh": stderr.count("connectFullMesh")}
        problems = []
        if code != 0:
            problems.append(f"torchrun exited {code} (None: still running after 600 s):\n{_tail(run)}")
        if rounds < 1:
            problems.append("torchrun never restarted the workers")
        if not resumed:
            problems.append("no restarted run said 'resumed from'")
        problems += compare_losses(loss_rows(trial.run_dir), reference, steps)
        return _finish(result, problems, trial)


@_guarded
def crash_in_save_trial(step: int, delay_s: float) -> dict[str, Any]:
    """One process: SIGKILL `delay_s` seconds into the save of step_<step>; the previous checkpoint stays, verifies,
    and a rerun resumes from it and finishes."""
    from train.checkpoint import COMMIT_MARKER, committed_checkpoints, problem

    steps = step + 1
    args = [*FAST, *LARGE, f"train.steps={steps}", "checkpoint.every=1"]
    with Trial("save") as trial:
        root = trial.run_dir / "checkpoints"
        staging, final = root / f"step_{step}.tmp", root / f"step_{step}"
        run = trial.start(args, nproc=1)
        deadline = time.monotonic() + 300
        while not staging.exists() and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if not staging.exists():
            return _finish({}, [f"never saw the save of step {step} in progress (exit {run.proc.poll()}):\n"
                                f"{_tail(run)}"], trial)
        time.sleep(delay_s)
        files = sum(1 for p in staging.rglob("*") if p.is_file()) if staging.exists() else None
        run.proc.send_signal(signal.SIGKILL)
        run.wait(30)
        # What a save's kill may leave: the half-written folder (the expected case), or step_<N> where it won the race.
        expected = step if final.exists() else step - 1
        result = {"step": step, "delay_s": delay_s, "files_in_staging": files, "save_finished_first": final.exists()}
        problems = []
        committed = [s for s, _ in committed_checkpoints(root)]
        if not committed or committed[-1] != expected:
            problems.append(f"committed checkpoints after the kill: {committed}, expected the newest to be {expected}")
        elif (why := problem(root / f"step_{expected}")) is not None:
            problems.append(f"step_{expected} does not verify: {why}")
        if staging.exists() and (staging / COMMIT_MARKER).exists() and not final.exists():
            result["marker_in_staging"] = True  # killed between the marker and the rename: still not committed
        rerun = trial.start(args, nproc=1)
        code = rerun.wait(300)
        if code != 0:
            problems.append(f"the rerun exited {code}:\n{_tail(rerun)}")
        if f"resumed from {root / f'step_{expected}'} at step {expected}" not in rerun.stderr:
            problems.append(f"the rerun did not resume from step_{expected}:\n{_tail(rerun)}")
        after = [s for s, _ in committed_checkpoints(root)]
        if after != list(range(1, steps + 1)) or staging.exists():
            problems.append(f"after the rerun: committed {after}, {staging.name} left: {staging.exists()}")
        rows = [s for s, _ in loss_rows(trial.run_dir)]
        if rows != list(range(1, steps + 1)):
            problems.append(f"loss rows after the rerun: steps {rows}")
        return _finish(result, problems, trial)


@_guarded
def stall_trial(stop_at: int, stall_timeout_s: int = STALL_TIMEOUT_S) -> dict[str, Any]:
    """SIGSTOP the RANK=1 worker once step `stop_at` is logged; seconds until rank 0's stall line."""
    with Trial("stall") as trial:
        args = [*TWO_RANKS, "train.steps=100000", f"parallel.stall_timeout_s={stall_timeout_s}"]
        run = trial.start(args)
        reached = wait_for_step(run, trial.run_dir, stop_at, time.monotonic() + 300)
        if reached < stop_at:
            return _finish({}, [f"step {stop_at} never came (last logged {reached}, exit {run.proc.poll()}):\n"
                                f"{_tail(run)}"], trial)
        pid = trial.worker_pid(1, time.monotonic() + 10)
        if pid is None:
            return _finish({}, [f"no live RANK=1 worker at step {reached}"], trial)
        seen = len(run.lines)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        found = run.wait_line(STALL_LINE, stopped + 6 * stall_timeout_s, after=seen)
        result: dict[str, Any] = {"stopped_at_step": reached}
        problems = []
        if found is None:
            problems.append(f"no stall line naming rank 1 within {6 * stall_timeout_s} s of SIGSTOP:\n{_tail(run)}")
        else:
            result["seconds"] = found[0] - stopped
            result["line"] = found[1]
        # Rank 0 exits 4 on its own; the stopped rank is killed (torchrun would wait --shutdown-timeout for it).
        rank0_code = _exit_code(trial, 0, time.monotonic() + 30)
        _signal(pid, signal.SIGKILL)
        _signal(pid, signal.SIGCONT)
        code = run.wait(120)
        result["torchrun_exit"] = code
        result["rank0_exit"] = rank0_code
        if rank0_code != 4:
            problems.append(f"rank 0 exited {rank0_code}, expected 4 (None: no exit seen)")
        errors = _said(run, "supertrain: error")
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'supertrain: error' lines, expected 1: {errors}")
        if code is None or code == 0:
            problems.append(f"torchrun exited {code} after the stall")
        return _finish(result, problems, trial)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exit_code(trial: Trial, rank: int, deadline: float) -> Optional[int]:
    """The exit code of `rank`'s newest worker, once it has exited through Python (None at the deadline)."""
    while time.monotonic() < deadline:
        mine = [w for w in trial.workers() if w["rank"] == rank]
        if mine and mine[-1]["exit"] is not None:
            return mine[-1]["exit"]
        time.sleep(0.05)
    return None


@_guarded
def preemption_trial(stop_at: int, steps: int = 60, nproc: int = RANKS) -> dict[str, Any]:
    """SIGTERM the launcher (torchrun, or `python -m train` itself with one process) once step `stop_at` is logged:
    the ranks save at the next step boundary and exit 75; the same command again finishes bit-identical."""
    reference = reference_losses(steps, nproc)
    base = TWO_RANKS if nproc > 1 else FAST
    args = [*base, f"train.steps={steps}", "checkpoint.every=100"]
    with Trial("preempt") as trial:
        run = trial.start(args, nproc=nproc)
        reached = wait_for_step(run, trial.run_dir, stop_at, time.monotonic() + 300)
        if reached < stop_at:
            return _finish({}, [f"step {stop_at} never came (last logged {reached}, exit {run.proc.poll()}):\n"
                                f"{_tail(run)}"], trial)
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(120)
        problems = []
        result: dict[str, Any] = {"signalled_after_step": reached, "launcher_exit": code}
        stopped, errors = _said(run, "supertrain: stopped"), _said(run, "supertrain: error")
        matches = [STOPPED_LINE.match(line) for line in stopped]
        if len(stopped) != 1 or matches[0] is None:
            problems.append(f"{len(stopped)} 'supertrain: stopped' lines, expected 1 of the documented form: "
                            f"{stopped}\n{_tail(run)}")
        if errors:
            problems.append(f"'supertrain: error' lines: {errors}")
        saved_step = int(matches[0].group(3)) if len(stopped) == 1 and matches[0] else None
        result["saved_step"] = saved_step
        if stopped and matches[0]:
            result["line_rank"] = matches[0].group(1)
        if nproc == 1:
            result["rank_exits"] = [code]
            if code != 75:
                problems.append(f"python -m train exited {code}, expected 75:\n{_tail(run)}")
        else:
            workers = trial.workers()
            result["rank_exits"] = [w["exit"] for w in workers]
            if sorted(w["rank"] for w in workers) != list(range(nproc)) or any(w["exit"] != 75 for w in workers):
                problems.append(f"worker exits {workers}, expected 75 on each of {nproc} ranks in one attempt")
            if code is None:
                problems.append("torchrun was still running 120 s after SIGTERM")
        if saved_step is not None:
            from train.checkpoint import committed_checkpoints, problem

            committed = [s for s, _ in committed_checkpoints(trial.run_dir / "checkpoints")]
            if committed != [saved_step]:
                problems.append(f"committed checkpoints {committed}, expected [{saved_step}]")
            elif (why := problem(trial.run_dir / "checkpoints" / f"step_{saved_step}")) is not None:
                problems.append(f"step_{saved_step} does not verify: {why}")
            if not reached <= saved_step <= reached + 3:
                problems.append(f"saved at step {saved_step}, but the signal came after step {reached}")
        if problems:
            return _finish(result, problems, trial)
        rerun = trial.start(args, nproc=nproc)
        rerun_code = rerun.wait(600)
        result["rerun_exit"] = rerun_code
        if rerun_code != 0:
            problems.append(f"the rerun exited {rerun_code}:\n{_tail(rerun)}")
        if not re.search(rf"resumed from \S*step_{saved_step} at step {saved_step}\b", rerun.stderr):
            problems.append(f"the rerun did not resume from step_{saved_step}:\n{_tail(rerun)}")
        problems += compare_losses(loss_rows(trial.run_dir), reference, steps)
        return _finish(result, problems, trial)


# ---- the benchmark ---------------------------------------------------------------------------------------------


def spread(low: int, high: int, count: int) -> list[int]:
    """`count` integers spread evenly over [low, high]."""
    if count <= 1:
        return [low][:count]
    return [low + (high - low) * i // (count - 1) for i in range(count)]


SAVE_POINTS = [(2, 0.0), (3, 0.15), (2, 0.3), (4, 0.05), (3, 0.45)]  # (step whose save is killed, seconds into it)


def run() -> dict:
    counts = _trial_counts()
    problems: list[str] = []
    seconds: dict[str, float] = {}

    def trials(kind: str, make: Callable[[int], dict[str, Any]], count: int) -> list[dict[str, Any]]:
        started = time.monotonic()
        results = [make(i) for i in range(count)]
        seconds[kind] = round(time.monotonic() - started, 1)
        for i, result in enumerate(results):
            problems.extend(f"{kind} trial {i + 1}: {text}" for text in result["problems"])
        return results

    kill_at, stop_at, preempt_at = spread(8, 30, counts["kill"]), spread(4, 10, counts["stall"]), \
        spread(12, 18, counts["preempt"])
    kills = trials("kill", lambda i: kill_trial(kill_at[i]), counts["kill"])
    saves = trials("crash_in_save", lambda i: crash_in_save_trial(*SAVE_POINTS[i % len(SAVE_POINTS)]), counts["save"])
    stalls = trials("stall", lambda i: stall_trial(stop_at[i]), counts["stall"])
    preempts = trials("preemption", lambda i: preemption_trial(preempt_at[i]), counts["preempt"])
    single = trials("single-process preemption", lambda i: preemption_trial(8, steps=20, nproc=1),
                    min(1, counts["preempt"]))

    waits = [round(r["seconds"], 2) for r in stalls if "seconds" in r]
    everything = kills + saves + stalls + preempts + single
    return {
        "kill": {
            "tried": len(kills),
            "survived_bitwise": sum(r["passed"] for r in kills),
            "needed_more_than_one_restart": sum(r.get("restart_rounds", 0) > 1 for r in kills),
            "killed_after_step": [r.get("killed_at_step") for r in kills],
            "restart_rounds": [r.get("restart_rounds") for r in kills],
            "resumed_from_step": [r.get("resumed_from", [None])[0] if r.get("resumed_from") else None
                                  for r in kills],
            "connectFullMesh_lines": sum(r.get("connect_full_mesh", 0) for r in kills),
            "seconds": seconds["kill"],
        },
        "crash_in_save": {
            "tried": len(saves),
            "kept_last_good_and_resumed": sum(r["passed"] for r in saves),
            "kill_points": [f"step {r.get('step')} +{r.get('delay_s')} s"
                            f"{' (the save finished first)' if r.get('save_finished_first') else ''}" for r in saves],
            "seconds": seconds["crash_in_save"],
        },
        "stall": {
            "tried": len(stalls),
            "detected": sum(r["passed"] for r in stalls),
            "stall_timeout_s": STALL_TIMEOUT_S,
            "seconds_to_message": waits,
            "max_seconds_to_message": max(waits) if waits else None,
            "seconds": seconds["stall"],
        },
        "preemption": {
            "tried": len(preempts),
            "saved_exit75_resumed_bitwise": sum(r["passed"] for r in preempts),
            "signalled_after_step": [r.get("signalled_after_step") for r in preempts],
            "saved_at_step": [r.get("saved_step") for r in preempts],
            "line_printed_by_rank": [r.get("line_rank") for r in preempts],
            "single_process_tried": len(single),
            "single_process_passed": sum(r["passed"] for r in single),
            "seconds": seconds["preemption"] + seconds["single-process preemption"],
        },
        "failed": sum(not r["passed"] for r in everything),
        "problems": problems,
    }
