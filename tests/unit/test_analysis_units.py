"""Classification and anomaly scoring as pure functions of vectors and state (no I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.factories import upsert
from worker.analysis import anomaly, classify
from worker.analysis.config import (
    Action,
    AnalysisFileError,
    Anomaly,
    Classification,
    Focus,
    Label,
    NamespaceAnalysis,
    Rule,
    load_analysis,
)
from worker.analysis.labels import label_set, prototypes
from worker.analysis.state import Delta, NamespaceState

DIM = 8


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def axis(i: int, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    v = np.zeros(DIM)
    v[i] = 1.0
    if noise and rng is not None:
        v = v + rng.normal(0, noise, DIM)
    return unit(v)


def empty_state() -> NamespaceState:
    return NamespaceState(0, np.zeros(DIM), np.zeros(1000))


def spec(descriptions: bool = True) -> Classification:
    return Classification(
        labels=[
            Label(name=n, descriptions=["d"] if descriptions else [], examples=["e"])
            for n in ("a", "b", "c")
        ]
    )


def rows(
    descriptions: bool, examples: int, rng: np.random.Generator, kind: str = "example"
) -> list[tuple[str, str, np.ndarray]]:
    """Stored label rows: one description per label on its axis, examples around it."""
    out = [("description", n, axis(i)) for i, n in enumerate("abc")] if descriptions else []
    out += [(kind, n, axis(i, 0.4, rng)) for i, n in enumerate("abc") for _ in range(examples)]
    return out


def test_zero_shot_picks_the_nearest_description() -> None:
    rng = np.random.default_rng(0)
    labels = label_set("ns", spec(), rows(True, 0, rng))
    assert labels.head is None
    vectors = np.vstack([axis(i % 3, 0.1, rng) for i in range(30)])
    out = classify.classify_batch(labels, vectors)
    assert [c.label for c in out] == [i % 3 for i in range(30)]
    assert all(abs(c.probabilities.sum() - 1) < 1e-9 for c in out)
    assert all(0.0 <= c.out_of_scope <= 1.0 for c in out)
    assert classify.method_of(labels) == "zero-shot"


def test_few_shot_uses_the_head_fitted_on_the_examples() -> None:
    rng = np.random.default_rng(1)
    labels = label_set("ns", spec(descriptions=False), rows(False, 6, rng))
    assert labels.head is not None and labels.prototypes is None
    assert list(labels.example_counts) == [6, 6, 6]
    vectors = np.vstack([axis(i % 3, 0.3, rng) for i in range(30)])
    out = classify.classify_batch(labels, vectors)
    assert sum(c.label == i % 3 for i, c in enumerate(out)) >= 27
    assert classify.method_of(labels) == "few-shot"
    described = label_set("ns", spec(), rows(True, 6, rng))
    assert classify.method_of(described) == "zero-shot+few-shot"


def test_decision_rows_count_as_examples_and_refit_the_head() -> None:
    """Moderators' decisions (kind "decision") are examples: adding them refits the head."""
    rng = np.random.default_rng(2)
    stored = rows(True, 3, rng)
    before = label_set("ns", spec(), stored)
    # Decisions put label "a" somewhere new (axis 4): the refit follows them.
    decisions = [("decision", "a", axis(4, 0.05, rng)) for _ in range(6)]
    after = label_set("ns", spec(), stored + decisions)
    assert list(after.example_counts) == [9, 3, 3]
    assert before.head is not None and after.head is not None
    probe = axis(4)[None, :]
    assert classify.classify_batch(after, probe)[0].label == 0
    assert after.head.probabilities(probe)[0, 0] > before.head.probabilities(probe)[0, 0], (
        "the decisions moved label a towards them"
    )
    # Deterministic: the same rows give the same classifier, bit for bit.
    again = label_set("ns", spec(), stored + decisions)
    assert again.head is not None
    assert np.array_equal(again.head.weights, after.head.weights)
    assert again.head.temperature == after.head.temperature


def test_a_label_without_examples_lends_its_description() -> None:
    rng = np.random.default_rng(3)
    partial = [r for r in rows(True, 4, rng) if not (r[0] == "example" and r[1] == "c")]
    labels = label_set("ns", spec(), partial)
    assert labels.head is not None and list(labels.example_counts) == [4, 4, 0]
    assert classify.classify_batch(labels, axis(2)[None, :])[0].label == 2


def test_history_end_excludes_the_horizon_but_never_the_warm_up() -> None:
    spec = Anomaly(warm_up=10, horizon=5)
    assert [anomaly.history_end(p, spec) for p in (0, 3, 9)] == [0, 3, 9]
    assert [anomaly.history_end(p, spec) for p in (10, 14, 15, 40)] == [10, 10, 10, 35]


def score(vectors: np.ndarray, spec: Anomaly) -> list[anomaly.Scored]:
    """Score a whole stream as one batch (history comes from the batch itself)."""
    past = anomaly.Past([[] for _ in vectors], [], [])
    ids = [str(i) for i in range(len(vectors))]
    return anomaly.score_batch(spec, empty_state(), vectors, ids, past, Delta.empty("ns", 0, DIM))


def test_a_burst_keeps_alerting_within_the_horizon_and_routine_lines_do_not() -> None:
    rng = np.random.default_rng(1)
    routine = [axis(i % 3, 0.15, rng) for i in range(60)]
    burst = [axis(5, 0.01, rng) for _ in range(8)]
    stream = np.vstack([*routine, *burst, *[axis(i % 3, 0.15, rng) for i in range(20)]])
    spec = Anomaly(warm_up=30, horizon=20, neighbours=5, quantile=0.95)
    scored = score(stream, spec)
    assert not any(s.alert for s in scored[:30]), "no alert during the warm-up"
    assert all(s.threshold is None for s in scored[:30])
    assert all(s.alert for s in scored[60:63]), "the burst alerts"
    # Its repeats keep scoring above every routine line (the horizon): they rank as
    # anomalies, though once they fill the top of the histogram they stop crossing it.
    routine_scores = [s.score for s in scored[30:60] + scored[68:]]
    assert min(s.score for s in scored[60:68]) > max(routine_scores)
    assert sum(s.alert for s in scored[30:60]) + sum(s.alert for s in scored[68:]) <= 2


def test_focus_weighs_novelty_by_how_much_an_event_reads_like_an_alert() -> None:
    rng = np.random.default_rng(4)
    routine = [axis(i % 3, 0.1, rng) for i in range(60)]
    failure, chatter = unit(axis(5) + 0.2 * axis(0)), unit(axis(6) + 0.2 * axis(0))
    stream = np.vstack([*routine, failure, chatter])
    focus = np.vstack([axis(5), axis(6)])  # (alert, routine)
    spec = Anomaly(
        warm_up=30, horizon=0, neighbours=5, focus=Focus(alert="a", routine="r", temperature=0.1)
    )
    past = anomaly.Past([[] for _ in stream], [], [])
    ids = [str(i) for i in range(len(stream))]
    delta = Delta.empty("ns", 0, DIM)
    scored = anomaly.score_batch(spec, empty_state(), stream, ids, past, delta, focus)
    new_failure, new_chatter = scored[60], scored[61]
    assert new_failure.focus is not None and new_failure.focus > 0.99
    assert new_chatter.focus is not None and new_chatter.focus < 0.01
    assert abs(new_failure.novelty - new_chatter.novelty) < 0.05, "equally new"
    assert new_failure.score == pytest.approx(new_failure.novelty * new_failure.focus)
    assert new_failure.alert and not new_chatter.alert
    # Without a focus the score is the novelty and both alert.
    plain = score(stream, Anomaly(warm_up=30, horizon=0, neighbours=5))
    assert plain[60].focus is None and plain[60].score == plain[60].novelty
    assert plain[60].alert and plain[61].alert


def test_focus_descriptions_take_one_text_or_several() -> None:
    one = Focus.model_validate({"alert": "a failure", "routine": ["status", "progress"]})
    assert one.alert == ["a failure"] and one.routine == ["status", "progress"]
    with pytest.raises(ValueError, match="routine"):
        Focus.model_validate({"alert": "a failure"})
    with pytest.raises(ValueError, match="alert"):
        Focus.model_validate({"alert": [], "routine": "status"})


def test_without_a_horizon_repeats_vouch_for_themselves() -> None:
    rng = np.random.default_rng(1)
    routine = [axis(i % 3, 0.15, rng) for i in range(60)]
    burst = [axis(5, 0.01, rng) for _ in range(8)]
    stream = np.vstack([*routine, *burst])
    spec = Anomaly(warm_up=30, horizon=0, neighbours=1, centroid_weight=0.0)
    scored = score(stream, spec)
    assert scored[60].alert
    assert not any(s.alert for s in scored[62:68]), "the burst's second line on looks normal"


def test_batches_give_the_same_scores_as_one_stream() -> None:
    """Split anywhere, with the earlier part as stored history: identical scores."""
    rng = np.random.default_rng(2)
    stream = np.vstack([axis(int(rng.integers(0, 4)), 0.2, rng) for _ in range(80)])
    spec = Anomaly(warm_up=20, horizon=10, neighbours=4)
    whole = score(stream, spec)
    cut = 37
    first = score(stream[:cut], spec)
    state = NamespaceState(cut, stream[:cut].sum(axis=0), np.zeros(1000))
    delta = Delta.empty("ns", 0, DIM)
    for s in first[spec.warm_up :]:
        state.hist += np.histogram([s.score], bins=1000, range=(0, 2))[0]
    # the warm-up seeds were counted once, when position 20 was scored
    seeds = anomaly.warm_up_scores(stream[: spec.warm_up], spec)
    state.hist += np.histogram(seeds, bins=1000, range=(0, 2))[0]
    vectors = stream[cut:]
    nearest = []
    for i, x in enumerate(vectors):
        end = anomaly.history_end(cut + i, spec)
        sims = stream[:end] @ x if end else np.array([])
        order = np.argsort(-sims)[: spec.neighbours]
        nearest.append([(str(j), int(j), float(sims[j])) for j in order if j < cut])
    recent = [(p, stream[p]) for p in range(anomaly.history_end(cut, spec), cut)]
    past = anomaly.Past(nearest, recent, [])
    ids = [str(cut + i) for i in range(len(vectors))]
    second = anomaly.score_batch(spec, state, vectors, ids, past, delta)
    assert np.allclose([s.score for s in whole[cut:]], [s.score for s in second])
    assert [s.alert for s in whole[cut:]] == [s.alert for s in second]


def test_prototypes_need_every_label_described() -> None:
    rows = [("a", axis(0)), ("a", axis(1)), ("b", axis(2))]
    protos = prototypes(["a", "b"], rows)
    assert protos is not None
    assert np.allclose(protos[0], unit(axis(0) + axis(1)))
    assert prototypes(["a", "b", "c"], rows) is None


def test_analysis_file_examples_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "ex.jsonl").write_text('{"text": "hello", "label": "a"}\n\n')
    good = tmp_path / "good.toml"
    good.write_text(
        '[namespaces.x.classify]\nexamples_file = "ex.jsonl"\n'
        '[[namespaces.x.classify.labels]]\nname = "a"\n'
        '[[namespaces.x.classify.labels]]\nname = "b"\ndescription = "B"\n'
    )
    spec = load_analysis(good)
    classify_spec = spec.namespaces["x"].classify
    assert classify_spec is not None and classify_spec.labels[0].examples == ["hello"]
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('"ex.jsonl"', '"missing.jsonl"'))
    with pytest.raises(AnalysisFileError, match=r"missing\.jsonl"):
        load_analysis(bad)
    (tmp_path / "ex.jsonl").write_text('{"text": "hello", "label": "zzz"}\n')
    with pytest.raises(AnalysisFileError, match="'zzz' is not in namespace 'x'"):
        load_analysis(good)
    (tmp_path / "ex.jsonl").write_text("")
    with pytest.raises(AnalysisFileError, match="neither a description nor examples"):
        load_analysis(good)
    with pytest.raises(ValueError, match="history"):
        NamespaceAnalysis(anomaly=Anomaly(warm_up=100), history=50)


def test_unknown_is_reserved_for_the_policy_and_routes_out_of_scope_events() -> None:
    with pytest.raises(ValueError, match="'unknown' is reserved"):
        Classification(labels=[Label(name="unknown"), Label(name="b")])
    with pytest.raises(ValueError, match="'nope', which is neither a label"):
        Classification(
            labels=[Label(name="a"), Label(name="b")],
            policy=[Rule(label="nope", min_score=0.5, action=Action.REVIEW)],
        )
    labels = label_set("ns", spec(), rows(True, 0, np.random.default_rng(0)))
    labels.spec.policy = [
        Rule(label="unknown", min_score=0.5, action=Action.REVIEW),
        Rule(label="a", min_score=0.9, action=Action.BLOCK),
    ]

    def result(*probs: float) -> tuple[str, float, str | None]:
        got = classify.build(
            labels,
            "m",
            upsert(0, "x"),
            classify.Classified(np.array(probs), int(np.argmax(probs)), 1.0 - max(probs)),
        )
        return got.action.value, got.out_of_scope, got.rule

    assert result(0.4, 0.35, 0.25) == ("review", 0.6, "unknown>=0.5")
    assert result(0.7, 0.2, 0.1) == ("allow", 0.3, None)  # rounded to 6 places
    assert result(0.95, 0.03, 0.02) == ("block", 0.05, "a>=0.9")


def test_with_a_half_life_old_scores_fade_and_the_threshold_follows_the_stream() -> None:
    rng = np.random.default_rng(3)
    routine = [axis(i % 3, 0.15, rng) for i in range(60)]
    burst = [axis(3 + i % 4, 0.01, rng) for i in range(12)]
    later = [axis(i % 3, 0.15, rng) for i in range(200)]
    stream = np.vstack([*routine, *burst, *later])
    kept = Anomaly(warm_up=30, horizon=20, neighbours=5, quantile=0.9, half_life=0)
    faded = kept.model_copy(update={"half_life": 50})
    delta = Delta.empty("ns", 0, DIM)
    past = anomaly.Past([[] for _ in stream], [], [])
    ids = [str(i) for i in range(len(stream))]
    with_fade = anomaly.score_batch(faded, empty_state(), stream, ids, past, delta)
    without = score(stream, kept)
    end_kept, end_faded = without[-1].threshold, with_fade[-1].threshold
    assert end_kept is not None and end_faded is not None
    # Long after the burst its scores no longer hold the threshold up.
    assert end_faded < end_kept
    # What the transaction stores: every counted score with weight 1/2 per 50 after it.
    counted = len(stream) - faded.warm_up
    assert delta.decays == counted
    f = anomaly.forgetting(faded)
    expected = faded.warm_up * f**counted + sum(f**k for k in range(counted))
    assert delta.hist.sum() == pytest.approx(expected)
