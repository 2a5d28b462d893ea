"""Moderation decisions: ``{"id", "label", "namespace"?}`` records that add labeled examples.

``"label": null`` withdraws the id's decision (a moderator's mistake undone): its row is
marked withdrawn, not deleted, so that a replay of the withdrawn decision cannot restore it.

A decision names an event the worker stored; its text and vector come from that row (the
vector is reused when the row was embedded by the worker's model, else the text is embedded
again). It becomes a ``label_vectors`` row of kind ``decision``, keyed by the decided id, so a
later decision for the same id replaces it (``migrations/0004_decisions.sql``). The rows and
the decisions' offsets are written by one statement: a crash before it commits reads the
decisions again, one after it finds them applied.

What cannot become an example is dead-lettered with its reason, as a bad event is: this
module decides which (``parse`` and ``check`` are pure; ``build`` needs the stored rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pgvector import Vector
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.analysis.config import NamespaceAnalysis
from worker.envelope import dead_letter, read_or_letter
from worker.events import DeadLetter, Reason, TextType
from worker.jsonvalue import Rejected, describe, json_object
from worker.model import Record, content_hash, identity_problem
from worker.sinks.postgres import Conn


class Decision(BaseModel):
    """The wire format of one decision (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: str
    label: str | None  # required; null withdraws the id's decision
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class Decided:
    """A decision that names a configured label set and one of its labels, or (``label``
    None) withdraws the id's decision."""

    record: Record
    namespace: str
    id: str
    label: str | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.id)


@dataclass(frozen=True, slots=True)
class Stored:
    """What the decided event's row offers: its text, how it was embedded, by which model."""

    content: str | None
    text_type: TextType
    model: str
    vector: np.ndarray


@dataclass(slots=True)
class Example:
    """A decision ready to store: its label, text and vector (None until embedded again)."""

    decided: Decided
    content: str
    text_type: TextType
    vector: np.ndarray | None

    @property
    def text_hash(self) -> bytes:
        return content_hash(self.content, self.text_type)


def parse(
    record: Record,
    default_namespace: str,
    namespaces: Mapping[str, NamespaceAnalysis],
    budget: int,
) -> Decided | DeadLetter:
    """Never raises: a decision that names a label of a configured label set, or a letter."""
    return read_or_letter(
        record, "the decision", budget, lambda: _parse(record, default_namespace, namespaces)
    )


def _parse(
    record: Record, default_namespace: str, namespaces: Mapping[str, NamespaceAnalysis]
) -> Decided:
    if record.value is None:
        raise Rejected(Reason.SCHEMA_VIOLATION, "a decision needs a value (this one is null)")
    data = json_object(record.value, "a decision")
    try:
        decision = Decision.model_validate(data)
    except ValidationError as exc:
        raise Rejected(Reason.SCHEMA_VIOLATION, describe(exc)) from None
    namespace = default_namespace if decision.namespace is None else decision.namespace
    problem = identity_problem(namespace, decision.id)
    if problem is not None:
        raise Rejected(Reason.SCHEMA_VIOLATION, problem)
    decided = Decided(record, namespace, decision.id, decision.label)
    try:
        check(decided, namespaces)
    except Rejected as exc:
        exc.namespace, exc.id = namespace, decision.id
        raise
    return decided


def check(decided: Decided, namespaces: Mapping[str, NamespaceAnalysis]) -> None:
    """Raise ``Rejected`` unless the decision's namespace classifies and has its label."""
    ns = namespaces.get(decided.namespace)
    if ns is None or ns.classify is None:
        what = "is not in the analysis file" if ns is None else "has no `classify` label set"
        raise Rejected(
            Reason.UNKNOWN_NAMESPACE, f"namespace {decided.namespace!r} {what}: nothing to learn"
        )
    if decided.label is not None and decided.label not in ns.classify.names:
        raise Rejected(
            Reason.UNKNOWN_LABEL,
            f"label {decided.label!r} is not in namespace {decided.namespace!r}'s label set "
            f"({', '.join(ns.classify.names)})",
        )


def build(decided: Decided, stored: Stored | None, model: str, budget: int) -> Example | DeadLetter:
    """The example a decision adds, from its event's stored row, or why there is none."""
    if stored is None:
        return _letter(
            decided,
            Reason.UNKNOWN_ID,
            f"no stored event {decided.id!r} in namespace {decided.namespace!r} (not stored yet, "
            "or deleted); replay the decision once the event is stored",
            budget,
        )
    if stored.content is None:
        return _letter(
            decided,
            Reason.NO_CONTENT,
            f"the stored event {decided.id!r} has no content (its text was not kept), so it "
            "cannot become a labeled example",
            budget,
        )
    vector = stored.vector if stored.model == model else None
    return Example(decided, stored.content, stored.text_type, vector)


def _letter(decided: Decided, reason: Reason, message: str, budget: int) -> DeadLetter:
    return dead_letter(
        decided.record, reason, message, namespace=decided.namespace, id=decided.id, budget=budget
    )


Change = Example | Decided  # an example to store, or a withdrawal (a ``Decided`` without label)


def latest(changes: Sequence[Change]) -> list[Change]:
    """One change per decided id, the last one read (one statement may change a row once)."""
    out: dict[tuple[str, str], Change] = {}
    for change in changes:
        key = change.decided.key if isinstance(change, Example) else change.key
        out.pop(key, None)
        out[key] = change
    return list(out.values())


LOOKUP = """
SELECT namespace, id, content, text_type, model, embedding FROM embeddings
WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[]) AND chunk = 0
"""


async def lookup(conn: Conn, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
    """The stored rows of the decided events (pairs not asked for are dropped)."""
    if not keys:
        return {}
    rows = await conn.fetch(LOOKUP, sorted({k[0] for k in keys}), [k[1] for k in keys])
    wanted = set(keys)
    return {
        (r["namespace"], r["id"]): Stored(
            r["content"], TextType(r["text_type"]), r["model"], r["embedding"].to_numpy()
        )
        for r in rows
        if (r["namespace"], r["id"]) in wanted
    }


# The examples, the withdrawals, the namespaces' decision versions and the offsets, in one
# statement (so in one transaction). A decision or a withdrawal replaces the stored one for
# its id unless it is the same or an older one of the same partition (a replay); withdrawing
# what is not stored (or already withdrawn) changes nothing. Offsets never move back
# (GREATEST), as in worker.sinks.postgres.
APPLY = """
WITH s AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
        $7::vector[], $8::int[], $9::bigint[])
    AS s(namespace, decided_id, label, text_hash, content, embedding, decision_partition,
         decision_offset)
), changed AS (
    INSERT INTO label_vectors AS l (namespace, model, kind, label, text_hash, content,
        embedding, decided_id, decision_partition, decision_offset)
    SELECT s.namespace, $1, 'decision', s.label, s.text_hash, s.content, s.embedding,
        s.decided_id, s.decision_partition, s.decision_offset
    FROM s
    ON CONFLICT (namespace, model, decided_id) WHERE kind = 'decision' DO UPDATE SET
        label = EXCLUDED.label, text_hash = EXCLUDED.text_hash, content = EXCLUDED.content,
        embedding = EXCLUDED.embedding, decision_partition = EXCLUDED.decision_partition,
        decision_offset = EXCLUDED.decision_offset, withdrawn = false, updated_at = now()
    WHERE l.decision_partition <> EXCLUDED.decision_partition
       OR l.decision_offset < EXCLUDED.decision_offset
    RETURNING l.namespace
), withdrawn AS (
    UPDATE label_vectors AS l SET withdrawn = true, decision_partition = w.decision_partition,
        decision_offset = w.decision_offset, updated_at = now()
    FROM unnest($14::text[], $15::text[], $16::int[], $17::bigint[])
        AS w(namespace, decided_id, decision_partition, decision_offset)
    WHERE l.kind = 'decision' AND l.model = $1 AND l.namespace = w.namespace
      AND l.decided_id = w.decided_id AND NOT l.withdrawn
      AND (l.decision_partition <> w.decision_partition
           OR l.decision_offset < w.decision_offset)
    RETURNING l.namespace
), versions AS (
    INSERT INTO decision_state AS d (namespace, model, version)
    SELECT namespace, $1, 1 FROM (SELECT namespace FROM changed UNION ALL
        SELECT namespace FROM withdrawn) AS c GROUP BY namespace
    ON CONFLICT (namespace, model) DO UPDATE SET version = d.version + 1, updated_at = now()
), stored AS (
    INSERT INTO consumer_offsets AS o (group_id, topic, partition, next_offset)
    SELECT $10, * FROM unnest($11::text[], $12::int[], $13::bigint[])
    ON CONFLICT (group_id, topic, partition) DO UPDATE SET
        next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), updated_at = now()
)
SELECT (SELECT count(*) FROM changed) + (SELECT count(*) FROM withdrawn)
"""


async def apply(
    conn: Conn,
    changes: Sequence[Change],
    model: str,
    group_id: str,
    offsets: Mapping[tuple[str, int], int],
) -> int:
    """Store the examples and withdrawals (in the order read) and the offsets atomically;
    returns the decision rows changed."""
    kept = latest(changes)
    rows = [c for c in kept if isinstance(c, Example)]
    gone = [c for c in kept if not isinstance(c, Example)]
    if any(e.vector is None for e in rows):
        raise ValueError("every example needs its vector before it is stored")
    items = sorted(offsets.items())
    changed: int = await conn.fetchval(
        APPLY,
        model,
        [e.decided.namespace for e in rows],
        [e.decided.id for e in rows],
        [e.decided.label for e in rows],
        [e.text_hash for e in rows],
        [e.content for e in rows],
        [Vector(np.asarray(e.vector, dtype=np.float32)) for e in rows],
        [e.decided.record.partition for e in rows],
        [e.decided.record.offset for e in rows],
        group_id,
        [tp[0] for tp, _ in items],
        [tp[1] for tp, _ in items],
        [o for _, o in items],
        [d.namespace for d in gone],
        [d.id for d in gone],
        [d.record.partition for d in gone],
        [d.record.offset for d in gone],
    )
    return changed


VERSIONS = "SELECT namespace, version FROM decision_state WHERE model = $1"


async def versions(conn: Conn, model: str) -> dict[str, int]:
    """Each namespace's decision version: it changes with every committed change."""
    return {r["namespace"]: int(r["version"]) for r in await conn.fetch(VERSIONS, model)}


LABEL_ROWS = (
    "SELECT kind, label, embedding FROM label_vectors "
    "WHERE namespace = $1 AND model = $2 AND NOT withdrawn"
)


async def label_rows(conn: Conn, namespace: str, model: str) -> list[tuple[str, str, np.ndarray]]:
    """A namespace's stored label texts, decisions included, as ``labels.label_set`` takes."""
    rows = await conn.fetch(LABEL_ROWS, namespace, model)
    return [(r["kind"], r["label"], r["embedding"].to_numpy()) for r in rows]
