"""The classification head against the baselines on cached vectors (issue 13, offline).

For every set of the suite and the two shared classification sets, both local models and the
seeds given: the worker's own head (``worker.analysis.head.fit``, the code the worker runs)
and the baselines of ``evaluation.baselines`` (nearest centroid, logistic regression with C
by CV, zero-shot descriptions), on the same examples (``worker.tools.evaluate.split``) and the same
cached vectors (``DATA/vectors``, filled by ``evaluation.baselines``). Also, to choose the
defaults: the head without its description prior, the head plus the old k-NN vote over the
examples, and several out-of-scope scores on the out-of-scope protocol. One JSON line per
set, model and seed; ``--summary`` prints the mean over seeds and the mean rank of each
variant across every set and model.

    python -m evaluation.offline [--seed 0 --seed 1 ...] [--test-limit N] > OUT.jsonl
    python -m evaluation.offline --summary OUT.jsonl

Expected calibration error: 15 equal-width bins of the top probability, over in-scope test
rows. Rows without cached vectors are reported as missing (embed them with
``python -m evaluation.baselines`` first). ``--test-limit`` keeps the first N in-scope test
rows (used for e5 on the two large shared sets, whose full embedding takes an hour here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax

from evaluation.baselines import MODELS, VectorCache, _label_set, centroids, logistic_regression
from evaluation.baselines import normalise as unit_rows
from evaluation.datasets import HERE, data_dir
from worker.analysis import head as heads
from worker.analysis import quality
from worker.events import TextType
from worker.tools.evaluate import read_rows, split

SHARED = Path(
    os.environ.get("EMBEDDING_WORKER_SHARED_DATASETS", HERE.parent.parent / "shared" / "datasets")
)
# name: (file, evaluate config, shots, positive label, dedupe)
SETS: dict[str, tuple[Callable[[], Path], str, int, str | None, bool]] = {
    "hwu64": (lambda: data_dir() / "hwu64.jsonl", "hwu64.toml", 10, None, False),
    "hwu64_oos": (lambda: data_dir() / "hwu64_oos.jsonl", "hwu64_oos.toml", 10, None, False),
    "ethos": (lambda: data_dir() / "ethos.jsonl", "ethos.toml", 32, "hate", False),
    "xsid": (lambda: data_dir() / "xsid.jsonl", "xsid.toml", 8, None, False),
    "sms_spam": (lambda: SHARED / "sms_spam/sms_spam.jsonl", "sms_spam.toml", 32, "spam", True),
    "ag_news": (lambda: SHARED / "ag_news/ag_news_test.jsonl", "ag_news.toml", 32, None, False),
}
Variant = Callable[[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray], tuple[Any, np.ndarray]]


def ece(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == truth
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(
        sum(
            (which == b).mean() * abs(right[which == b].mean() - conf[which == b].mean())
            for b in range(bins)
            if (which == b).any()
        )
    )


FITTED: dict[int, heads.Head] = {}  # the head of this run's examples, reused by with_vote


def head_only(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray) -> Any:
    FITTED.clear()
    fitted = FITTED[id(x)] = heads.fit(x, y, n, d)
    return fitted, fitted.logits(t)


def no_prior(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray) -> Any:
    fitted = heads.fit(x, y, n, None)
    return fitted, fitted.logits(t)


def with_vote(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray) -> Any:
    """The head plus the removed few-shot vote (k = 10, temperature 0.05, over examples)."""
    fitted = FITTED.get(id(x)) or heads.fit(x, y, n, d)
    sims = t @ x.T
    top = np.argsort(-sims, axis=1)[:, :10]
    votes = np.zeros((len(t), n))
    for i in range(len(t)):
        s = sims[i, top[i]]
        np.add.at(votes[i], y[top[i]], np.exp((s - s.max()) / 0.05))
    votes /= votes.sum(axis=1, keepdims=True)
    return fitted, fitted.logits(t) + np.log(votes + 1e-3)


VARIANTS: dict[str, Variant] = {
    "head": head_only,
    "head_no_prior": no_prior,
    "head_vote": with_vote,
}


def vectors(model: str, texts: list[str], text_type: TextType) -> np.ndarray | None:
    cache = VectorCache(data_dir() / "vectors", model)
    keys = [cache.key(t, text_type) for t in texts]
    if any(k not in cache.vectors for k in keys):
        return None
    return np.stack([cache.vectors[k] for k in keys]).astype(np.float64)


def run(
    name: str, model: str, seed: int, test_limit: int | None, variants: list[str]
) -> dict[str, Any]:
    path, config, shots, positive, dedupe = SETS[name]
    spec = _label_set(HERE / config, None)
    rows = read_rows(path(), dedupe=dedupe)
    in_scope = [r for r in rows if r.label != "oos"]
    examples, test_in = split(in_scope, shots, seed)
    if test_limit:
        test_in = test_in[:test_limit]
    tested = {r.index for r in test_in}
    test = [r for r in rows if r.label == "oos" or r.index in tested]
    names = spec.names
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, Any] = {"set": name, "model": model, "seed": seed, "test_rows": len(test)}
    xe = vectors(model, [r.text for r in examples], TextType.DOCUMENT)
    xt = vectors(model, [r.text for r in test], TextType.DOCUMENT)
    described = [vectors(model, label.descriptions, spec.description_type) for label in spec.labels]
    if xe is None or xt is None or any(d is None for d in described):
        return {**out, "missing": True}
    d = unit_rows(np.stack([v.mean(axis=0) for v in described if v is not None]))
    ye = np.array([index[r.label] for r in examples])
    oos = np.array([r.label == "oos" for r in test])
    inside = ~oos
    truth = np.array([index[r.label] for r in test if r.label != "oos"])

    def scored(probs: np.ndarray) -> dict[str, Any]:
        predicted = probs[inside].argmax(axis=1)
        got: dict[str, Any] = {
            "accuracy": round(float((predicted == truth).mean()), 4),
            "macro_f1": round(
                quality.macro_f1([names[i] for i in truth], [names[i] for i in predicted]), 4
            ),
            "ece": round(ece(probs[inside], truth), 4),
        }
        if positive is not None:
            p = index[positive]
            got["f1_positive"] = round(quality.prf(truth == p, predicted == p).f1, 4)
        return got

    def auroc(score: np.ndarray) -> float:
        return round(quality.auroc(oos.tolist(), score.tolist()), 4)

    cen = t_cos = xt @ centroids(xe, [r.label for r in examples], names).T
    out["centroid"] = scored(softmax(cen / 0.05, axis=1))
    lr, c = logistic_regression(xe, [r.label for r in examples], seed)
    order = [[str(k) for k in lr.classes_].index(n) for n in names]
    lr_probs = lr.predict_proba(xt)[:, order]
    out["logreg"] = {**scored(lr_probs), "C": c}
    out["zero_shot"] = scored(softmax(xt @ d.T / 0.1, axis=1))
    if oos.any():
        out["logreg"]["oos_auroc"] = auroc(1 - lr_probs.max(axis=1))
        out["centroid"]["oos_auroc"] = auroc(1 - t_cos.max(axis=1))
    for variant, fn in VARIANTS.items():
        if variant not in variants:
            continue
        started = time.process_time()
        fitted, logits = fn(xe, ye, len(names), d, xt)
        probs = softmax(logits, axis=1)
        result = {
            **scored(probs),
            "C": fitted.c,
            "prior": fitted.prior,
            "temperature": round(fitted.temperature, 4),
            "fit_cpu_s": round(time.process_time() - started, 2),
        }
        unknown = fitted.out_of_scope(logits)
        result["oos_mean_in_scope"] = round(float(unknown[inside].mean()), 3)
        result["oos_above_095_in_scope"] = round(float((unknown[inside] > 0.95).mean()), 3)
        if oos.any():
            result["oos_auroc"] = auroc(unknown)
            if variant == "head":  # the candidate out-of-scope scores
                result["oos_auroc_candidates"] = {
                    "1-top_probability": auroc(1 - probs.max(axis=1)),
                    "energy": auroc(-logsumexp(logits, axis=1)),
                    "1-top_cosine_to_centroid": auroc(1 - t_cos.max(axis=1)),
                    "1-top_cosine_to_example": auroc(1 - (xt @ xe.T).max(axis=1)),
                }
        out[variant] = result
    return out


def summary(path: Path) -> None:
    """Mean over seeds per set and model, and each method's mean rank of accuracy."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if not r.get("missing")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["set"], r["model"])].append(r)
    methods = [
        m for m in ["head", "head_no_prior", "head_vote", "logreg", "centroid"] if m in runs[0]
    ]
    ranks: dict[str, list[float]] = defaultdict(list)
    for (name, model), rs in sorted(groups.items()):
        mean = {m: float(np.mean([r[m]["accuracy"] for r in rs])) for m in methods}
        order = sorted(methods, key=lambda m: -mean[m])
        for m in methods:
            ranks[m].append(1 + order.index(m))
        line: dict[str, Any] = {"set": name, "model": model, "seeds": sorted(r["seed"] for r in rs)}
        for m in [*methods, "zero_shot"]:
            line[m] = {
                k: round(float(np.mean([r[m][k] for r in rs])), 4)
                for k in ("accuracy", "macro_f1", "ece", "oos_auroc", "f1_positive")
                if k in rs[0][m]
            }
        print(json.dumps(line))
    print(
        json.dumps({"mean_rank_of_accuracy": {m: round(np.mean(v), 2) for m, v in ranks.items()}})
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.offline", description=__doc__)
    parser.add_argument("--set", action="append", choices=sorted(SETS), help="default: all")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both")
    parser.add_argument("--seed", type=int, action="append", help="default: 0 (repeatable)")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    parser.add_argument("--summary", type=Path, default=None, metavar="OUT.jsonl")
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0
    for seed in args.seed or [0]:
        for name in args.set or list(SETS):
            for model in args.model or list(MODELS):
                got = run(name, model, seed, args.test_limit, args.variant or list(VARIANTS))
                print(json.dumps(got), flush=True)
                print(f"{name} {model} seed {seed}: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
