"""The run of record's README is what ``benchmarks.report`` renders from its results.json and
analysis.md: an analysis edited without re-rendering (``python -m benchmarks.report``) fails
here, as the scenario 1L section, missing from the README after a merge, would have."""

from __future__ import annotations

from pathlib import Path

from benchmarks import report

RECORD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


def test_the_run_of_records_readme_is_rendered_from_its_results_and_analysis() -> None:
    readme = (RECORD / "README.md").read_text()
    assert readme == report.markdown(report.stored(RECORD)), "run python -m benchmarks.report"
