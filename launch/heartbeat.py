"""The stalled-rank watch: every rank publishes what it is doing to the job's store, and a rank that has made no
progress for too long names the ranks that did not arrive, then stops the job.

A rank blocked in a collective cannot tell why on its own: gloo's timeout names the operation, not the peer, and NCCL's
or HCCL's watchdog takes the full process-group timeout (30 minutes by default). Here each rank's thread writes
`heartbeat/<rank>` = (step, phase, time) every few seconds; the main thread reports progress (`progress(step, phase)`)
at each step, evaluation and checkpoint. When a rank's own progress is older than the phase's budget, its thread reads
every rank's heartbeat and hands `on_stall` one line naming the ranks whose step is behind its own or whose
heartbeat went quiet (a stopped or hung process writes none); the caller reports it and ends the process, and the
launcher then stops the rest.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Optional

_KEY = "supertrain/heartbeat/{}"


class Heartbeat:
    def __init__(self, store: Any, rank: int, world_size: int, budget_s: Callable[[str], float],
                 on_stall: Callable[[str], None], period_s: float = 5.0) -> None:
        """`budget_s(phase)`: seconds a phase may go without progress (0: unwatched); `on_stall(message)`: called
        once, from the watch's thread, when this rank has stalled."""
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.budget_s = budget_s
        self.on_stall = on_stall
        self.period_s = period_s
        self.step, self.phase, self.since = 0, "start-up", time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self.since = step, phase, time.monotonic()

    def start(self) -> "Heartbeat":
        self._beat()
        self._thread = threading.Thread(target=self._run, name="supertrain-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        record = {"step": self.step, "phase": self.phase, "time": time.time()}
        self.store.set(_KEY.format(self.rank), json.dumps(record))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._beat()
                budget = self.budget_s(self.phase)
                waited = time.monotonic() - self.since
                if budget and waited > budget:
                    self.on_stall(self.message(waited))
                    return
            except Exception:  # the store is gone with the job: nothing left to watch
                return

    def laggards(self) -> list[str]:
        """The ranks behind this one, or silent for longer than three beats, with what they last said."""
        now = time.time()
        behind = []
        for rank in range(self.world_size):
            key = _KEY.format(rank)
            if rank == self.rank:
                continue
            if not self.store.check([key]):
                behind.append(f"rank {rank} (never reported)")
                continue
            record = json.loads(self.store.get(key))
            quiet = now - record["time"]
            if record["step"] < self.step or quiet > 3 * self.period_s:
                behind.append(f"rank {rank} (at step {record['step']}, {record['phase']}, last heard {quiet:.0f} s "
                              f"ago)")
        return behind

    def message(self, waited: float) -> str:
        behind = self.laggards()
        who = ("ranks not there: " + "; ".join(behind) if behind
               else "every rank is at this step: a collective that never completes")
        return (f"no progress for {waited:.0f} s in step {self.step} ({self.phase}); {who}; the job stops: see those "
                f"ranks' logs (run.dir/logs/rank_<r>.log), or raise parallel.stall_timeout_s")
