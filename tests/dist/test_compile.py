"""parallel.compile=true compiles each transformer block in place (after recompute, before FSDP) and trains to the
eager losses; parameter names do not change, so checkpoints and init are unaffected."""

import pytest

from workers import SMALL, train_run

STEPS = ["train.steps=4"]


def test_compiled_blocks_train_like_eager(tmp_path):
    eager = train_run([*SMALL, *STEPS, f"run.dir={tmp_path / 'eager'}"])
    compiled = train_run([*SMALL, *STEPS, "parallel.compile=true", "parallel.recompute=full",
                          f"run.dir={tmp_path / 'compiled'}"])
    assert compiled["weights"].keys() == eager["weights"].keys()
    for step in range(1, 5):
        # Inductor fuses and reorders float sums: equal to the last few bits, not bitwise.
        assert compiled["steps"][step]["loss"] == pytest.approx(eager["steps"][step]["loss"], rel=1e-5)
