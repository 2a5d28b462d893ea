"""Moderation decisions as pure functions: parsing, checks, examples, the label set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from worker.analysis import decisions
from worker.analysis.config import Anomaly, Classification, Label, NamespaceAnalysis
from worker.analysis.decisions import Decided, Example, Stored
from worker.analysis.labels import label_set
from worker.config import ConfigError, load_settings
from worker.events import DeadLetter, Reason, TextType
from worker.model import Record, content_hash

SPEC = Classification(
    labels=[Label(name="ham", descriptions=["ordinary"]), Label(name="spam", examples=["buy"])]
)
NAMESPACES = {
    "sms": NamespaceAnalysis(classify=SPEC),
    "logs": NamespaceAnalysis(anomaly=Anomaly()),
}
BUDGET = 100_000


def record(value: bytes | None, offset: int = 0) -> Record:
    return Record("decisions", 0, offset, b"k", value, timestamp_ms=0)


def parse(value: bytes | None) -> Decided | DeadLetter:
    return decisions.parse(record(value), "sms", NAMESPACES, BUDGET)


def reason(value: bytes | None) -> str:
    out = parse(value)
    assert isinstance(out, DeadLetter), out
    return out.reason.value


def test_a_decision_names_an_id_and_a_label_of_a_configured_label_set() -> None:
    out = parse(json.dumps({"id": "m-1", "label": "spam", "extra": 1}).encode())
    assert isinstance(out, Decided)
    assert (out.namespace, out.id, out.label) == ("sms", "m-1", "spam")
    explicit = parse(json.dumps({"id": "m-1", "label": "ham", "namespace": "sms"}).encode())
    assert isinstance(explicit, Decided) and explicit.label == "ham"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_utf8"),
        (None, "schema_violation"),
        (b"[1, 2]", "schema_violation"),
        (b'{"id": "m-1"}', "schema_violation"),
        (b'{"label": "spam"}', "schema_violation"),
        (b'{"id": 7, "label": "spam"}', "schema_violation"),
        (b'{"id": "", "label": "spam"}', "schema_violation"),
        (b'{"id": "a\\u0000b", "label": "spam"}', "nul_byte"),
        (b'{"id": "a\\ud800", "label": "spam"}', "invalid_utf8"),
        (b'{"id": "m-1", "label": "spam", "namespace": "nope"}', "unknown_namespace"),
        (b'{"id": "m-1", "label": "spam", "namespace": "logs"}', "unknown_namespace"),
        (b'{"id": "m-1", "label": "eggs"}', "unknown_label"),
    ],
)
def test_a_bad_decision_gets_a_machine_readable_reason(value: bytes | None, expected: str) -> None:
    assert reason(value) == expected


def test_a_letter_names_the_decision_and_keeps_the_original() -> None:
    value = b'{"id": "m-1", "label": "eggs"}'
    letter = parse(value)
    assert isinstance(letter, DeadLetter)
    assert (letter.namespace, letter.id) == ("sms", "m-1")
    assert "ham, spam" in letter.message
    assert letter.source.topic == "decisions"
    assert letter.value_sha256 is not None and letter.value_size == len(value)


def decided(id: str = "m-1", label: str | None = "spam", offset: int = 0) -> Decided:
    return Decided(record(b"{}", offset), "sms", id, label)


def test_an_example_reuses_the_stored_vector_of_the_same_model_only() -> None:
    vector = np.ones(4, dtype=np.float32)
    same = decisions.build(decided(), Stored("buy now", TextType.DOCUMENT, "m", vector), "m", 1)
    assert isinstance(same, Example) and same.vector is vector
    assert same.text_hash == content_hash("buy now", TextType.DOCUMENT)
    other = decisions.build(decided(), Stored("buy now", TextType.QUERY, "old", vector), "m", 1)
    assert isinstance(other, Example) and other.vector is None
    assert other.text_type is TextType.QUERY


def test_an_unknown_id_or_a_row_without_content_is_dead_lettered() -> None:
    missing = decisions.build(decided(), None, "m", BUDGET)
    assert isinstance(missing, DeadLetter) and missing.reason is Reason.UNKNOWN_ID
    empty = decisions.build(decided(), Stored(None, TextType.DOCUMENT, "m", np.ones(4)), "m", 1)
    assert isinstance(empty, DeadLetter) and empty.reason is Reason.NO_CONTENT


def test_a_null_label_withdraws_and_needs_only_a_namespace_that_classifies() -> None:
    out = parse(b'{"id": "m-1", "label": null}')
    assert isinstance(out, Decided)
    assert (out.namespace, out.id, out.label) == ("sms", "m-1", None)
    assert reason(b'{"id": "m-1", "label": null, "namespace": "logs"}') == "unknown_namespace"


def test_an_ids_last_change_wins_whether_a_decision_or_a_withdrawal() -> None:
    decision = Example(decided("a", "spam", 0), "x", TextType.DOCUMENT, None)
    withdrawal = decided("a", None, 1)
    again = Example(decided("a", "ham", 2), "x", TextType.DOCUMENT, None)
    assert decisions.latest([decision, withdrawal]) == [withdrawal]
    assert decisions.latest([decision, withdrawal, again]) == [again]


def test_the_last_decision_for_an_id_wins_within_a_batch() -> None:
    first = Example(decided("a", "spam", 0), "x", TextType.DOCUMENT, None)
    other = Example(decided("b", "ham", 1), "y", TextType.DOCUMENT, None)
    last = Example(decided("a", "ham", 2), "x", TextType.DOCUMENT, None)
    assert decisions.latest([first, other, last]) == [other, last]


def test_decision_rows_count_as_examples_of_their_label() -> None:
    v = np.array([1.0, 0.0, 0.0])
    rows = [
        ("description", "ham", np.array([0.0, 1.0, 0.0])),
        ("example", "spam", v),
        ("decision", "spam", 2 * v),
        ("decision", "ham", np.array([0.0, 0.0, 3.0])),
        ("decision", "removed-label", v),
    ]
    labels = label_set("sms", SPEC, rows)
    assert labels.example_counts.tolist() == [1, 2]
    assert labels.head is not None, "fitted on the examples and decisions"


def test_the_decisions_topic_must_be_apart_and_need_a_label_set() -> None:
    inline = {"namespaces": {"sms": {"classify": SPEC.model_dump(mode="json")}}}
    ok = load_settings(analysis={**inline, "decisions_topic": "d"})
    assert ok.analysis.decisions_topic == "d"
    assert ok.analysis.decisions_dlq_topic == "content.decisions.dlq"
    with pytest.raises(ConfigError, match=r"decisions_topic must differ from kafka\.input_topic"):
        load_settings(analysis={**inline, "decisions_topic": "content.events"})
    with pytest.raises(ConfigError, match=r"decisions_topic must differ from kafka\.dlq_topic"):
        load_settings(analysis={**inline, "decisions_topic": "content.events.dlq"})
    with pytest.raises(ConfigError, match="needs a namespace with a `classify` label set"):
        load_settings(analysis={"decisions_topic": "d"})
