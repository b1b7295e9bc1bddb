"""Preemption: SIGTERM (a scheduler's or torchrun's stop) and SIGUSR1 (Slurm's warning before it) ask the run to stop
at the next step boundary, save a checkpoint and exit 75; the rerun resumes from it, bit-identical.

The handler only records the time: the loop asks every step (`requested`), and the ranks agree on the step through
the collective the step's guard makes anyway (train/guard.py), so all of them stop after the same step even when the
signal reaches them at different times. A save that has not finished `grace_s` after the signal is abandoned
(the process exits 75 at once, with one line): the scheduler's kill would follow anyway, and the previous checkpoint is
intact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

from train.failures import EXIT_PREEMPTED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionNotice:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received: Optional[tuple[str, float]] = None  # (signal name, monotonic time)
        self._previous: dict[int, object] = {}
        self._timer: Optional[threading.Timer] = None

    def install(self) -> "PreemptionNotice":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame: object) -> None:
        if self.received is None:
            self.received = (signal.Signals(number).name, time.monotonic())
            self._timer = threading.Timer(self.grace_s, self._give_up)
            self._timer.daemon = True
            self._timer.start()

    def requested(self) -> bool:
        return self.received is not None

    def saved(self) -> None:
        """The checkpoint is written: the grace period no longer applies."""
        if self._timer is not None:
            self._timer.cancel()

    def _give_up(self) -> None:
        name = self.received[0] if self.received else "a signal"
        sys.stderr.write(f"supertrain: error: {name} arrived {self.grace_s:g} s ago and the checkpoint it asked for "
                         f"has not finished: stopping without it (the previous checkpoint is intact; raise "
                         f"checkpoint.preempt_grace_s)\n")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
