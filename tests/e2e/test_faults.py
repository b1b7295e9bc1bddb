"""Faults injected into real runs (bench/faults.py's trials, a few of each): a rank SIGKILLed under torchrun's
restarts, a crash in the middle of a save, a stalled (SIGSTOPped) rank, and preemption by SIGTERM with 2 ranks and
with one process. Runs resume bit-identical to an uninterrupted run; each trial uses its own temporary folder."""

import pytest

from bench import faults

# Minutes: every trial starts real ranks, most of them twice.
pytestmark = pytest.mark.slow

STEPS = 16  # the kill and 2-rank preemption trials share one uninterrupted reference run of this length


def _passed(result):
    assert result["passed"], "\n".join(result["problems"])


@pytest.mark.parametrize("kill_at", [6, 11])
def test_killed_rank_is_restarted_and_the_run_ends_bit_identical(kill_at):
    result = faults.kill_trial(kill_at, steps=STEPS, every=4)
    _passed(result)
    assert result["restart_rounds"] == 1  # reconnected on the first restart
    assert result["connect_full_mesh"] == 0
    # The restarted group resumed from the newest checkpoint (every 4 steps) before the kill, which lands in one of
    # the steps after the one rank 0 had logged.
    newest = result["killed_at_step"] // 4 * 4
    assert len(result["resumed_from"]) == 1 and result["resumed_from"][0] in (newest, newest + 4)


def test_crash_in_save_keeps_the_last_good_checkpoint_and_resumes():
    result = faults.crash_in_save_trial(2, 0.1)
    _passed(result)
    assert not result["save_finished_first"]  # killed while step_2.tmp was being written


def test_stalled_rank_is_named_by_rank_0_within_the_timeout():
    result = faults.stall_trial(4)
    _passed(result)
    assert result["rank0_exit"] == 4
    # The watch beats every 5 s: the line comes within stall_timeout_s + a beat (+ a step and scheduling slack).
    assert faults.STALL_TIMEOUT_S <= result["seconds"] <= faults.STALL_TIMEOUT_S + 5 + 10
    assert "rank 1 (at step" in result["line"]


def test_preempted_ranks_save_exit_75_and_resume_bit_identical():
    result = faults.preemption_trial(6, steps=STEPS)
    _passed(result)
    assert result["rank_exits"] == [75, 75]
    assert 6 <= result["saved_step"] < STEPS
    assert result["rerun_exit"] == 0


def test_preempted_single_process_exits_75_and_resumes_bit_identical():
    result = faults.preemption_trial(4, steps=10, nproc=1)
    _passed(result)
    assert result["launcher_exit"] == 75 and result["line_rank"] is None
    assert result["rerun_exit"] == 0


def test_spread_and_trial_counts(monkeypatch):
    assert faults.spread(8, 30, 10) == [8, 10, 12, 15, 17, 20, 22, 25, 27, 30]
    assert faults.spread(4, 10, 1) == [4] and faults.spread(4, 10, 0) == []
    monkeypatch.setenv("SUPERTRAIN_FAULT_TRIALS", "kill=2,stall=1")
    assert faults._trial_counts() == {"kill": 2, "save": faults.SAVE_TRIALS, "stall": 1,
                                      "preempt": faults.PREEMPT_TRIALS}
    monkeypatch.setenv("SUPERTRAIN_FAULT_TRIALS", "kills=2")
    with pytest.raises(ValueError):
        faults._trial_counts()
