"""Simple baselines on the vectors the worker computes, for the development suite (issue 13).

For a labeled JSONL file and its ``evaluate`` label file, with the examples drawn exactly as
``embedding-worker evaluate --shots N --seed S`` draws them (``worker.tools.evaluate.split``):

- nearest centroid: cosine to the normalised mean of each label's examples;
- logistic regression on the unit vectors, class-balanced, C chosen by stratified
  cross-validation (log-loss) on the examples only;
- zero-shot: cosine to the normalised mean of each label's descriptions (no examples).

Rows labeled ``--oos-label`` (default ``oos``) are never examples and are all test rows: their
right answer is "none of the labels". Accuracy and macro-F1 are over the in-scope test rows;
AUROC of telling out-of-scope rows from in-scope ones uses 1 - top probability (logistic
regression) and 1 - top cosine (centroid, zero-shot).

Vectors come from the worker's own embedder (``worker.embedding.providers.create_embedder``:
the local model in its child process, texts as documents, descriptions as the label set's
``description_type``), and are cached by text under the data directory.

    python -m evaluation.baselines FILE --labels evaluation/SET.toml --shots N [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.datasets import HERE, SUITE, data_dir
from worker.analysis import quality
from worker.analysis.config import Classification, load_analysis
from worker.config import load_settings
from worker.embedding.providers import create_embedder
from worker.events import TextType
from worker.tools.evaluate import Row, read_rows, split

MODELS = ("use-multilingual-v3", "multilingual-e5-small")


class VectorCache:
    """Unit vectors by (model, text type, text), in one .npz per model under ``directory``."""

    def __init__(self, directory: Path, model: str) -> None:
        self.path = directory / f"{model}.npz"
        self.model = model
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path) as data:
                self.vectors = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))

    @staticmethod
    def key(text: str, text_type: TextType) -> str:
        return hashlib.sha256(f"{text_type.value}\0{text}".encode()).hexdigest()

    async def embed(self, texts: Sequence[str], text_type: TextType) -> np.ndarray:
        missing = sorted({t for t in texts if self.key(t, text_type) not in self.vectors})
        if missing:
            settings = load_settings(provider={"kind": "local", "model": self.model})
            embedder = create_embedder(settings.provider)
            step = embedder.max_texts
            try:
                for start in range(0, len(missing), step):
                    chunk = missing[start : start + step]
                    got = (await embedder.embed(chunk, text_type)).vectors
                    for text, vector in zip(chunk, normalise(got), strict=True):
                        self.vectors[self.key(text, text_type)] = vector
                    print(
                        f"\r{self.model}: {start + len(chunk)}/{len(missing)}",
                        end="",
                        file=sys.stderr,
                    )
            finally:
                print(file=sys.stderr)
                await embedder.close()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keys = np.array(sorted(self.vectors))
            partial = self.path.with_suffix(".partial.npz")
            np.savez(partial, keys=keys, vectors=np.stack([self.vectors[k] for k in keys]))
            partial.replace(self.path)  # a run stopped mid-write leaves the old cache whole
        return np.stack([self.vectors[self.key(t, text_type)] for t in texts])


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.asarray(v / np.where(norms == 0, 1.0, norms))


def centroids(vectors: np.ndarray, labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The normalised mean vector of each name's rows, in ``names`` order."""
    y = np.asarray(labels)
    return normalise(np.stack([vectors[y == n].mean(axis=0) for n in names]))


def logistic_regression(x: np.ndarray, labels: Sequence[str], seed: int) -> tuple[Any, float]:
    """Class-balanced logistic regression, C by stratified CV (log-loss) on the examples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    folds = int(min(5, *np.unique(np.asarray(labels), return_counts=True)[1]))
    search = GridSearchCV(
        LogisticRegression(class_weight="balanced", max_iter=5000),
        {"C": [float(c) for c in np.logspace(-1, 4, 6)]},
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
    )
    search.fit(x, np.asarray(labels))
    return search.best_estimator_, float(search.best_params_["C"])


def scores(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    return {
        "accuracy": round(quality.accuracy(truth, predicted), 4),
        "macro_f1": round(quality.macro_f1(truth, predicted), 4),
    }


def positive_scores(
    truth: Sequence[str], predicted: Sequence[str], positive: str
) -> dict[str, float]:
    s = quality.prf([t == positive for t in truth], [p == positive for p in predicted])
    return {"precision": round(s.precision, 4), "recall": round(s.recall, 4), "f1": round(s.f1, 4)}


async def run(
    path: Path,
    spec: Classification,
    model: str,
    shots: int,
    seed: int,
    oos_label: str,
    positive: str | None,
    cache_dir: Path,
) -> dict[str, Any]:
    rows = read_rows(path)
    in_scope = [r for r in rows if r.label != oos_label]
    examples, test_in = split(in_scope, shots, seed)
    tested = {r.index for r in test_in}
    test: list[Row] = [r for r in rows if r.label == oos_label or r.index in tested]
    is_oos = np.array([r.label == oos_label for r in test])
    names = sorted({r.label for r in in_scope})
    cache = VectorCache(cache_dir, model)
    ex_vectors = await cache.embed([r.text for r in examples], TextType.DOCUMENT)
    test_vectors = await cache.embed([r.text for r in test], TextType.DOCUMENT)
    by_name = {label.name: label for label in spec.labels}
    flat = [(n, d) for n in names for d in by_name[n].descriptions]
    flat_vectors = await cache.embed([d for _, d in flat], spec.description_type)
    description_vectors = [
        flat_vectors[[i for i, (m, _) in enumerate(flat) if m == n]] for n in names
    ]
    ex_labels = [r.label for r in examples]
    truth = [r.label for r in test if r.label != oos_label]

    proto = centroids(ex_vectors, ex_labels, names)
    centroid_sim = test_vectors @ proto.T
    lr, c = logistic_regression(ex_vectors, ex_labels, seed)
    lr_prob = lr.predict_proba(test_vectors)
    lr_names = [str(n) for n in lr.classes_]
    zs = normalise(np.stack([v.mean(axis=0) for v in description_vectors]))
    zs_sim = test_vectors @ zs.T

    methods: dict[str, tuple[list[str], np.ndarray]] = {
        "centroid": ([names[i] for i in centroid_sim.argmax(axis=1)], 1 - centroid_sim.max(axis=1)),
        "logreg": ([lr_names[i] for i in lr_prob.argmax(axis=1)], 1 - lr_prob.max(axis=1)),
        "zero_shot": ([names[i] for i in zs_sim.argmax(axis=1)], 1 - zs_sim.max(axis=1)),
    }
    out: dict[str, Any] = {
        "file": str(path),
        "model": model,
        "rows": len(rows),
        "seed": seed,
        "examples": len(examples),
        "test_in_scope": len(truth),
        "test_oos": int(is_oos.sum()),
        "split": f"seed {seed}: {shots} examples per label, as `evaluate --shots {shots}` draws",
        "logreg_C": c,
    }
    for method, (predicted, unknown_score) in methods.items():
        kept = [p for p, o in zip(predicted, is_oos, strict=True) if not o]
        result: dict[str, Any] = dict(scores(truth, kept))
        if positive is not None:
            result["positive"] = positive_scores(truth, kept, positive)
        if is_oos.any():
            result["oos_auroc"] = round(quality.auroc(is_oos.tolist(), unknown_score.tolist()), 4)
        out[method] = result
    # Zero-shot needs no examples: also over every in-scope row, the rows `--shots 0` tests.
    all_vectors = await cache.embed([r.text for r in in_scope], TextType.DOCUMENT)
    everything = (all_vectors @ zs.T).argmax(axis=1)
    out["zero_shot_all_rows"] = dict(
        scores([r.label for r in in_scope], [names[i] for i in everything])
    )
    if positive is not None:
        out["zero_shot_all_rows"]["positive"] = positive_scores(
            [r.label for r in in_scope], [names[i] for i in everything], positive
        )
    return out


def suite(out: Path, models: Sequence[str], seeds: Sequence[int]) -> None:
    """Every set of the suite with every model and seed, appended as JSON lines to ``out``."""
    with out.open("a") as f:
        for seed in seeds:
            for entry in SUITE:
                spec = _label_set(HERE / entry.labels, None)
                path = data_dir() / (entry.protocol or entry.file)
                for model in models:
                    result = asyncio.run(
                        run(
                            path,
                            spec,
                            model,
                            entry.shots,
                            seed,
                            "oos",
                            entry.positive,
                            data_dir() / "vectors",
                        )
                    )
                    f.write(json.dumps({"set": entry.name, **result}) + "\n")
                    f.flush()
                    print(f"{entry.name} {model} seed {seed}: done", file=sys.stderr)


def _label_set(path: Path, namespace: str | None) -> Classification:
    namespaces = load_analysis(path).namespaces
    chosen = namespace or next(n for n, ns in namespaces.items() if ns.classify)
    spec = namespaces[chosen].classify
    if spec is None:
        raise SystemExit(f"{path} has no label set in namespace {chosen!r}")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, nargs="?", help="omit with --suite")
    parser.add_argument("--labels", type=Path, help="the set's evaluate config")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oos-label", default="oos")
    parser.add_argument("--positive", default=None, help="also P/R/F1 of this label")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both")
    parser.add_argument("--cache", type=Path, default=None, help="default: DATA/vectors")
    parser.add_argument(
        "--suite",
        type=Path,
        metavar="OUT.jsonl",
        help="run every set of evaluation.datasets.SUITE, results appended to OUT",
    )
    args = parser.parse_args(argv)
    models = args.model or MODELS
    if args.suite:
        suite(args.suite, models, [args.seed])
        return 0
    if args.file is None or args.labels is None or args.shots < 1:
        parser.error("FILE, --labels and --shots N (N >= 1) are needed without --suite")
    spec = _label_set(args.labels, args.namespace)
    for model in models:
        result = asyncio.run(
            run(
                args.file,
                spec,
                model,
                args.shots,
                args.seed,
                args.oos_label,
                args.positive,
                args.cache or data_dir() / "vectors",
            )
        )
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
