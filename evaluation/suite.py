"""Run the development suite and render its table (docs/analysis.md, "Development suite").

    python -m evaluation.datasets build          # once: the data, checked against the manifest
    python -m evaluation.suite run               # the worker (evaluate, out-of-scope streams)
                                                 # and the baselines
    python -m evaluation.suite table             # the Markdown table of what was run

For every set of ``evaluation.datasets.SUITE`` and both local models: ``embedding-worker
evaluate`` with the set's config at its shots for each ``--seed`` (default 0; repeatable),
and zero-shot (``--shots 0``, once: it draws nothing); the out-of-scope protocol's test
rows streamed through the worker (``worker_oos``); then ``evaluation.baselines`` on the
same rows and seeds. Results go to DATA/results (outside the repo); the table gives the mean
over the seeds run, with the standard deviation of the accuracy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.baselines import MODELS
from evaluation.datasets import HERE, SUITE, SuiteSet, data_dir


def worker_result(results: Path, entry: SuiteSet, shots: int, seed: int, model: str) -> Path:
    return results / f"worker.{entry.name}.{shots}.seed{seed}.{model}.json"


def run_worker(results: Path, models: list[str], seeds: list[int]) -> None:
    for model in models:
        for entry in SUITE:
            # Zero-shot draws nothing: one run, whatever the seed.
            runs = [(entry.shots, seed) for seed in seeds] + ([(0, 0)] if 0 in seeds else [])
            for shots, seed in runs:
                out = worker_result(results, entry, shots, seed, model)
                command = [
                    str(Path(sys.executable).parent / "embedding-worker"),
                    "evaluate",
                    str(data_dir() / entry.file),
                    "--labels",
                    str(HERE / entry.labels),
                    "--shots",
                    str(shots),
                    "--seed",
                    str(seed),
                    "--json",
                    *(["--positive", entry.positive] if entry.positive else []),
                ]
                env = {**os.environ, "EMBEDDING_WORKER_PROVIDER__MODEL": model}
                print(f"{entry.name} {model} shots {shots} seed {seed}", file=sys.stderr)
                done = subprocess.run(command, env=env, capture_output=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr.decode())
                    raise SystemExit(f"evaluate failed: {' '.join(command)}")
                out.write_bytes(done.stdout)


def oos_result(results: Path, entry: SuiteSet, seed: int, model: str) -> Path:
    return results / f"worker_oos.{entry.name}.seed{seed}.{model}.json"


async def worker_oos(entry: SuiteSet, model: str, seed: int) -> dict[str, Any]:
    """The worker on the out-of-scope protocol: every test row, in scope or not, streamed.

    ``evaluate`` reports labels, not each row's scores, so this streams the protocol's test
    rows through the same pipeline (``worker.tools.evaluate._run``; evaluate.py is left as it is)
    and scores the ``out_of_scope`` field of each result. The test rows are streamed in an
    order shuffled with the seed: the unknown intents arrive among the known ones, as they
    would in production (the file puts them last).
    """
    from worker.analysis.config import NamespaceAnalysis
    from worker.analysis.quality import accuracy, auroc, macro_f1
    from worker.config import load_settings
    from worker.tools.evaluate import _run, label_set, read_rows, split

    assert entry.protocol is not None
    rows = read_rows(data_dir() / entry.protocol)
    in_scope = [r for r in rows if r.label != "oos"]
    examples, test_in = split(in_scope, entry.shots, seed)
    tested = {r.index for r in test_in}
    test = [r for r in rows if r.label == "oos" or r.index in tested]
    test = [test[int(i)] for i in np.random.default_rng(seed).permutation(len(test))]
    spec = label_set(in_scope, examples, HERE / entry.labels, None)
    base = load_settings(provider={"kind": "local", "model": model})
    got = await _run(base, NamespaceAnalysis(classify=spec), test, progress=False)
    unknown = [float(got[r.index]["out_of_scope"]) for r in test]
    kept = [r for r in test if r.label != "oos"]
    predicted = [got[r.index]["label"] for r in kept]
    truth = [r.label for r in kept]
    return {
        "set": entry.name,
        "model": model,
        "seed": seed,
        "test_in_scope": len(kept),
        "test_oos": len(test) - len(kept),
        "accuracy": round(accuracy(truth, predicted), 4),
        "macro_f1": round(macro_f1(truth, predicted), 4),
        "oos_auroc": round(auroc([r.label == "oos" for r in test], unknown), 4),
    }


def run_worker_oos(results: Path, models: list[str], seeds: list[int]) -> None:
    for model in models:
        for entry in SUITE:
            if entry.protocol is None:
                continue
            for seed in seeds:
                print(f"{entry.name} {model} out-of-scope stream, seed {seed}", file=sys.stderr)
                result = asyncio.run(worker_oos(entry, model, seed))
                oos_result(results, entry, seed, model).write_text(json.dumps(result) + "\n")


def _cell(values: list[dict[str, Any]], positive: str | None) -> str:
    """Accuracy (macro-F1), mean over the seeds with the standard deviation of the accuracy,
    and the positive label's F1 when the set has one."""
    if not values:
        return "not run"
    acc = np.array([v["accuracy"] for v in values])
    f1 = np.mean([v["macro_f1"] for v in values])
    cell = f"{acc.mean():.3f} ({f1:.3f})"
    if len(values) > 1:
        cell += f" ±{acc.std(ddof=1):.3f}"
    if positive is not None:
        cell += f"; F1({positive}) {np.mean([v['positive']['f1'] for v in values]):.3f}"
    return cell


def table(results: Path) -> str:
    """One row per set and model: the worker (with examples, zero-shot) and the baselines."""
    base: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in (results / "baselines.jsonl").read_text().splitlines():
        r = json.loads(line)
        base[(r["set"], r["model"])].append(r)
    lines = [
        "| set, examples | model | seeds | worker (defaults) | nearest centroid "
        "| logistic regression (C) | worker, zero-shot (all rows) | zero-shot descriptions "
        "(all rows) | out-of-scope AUROC: worker / LR / centroid / zero-shot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in SUITE:
        for model in MODELS:
            b = {r["seed"]: r for r in base[(entry.name, model)]}  # the last run of a seed
            seeds = sorted(b)
            worker = {}
            for seed in seeds:
                path = worker_result(results, entry, entry.shots, seed, model)
                if path.is_file():
                    worker[seed] = json.loads(path.read_text())["metrics"]
            zero = worker_result(results, entry, 0, 0, model)
            cs = sorted({b[s]["logreg_C"] for s in seeds})
            cells = [
                f"{entry.name}, {entry.shots}/label",
                model,
                ", ".join(map(str, seeds)) if worker.keys() == b.keys() else "mismatch",
                _cell([worker[s] for s in seeds if s in worker], entry.positive),
                _cell([b[s]["centroid"] for s in seeds], entry.positive),
                _cell([b[s]["logreg"] for s in seeds], entry.positive)
                + f" C={'/'.join(f'{c:g}' for c in cs)}",
                _cell(
                    [json.loads(zero.read_text())["metrics"]] if zero.is_file() else [],
                    entry.positive,
                ),
                _cell([b[seeds[0]]["zero_shot_all_rows"]] if seeds else [], entry.positive),
            ]
            if seeds and b[seeds[0]]["test_oos"]:
                paths = [oos_result(results, entry, s, model) for s in seeds]
                streamed = [json.loads(p.read_text()) for p in paths if p.is_file()]
                worker_auroc = (
                    f"{np.mean([r['oos_auroc'] for r in streamed]):.3f}" if streamed else "not run"
                )
                cells.append(
                    " / ".join(
                        [worker_auroc]
                        + [
                            f"{np.mean([b[s][m]['oos_auroc'] for s in seeds]):.3f}"
                            for m in ("logreg", "centroid", "zero_shot")
                        ]
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
    parser.add_argument(
        "action",
        choices=["run", "oos", "table"],
        help="oos: only the worker's out-of-scope streams",
    )
    parser.add_argument("--results", type=Path, default=None, help="default: DATA/results")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both")
    parser.add_argument("--seed", type=int, action="append", help="default: 0 (repeatable)")
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args(argv)
    results: Path = args.results or data_dir() / "results"
    models = args.model or list(MODELS)
    seeds = args.seed or [0]
    if args.action == "table":
        print(table(results))
        return 0
    results.mkdir(parents=True, exist_ok=True)
    if args.action == "oos":
        run_worker_oos(results, models, seeds)
        return 0
    if not args.skip_worker:
        run_worker(results, models, seeds)
        run_worker_oos(results, models, seeds)
    if not args.skip_baselines:
        from evaluation.baselines import suite

        suite(results / "baselines.jsonl", models, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
