"""The analysis math: probabilities, votes, moderation, the running quantile and the metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.analysis import quality, scoring
from worker.analysis.config import Action, Rule


def test_softmax_rows_sum_to_one_and_temperature_sharpens() -> None:
    sims = np.array([[0.9, 0.5, 0.1]])
    warm, cold = scoring.softmax(sims, 1.0), scoring.softmax(sims, 0.05)
    assert np.allclose(warm.sum(axis=1), 1) and np.allclose(cold.sum(axis=1), 1)
    assert cold[0, 0] > warm[0, 0] > 1 / 3
    assert np.argmax(cold) == 0
    # Stable for large inputs.
    assert np.all(np.isfinite(scoring.softmax(np.array([[1e4, 0.0]]), 1e-3)))


def test_zero_shot_ranks_the_nearest_label_first() -> None:
    prototypes = np.eye(3, dtype=np.float32)
    vectors = np.array([[0.1, 2.0, 0.2], [5.0, 0.0, 0.1]], dtype=np.float32)  # not unit length
    probs = scoring.zero_shot(vectors, prototypes, 0.1)
    assert list(np.argmax(probs, axis=1)) == [1, 0]


def test_moderation_takes_the_strictest_matching_rule() -> None:
    rules = [
        Rule(label="spam", min_score=0.5, action=Action.REVIEW),
        Rule(label="spam", min_score=0.9, action=Action.BLOCK),
        Rule(label="abuse", min_score=0.3, action=Action.REVIEW),
    ]
    assert scoring.moderate({"spam": 0.95}, rules) == (Action.BLOCK, rules[1])
    assert scoring.moderate({"spam": 0.6}, rules) == (Action.REVIEW, rules[0])
    assert scoring.moderate({"spam": 0.1, "abuse": 0.2}, rules) == (Action.ALLOW, None)


def test_a_rule_on_unknown_acts_on_the_out_of_scope_score() -> None:
    rules = [
        Rule(label="unknown", min_score=0.5, action=Action.REVIEW),
        Rule(label="spam", min_score=0.9, action=Action.BLOCK),
    ]
    # `unknown` is not a label: its probability is never looked up, out_of_scope is.
    assert scoring.moderate({"spam": 0.3, "unknown": 0.9}, rules, 0.4) == (Action.ALLOW, None)
    assert scoring.moderate({"spam": 0.3}, rules, 0.5) == (Action.REVIEW, rules[0])
    # The strictest matching rule still wins.
    assert scoring.moderate({"spam": 0.95}, rules, 0.6) == (Action.BLOCK, rules[1])


def test_histogram_quantile_tracks_the_true_quantile() -> None:
    rng = np.random.default_rng(0)
    scores = rng.beta(2, 8, size=20_000) * 2  # in [0, 2]
    counts = scoring.histogram(list(scores))
    assert counts.sum() == 20_000
    for q in (0.5, 0.9, 0.99):
        estimate = scoring.quantile(counts, q)
        assert estimate is not None
        assert abs(estimate - np.quantile(scores, q)) <= scoring.HIST_MAX / scoring.HIST_BINS
    assert scoring.quantile(np.zeros(scoring.HIST_BINS), 0.9) is None
    # Additive: two halves counted apart sum to the whole.
    assert np.array_equal(
        scoring.histogram(list(scores[:7])) + scoring.histogram(list(scores[7:])), counts
    )


def test_classification_metrics_on_a_hand_worked_example() -> None:
    truth = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert quality.accuracy(truth, pred) == pytest.approx(4 / 6)
    per = quality.per_class(truth, pred)
    assert per["a"].precision == 1.0 and per["a"].recall == pytest.approx(2 / 3)
    assert per["b"].f1 == pytest.approx(0.5)
    assert per["c"].precision == 0.5 and per["c"].recall == 1.0
    expected = np.mean([0.8, 0.5, 2 / 3])
    assert quality.macro_f1(truth, pred) == pytest.approx(expected)


def _brute_auroc(truth: list[bool], scores: list[float]) -> float:
    pos = [s for t, s in zip(truth, scores, strict=True) if t]
    neg = [s for t, s in zip(truth, scores, strict=True) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _ranked_ap(truth: list[bool], scores: list[float]) -> float:
    """Without ties: the mean over positives of the precision at each positive's rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if truth[i]:
            hits += 1
            total += hits / rank
    return total / hits


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 6).map(lambda i: i / 6)), min_size=2, max_size=40
    ).filter(lambda rows: 0 < sum(t for t, _ in rows) < len(rows))
)
def test_auroc_matches_pairwise_counting_with_ties(rows: list[tuple[bool, float]]) -> None:
    truth, scores = [t for t, _ in rows], [s for _, s in rows]
    assert quality.auroc(truth, scores) == pytest.approx(_brute_auroc(truth, scores))


@given(
    st.lists(st.floats(0, 2), min_size=2, max_size=40, unique=True).flatmap(
        lambda scores: st.tuples(
            st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)).filter(any),
            st.just(scores),
        )
    )
)
def test_average_precision_matches_precision_at_each_positive(
    case: tuple[list[bool], list[float]],
) -> None:
    truth, scores = case
    assert quality.average_precision(truth, scores) == pytest.approx(_ranked_ap(truth, scores))


def test_ranking_metrics_extremes() -> None:
    truth = [False, False, True, True]
    assert quality.auroc(truth, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert quality.auroc(truth, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert quality.average_precision(truth, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert quality.average_precision(truth, [0.5] * 4) == pytest.approx(0.5), "all tied: base rate"
    assert np.isnan(quality.auroc([True, True], [0.1, 0.2]))
