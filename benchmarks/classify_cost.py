"""CPU of classification: the head's fit and its per-event cost (issue 13, target 6).

64 labels with a description and 10 examples each (640 examples), 512 dimensions (USE),
batches of 64 events; synthetic unit vectors, one BLAS thread (as the worker's defaults).
Prints the process CPU seconds of ``labels.label_set`` (the fit, cross-validation included)
and the CPU microseconds per event of ``classify.classify_batch``. Compare the latter with
the worker's CPU per event in scenario 4 (docs/benchmarks/README.md).

    python -m benchmarks.classify_cost [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_limits

from worker.analysis import classify
from worker.analysis.config import Classification, Label
from worker.analysis.labels import label_set

LABELS, PER_LABEL, DIMENSION, BATCH = 64, 10, 512, 64


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classify_cost")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(LABELS, DIMENSION)))
    examples = unit(
        np.repeat(centres, PER_LABEL, 0) + rng.normal(0, 0.05, (LABELS * PER_LABEL, DIMENSION))
    )
    descriptions = unit(centres + rng.normal(0, 0.03, (LABELS, DIMENSION)))
    batch = unit(centres[rng.integers(0, LABELS, BATCH)] + rng.normal(0, 0.05, (BATCH, DIMENSION)))
    spec = Classification(
        labels=[Label(name=f"l{i}", descriptions=["d"], examples=["e"]) for i in range(LABELS)]
    )
    rows = [("description", spec.names[i], descriptions[i]) for i in range(LABELS)] + [
        ("example", spec.names[i // PER_LABEL], v) for i, v in enumerate(examples)
    ]
    with threadpool_limits(1):
        started = time.process_time()
        labels = label_set("bench", spec, rows)
        fit = time.process_time() - started
        classify.classify_batch(labels, batch)
        started = time.process_time()
        for _ in range(args.repeats):
            classify.classify_batch(labels, batch)
        per_event = (time.process_time() - started) / (args.repeats * BATCH)
    print(
        json.dumps(
            {
                "examples": LABELS * PER_LABEL,
                "dimension": DIMENSION,
                "fit_cpu_s": round(fit, 2),
                "classify_cpu_us_per_event": round(per_event * 1e6, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
