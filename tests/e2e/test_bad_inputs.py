"""Bad input of every kind to `python -m train`, each a real process against a finished good run: a non-zero exit
(2), one `supertrain: error:` line with the expected text, and every file of the good run as it was.

The table and the judging live in bench/bad_inputs.py (`python -m bench bad_inputs` reports the same cases as
figures). A case that shows a known product defect is expected to fail (strict: its fix shows up as XPASS).
About three minutes on the 2-core development machine: one process start per case, two cases at a time.
"""

from typing import Optional

import pytest

from bench.bad_inputs import CASES, Case, build_good_run, run_cases


def _param(case: Case):
    marks = []
    reason = case.skip() if case.skip is not None else None
    if reason:
        marks.append(pytest.mark.skip(reason=reason))
    if case.known_defect:
        marks.append(pytest.mark.xfail(strict=True, reason=case.known_defect))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """The finished good run every case starts from (copied per case, never touched itself)."""
    return build_good_run(tmp_path_factory.mktemp("good") / "run")


@pytest.fixture(scope="module")
def outcomes(request, good_run, tmp_path_factory) -> dict[str, Optional[str]]:
    """`check` of every case this session selected, by id: run up front, two at a time (bench/bad_inputs.py
    `run_cases`), each test then reports its own."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    runnable = [case for case in selected if case.skip is None or not case.skip()]
    return run_cases(runnable, good_run, tmp_path_factory.mktemp("cases"))


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_is_rejected_cleanly(case, outcomes):
    reason = outcomes[case.id]
    assert reason is None, reason
