"""Published training runs (parallel/plan/data/published_runs.csv): every row within 15% of its figure, or within
the tolerance its `tolerance` column documents."""

from __future__ import annotations

import pytest

from parallel.plan.config import load_plan_config
from parallel.plan.topology import build_cluster
from parallel.plan.validation import check_row, read_rows

ROWS = read_rows()

@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_published_run_is_predicted_within_15_percent(row: dict[str, str]) -> None:
    cfg = load_plan_config(["model=tiny", f"cluster={row['cluster']}", f"cluster.num_devices={row['num_devices']}"])
    check = check_row(row, build_cluster(cfg.cluster))
    assert check.estimate is not None, f"{row['id']}: the published layout does not fit in the memory model"
    layout = check.estimate.layout
    for degree in ("tp", "pp", "cp"):
        if row[degree]:
            assert getattr(layout, degree) == int(row[degree])
    assert abs(check.error) <= check.tolerance(0.15), f"{row['id']}: predicted {check.predicted:.4g}, published {check.published}"
