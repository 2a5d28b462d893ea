"""The classification head against the baselines on cached vectors (issue 13, offline).

For every set of the suite and the two shared classification sets, both local models and the
seeds given: the worker's own head (``worker.analysis.head.fit``, the code the worker runs)
and the baselines of ``evaluation.baselines`` (nearest centroid, logistic regression with C
by CV, zero-shot descriptions), on the same examples (``worker.tools.evaluate.split``) and the same
cached vectors (``DATA/vectors``, filled by ``evaluation.baselines``). Also, to choose the
defaults: the head without its description prior, the head plus the old k-NN vote over the
examples, several out-of-scope scores on the out-of-scope protocol, repeated folds and the
one-standard-error rule (``head_cv3``, ``head_1se``), and self-training gated by the head's
confidence (``self_p…_q…``). One JSON line per set, model and seed; ``--summary`` prints the
mean over seeds and each variant's mean rank of accuracy and of ECE across every set and
model (ties share their ranks).

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
from dataclasses import replace
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
# (examples, their labels, labels, description vectors, test vectors, seed) -> (head, logits)
Variant = Callable[
    [np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, int], tuple[Any, np.ndarray]
]


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


FITTED: dict[int, heads.Head] = {}  # this run's head, reused by with_vote and self-training


def head_only(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray, _: int) -> Any:
    fitted = FITTED[id(x)] = heads.fit(x, y, n, d)
    return fitted, fitted.logits(t)


def no_prior(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray, _: int) -> Any:
    fitted = heads.fit(x, y, n, None)
    return fitted, fitted.logits(t)


def with_vote(x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray, _: int) -> Any:
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


def with_settings(repeats: int, one_se: bool, platt: bool = False) -> Variant:
    """The head with its C, prior and temperature chosen on ``repeats`` repeats of the folds,
    by the one-standard-error rule when ``one_se``, and against Platt's targets when ``platt``
    (``head.REPEATS``, ``head.ONE_SE``, ``head.PLATT``)."""

    def variant(
        x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray, _: int
    ) -> tuple[heads.Head, np.ndarray]:
        before = heads.REPEATS, heads.ONE_SE, heads.PLATT
        heads.REPEATS, heads.ONE_SE, heads.PLATT = repeats, one_se, platt
        try:
            fitted = heads.fit(x, y, n, d)
        finally:
            heads.REPEATS, heads.ONE_SE, heads.PLATT = before
        return fitted, fitted.logits(t)

    return variant


SELF_TRAIN_FIRST = 100  # stream events before the first refit; then one at every doubling


def self_training(sure: float, typical: float, recalibrate: bool) -> Variant:
    """The head, refitted on the stream events it was sure of (issue 13's proposal).

    The test rows arrive in a seeded order (a stream); each is classified by the head as it
    stands, and kept as an example of its predicted label when its top probability is at
    least ``sure`` and its ``out_of_scope`` at most ``typical``. After 100 events and at
    every doubling, the head is refitted on the examples and every event kept so far, with
    the C and prior the examples' cross-validation chose. The kept events are the head's own
    answers, so they never measure it: with ``recalibrate``, the temperature and the
    out-of-scope reference are fitted again on the examples' folds, each held-out fold's
    model trained on the other folds and every kept event; without, they stay the first
    fit's. Figures are of the predictions as made, before the event could teach anything.
    """

    def variant(
        x: np.ndarray, y: np.ndarray, n: int, d: np.ndarray, t: np.ndarray, seed: int
    ) -> tuple[heads.Head, np.ndarray]:
        base = FITTED.get(id(x)) or heads.fit(x, y, n, d)
        current = base
        order = np.random.default_rng(seed).permutation(len(t))
        logits = np.zeros((len(t), n))
        kept_x, kept_y = [np.zeros((0, x.shape[1]))], [np.zeros(0, dtype=np.int64)]
        start, stop = 0, SELF_TRAIN_FIRST
        while start < len(t):
            rows = order[start:stop]
            got = current.logits(t[rows])
            logits[rows] = got
            confident = (softmax(got, axis=1).max(axis=1) >= sure) & (
                current.out_of_scope(got) <= typical
            )
            kept_x.append(t[rows][confident])
            kept_y.append(got.argmax(axis=1)[confident])
            start, stop = stop, 2 * stop
            if start < len(t):
                kx, ky = np.vstack(kept_x), np.concatenate(kept_y)
                current = _refit(base, x, y, kx, ky, n, d, recalibrate)
        return current, logits

    return variant


def _refit(
    base: heads.Head,
    x: np.ndarray,
    y: np.ndarray,
    kept_x: np.ndarray,
    kept_y: np.ndarray,
    n: int,
    d: np.ndarray,
    recalibrate: bool,
) -> heads.Head:
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    def fitted_on(xs: np.ndarray, ys: np.ndarray) -> Any:
        xs, ys = np.vstack([xs, kept_x]), np.concatenate([ys, kept_y])
        return heads._fit_one(xs, ys, np.bincount(ys, minlength=n), d, base.c, base.prior)

    with threadpool_limits(1):
        x, y = heads.canonical(x, y)
        model = fitted_on(x, y)
        if not recalibrate:
            refitted = heads._head(model, n, base.temperature, None, base.c, base.prior)
            return replace(base, weights=refitted.weights, bias=refitted.bias)
        folds = min(heads.FOLDS, int(np.bincount(y, minlength=n).min()))
        oof = np.zeros((len(y), n))
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
            oof[test] = heads._logits(fitted_on(x[train], y[train]), x[test], n)
        temperature, _ = heads.temperature(oof, y)
        return heads._head(model, n, temperature, oof, base.c, base.prior)


VARIANTS: dict[str, Variant] = {
    "head": head_only,
    "head_no_prior": no_prior,
    "head_vote": with_vote,
    "head_cv3": with_settings(3, False),
    "head_1se": with_settings(1, True),
    "head_cv3_1se": with_settings(3, True),
    "head_platt": with_settings(1, False, True),
    "self_uncal_p0.9_q0.5": self_training(0.9, 0.5, False),
    **{
        f"self_p{sure:g}_q{typical:g}": self_training(sure, typical, True)
        for sure in (0.8, 0.9, 0.95)
        for typical in (0.5, 0.9)
    },
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
    FITTED.clear()
    for variant, fn in VARIANTS.items():
        if variant not in variants:
            continue
        started = time.process_time()
        fitted, logits = fn(xe, ye, len(names), d, xt, seed)
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


def mid_rank(value: float, values: list[float], higher: bool) -> float:
    """1 for the best of ``values``; ties share the mean of their ranks."""
    better = sum((v > value) if higher else (v < value) for v in values)
    return 1 + better + (values.count(value) - 1) / 2


def summary(path: Path) -> None:
    """Mean over seeds per set and model, and each method's mean rank of accuracy and ECE."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if not r.get("missing")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["set"], r["model"])].append(r)
    methods = [m for m in [*VARIANTS, "logreg", "centroid"] if m in runs[0]]
    ranks: dict[str, list[float]] = defaultdict(list)
    ece_ranks: dict[str, list[float]] = defaultdict(list)
    for (name, model), rs in sorted(groups.items()):
        mean = {m: round(float(np.mean([r[m]["accuracy"] for r in rs])), 4) for m in methods}
        calibration = {m: round(float(np.mean([r[m]["ece"] for r in rs])), 4) for m in methods}
        for m in methods:
            ranks[m].append(mid_rank(mean[m], [mean[o] for o in methods], higher=True))
            ece_ranks[m].append(mid_rank(calibration[m], list(calibration.values()), higher=False))
        line: dict[str, Any] = {"set": name, "model": model, "seeds": sorted(r["seed"] for r in rs)}
        for m in [*methods, "zero_shot"]:
            line[m] = {
                k: round(float(np.mean([r[m][k] for r in rs])), 4)
                for k in ("accuracy", "macro_f1", "ece", "oos_auroc", "f1_positive")
                if k in rs[0][m]
            }
        print(json.dumps(line))
    for what, got in (("accuracy", ranks), ("ece", ece_ranks)):
        mean_rank = {m: round(float(np.mean(v)), 2) for m, v in got.items()}
        print(json.dumps({f"mean_rank_of_{what}": mean_rank}))


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
