"""Run the development suite and render its table (docs/analysis.md, "Development suite").

    python -m evaluation.datasets build          # once: the data, checked against the manifest
    python -m evaluation.suite run               # the worker (evaluate) and the baselines
    python -m evaluation.suite table             # the Markdown table of what was run

For every set of ``evaluation.datasets.SUITE`` and both local models: ``embedding-worker
evaluate`` with the set's config at its shots and seed 0, and zero-shot (``--shots 0``); then
``evaluation.baselines`` on the same rows. Results go to DATA/results (outside the repo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from evaluation.baselines import MODELS
from evaluation.datasets import HERE, SUITE, SuiteSet, data_dir


def worker_result(results: Path, entry: SuiteSet, shots: int, model: str) -> Path:
    return results / f"worker.{entry.name}.{shots}.{model}.json"


def run_worker(results: Path, models: list[str]) -> None:
    for model in models:
        for entry in SUITE:
            for shots in (entry.shots, 0):
                out = worker_result(results, entry, shots, model)
                command = [
                    str(Path(sys.executable).parent / "embedding-worker"),
                    "evaluate",
                    str(data_dir() / entry.file),
                    "--labels",
                    str(HERE / entry.labels),
                    "--shots",
                    str(shots),
                    "--seed",
                    "0",
                    "--json",
                    *(["--positive", entry.positive] if entry.positive else []),
                ]
                env = {**os.environ, "EMBEDDING_WORKER_PROVIDER__MODEL": model}
                print(f"{entry.name} {model} shots {shots}", file=sys.stderr)
                done = subprocess.run(command, env=env, capture_output=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr.decode())
                    raise SystemExit(f"evaluate failed: {' '.join(command)}")
                out.write_bytes(done.stdout)


def _pct(value: float) -> str:
    return f"{value:.3f}"


def table(results: Path) -> str:
    """One row per set and model: the worker (with examples, zero-shot) and the baselines."""
    base: dict[tuple[str, str], dict[str, Any]] = {}
    for line in (results / "baselines.jsonl").read_text().splitlines():
        r = json.loads(line)
        base[(r["set"], r["model"])] = r
    lines = [
        "| set | model | worker, N per label | worker, zero-shot | nearest centroid "
        "| logistic regression (C) | zero-shot descriptions | out-of-scope AUROC: "
        "LR / centroid / zero-shot |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in SUITE:
        for model in MODELS:
            b = base.get((entry.name, model))
            cells = [entry.name, model]
            for shots in (entry.shots, 0):
                path = worker_result(results, entry, shots, model)
                if path.is_file():
                    m = json.loads(path.read_text())["metrics"]
                    cells.append(f"{_pct(m['accuracy'])} ({_pct(m['macro_f1'])})")
                else:
                    cells.append("not run")
            if b is None:
                cells += ["not run"] * 4
            else:
                for method in ("centroid", "logreg", "zero_shot"):
                    s = b[method]
                    cell = f"{_pct(s['accuracy'])} ({_pct(s['macro_f1'])})"
                    if method == "logreg":
                        cell += f" C={b['logreg_C']:g}"
                    cells.append(cell)
                if b["test_oos"]:
                    cells.append(
                        " / ".join(
                            _pct(b[m]["oos_auroc"]) for m in ("logreg", "centroid", "zero_shot")
                        )
                    )
                else:
                    cells.append("–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--results", type=Path, default=None, help="default: DATA/results")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both")
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args(argv)
    results: Path = args.results or data_dir() / "results"
    models = args.model or list(MODELS)
    if args.action == "table":
        print(table(results))
        return 0
    results.mkdir(parents=True, exist_ok=True)
    if not args.skip_worker:
        run_worker(results, models)
    if not args.skip_baselines:
        from evaluation.baselines import suite

        suite(results / "baselines.jsonl", models, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
