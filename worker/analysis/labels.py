"""Label texts in pgvector: descriptions and examples embedded once, shared by every replica.

A namespace's label texts are its label set's descriptions and examples, and its anomaly
focus descriptions (kind ``focus``); one sync stores them all.

Rows are content-addressed (namespace, model, kind, label, text hash), so a restart or a
second replica embeds nothing already stored, and an edited file re-embeds only what changed.
Rows no longer in the file are removed, under an advisory lock so two replicas that start
together do not interleave their syncs. Rows of kind ``decision`` (moderation decisions,
``worker.analysis.decisions``) are not the file's: sync leaves them, and they count as
examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from worker.analysis import head
from worker.analysis.config import Classification, Focus, NamespaceAnalysis
from worker.analysis.head import Head
from worker.config import ConfigError
from worker.events import TextType
from worker.sinks.postgres import Conn

log = structlog.get_logger(__name__)

SYNC_LOCK = 0x6C61626C  # "labl"
# Labeled texts: the file's examples and the moderation decisions.
EXAMPLE_KINDS = ("example", "decision")

# Texts -> vectors, injected: the worker passes its embed stage's (its limits and retries).
Embed = Callable[[list[str], TextType], Awaitable[np.ndarray]]


class LabelError(ConfigError):
    """A label text the provider refuses: the analysis file must change, not the data."""


@dataclass(frozen=True, slots=True)
class LabelText:
    label: str
    kind: str  # "description" or "example" (a label set), "focus" (anomaly focus)
    text: str
    text_type: TextType

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(f"{self.text_type.value}\x1f{self.text}".encode()).digest()


@dataclass
class LabelSet:
    """What classification needs in memory: the description prototypes and the fitted head."""

    namespace: str
    spec: Classification
    # (labels, dimension) unit vectors: mean of each label's descriptions. None when some
    # label has no description (zero-shot then cannot rank every label).
    prototypes: np.ndarray | None
    # The supervised head on the labeled examples (kinds "example" and "decision"); None
    # without examples (zero-shot).
    head: Head | None
    # Labeled examples per label, in ``names`` order.
    example_counts: np.ndarray

    @property
    def names(self) -> list[str]:
        return self.spec.names

    @property
    def examples(self) -> int:
        return int(self.example_counts.sum())


def label_texts(spec: Classification) -> list[LabelText]:
    out: list[LabelText] = []
    for label in spec.labels:
        out += [
            LabelText(label.name, "description", t, spec.description_type)
            for t in label.descriptions
        ]
        out += [LabelText(label.name, "example", t, TextType.DOCUMENT) for t in label.examples]
    return out


FOCUS_SIDES = ("alert", "routine")


def focus_texts(focus: Focus) -> list[LabelText]:
    return [
        LabelText(side, "focus", t, focus.description_type)
        for side, texts in zip(FOCUS_SIDES, (focus.alert, focus.routine), strict=True)
        for t in texts
    ]


def namespace_texts(spec: NamespaceAnalysis) -> list[LabelText]:
    """Everything of a namespace's analysis that is embedded once, at start."""
    out = label_texts(spec.classify) if spec.classify is not None else []
    if spec.anomaly is not None and spec.anomaly.focus is not None:
        out += focus_texts(spec.anomaly.focus)
    return out


@dataclass
class Synced:
    """A namespace's stored label texts, ready for scoring."""

    labels: LabelSet | None
    # (2, dimension): the alert and routine vectors of the anomaly focus, if any.
    focus: np.ndarray | None


async def sync(
    conn: Conn, embed: Embed, model: str, namespace: str, spec: NamespaceAnalysis
) -> Synced:
    """Store the namespace's label texts (embedding only new ones) and load the prototypes."""
    wanted = namespace_texts(spec)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SYNC_LOCK)
        stored = {
            (r["kind"], r["label"], bytes(r["text_hash"]))
            for r in await conn.fetch(
                "SELECT kind, label, text_hash FROM label_vectors "
                "WHERE namespace = $1 AND model = $2 AND kind <> 'decision'",
                namespace,
                model,
            )
        }
        missing = [t for t in wanted if (t.kind, t.label, t.digest) not in stored]
        for text_type in TextType:
            batch = [t for t in missing if t.text_type is text_type]
            if batch:
                vectors = await embed([t.text for t in batch], text_type)
                await conn.executemany(
                    "INSERT INTO label_vectors (namespace, model, kind, label, text_hash, "
                    "content, embedding) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT DO NOTHING",
                    [
                        (namespace, model, t.kind, t.label, t.digest, t.text, v)
                        for t, v in zip(batch, vectors, strict=True)
                    ],
                )
        keep = {(t.kind, t.label, t.digest) for t in wanted}
        stale = [key for key in stored if key not in keep]
        if stale:
            await conn.execute(
                "DELETE FROM label_vectors l USING unnest($3::text[], $4::text[], $5::bytea[]) "
                "AS s(kind, label, text_hash) WHERE l.namespace = $1 AND l.model = $2 "
                "AND l.kind = s.kind AND l.label = s.label AND l.text_hash = s.text_hash",
                namespace,
                model,
                [k for k, _, _ in stale],
                [label for _, label, _ in stale],
                [h for _, _, h in stale],
            )
        rows = await conn.fetch(
            "SELECT kind, label, embedding FROM label_vectors "
            "WHERE namespace = $1 AND model = $2 AND NOT withdrawn",
            namespace,
            model,
        )
    log.info("label texts ready", namespace=namespace, embedded=len(missing), removed=len(stale))
    texts = [(r["kind"], r["label"], r["embedding"].to_numpy()) for r in rows]
    focus = None
    if spec.anomaly is not None and spec.anomaly.focus is not None:
        focus = prototypes(FOCUS_SIDES, [(label, v) for kind, label, v in texts if kind == "focus"])
    labels = label_set(namespace, spec.classify, texts) if spec.classify is not None else None
    return Synced(labels, focus)


def label_set(
    namespace: str, spec: Classification, rows: Sequence[tuple[str, str, np.ndarray]]
) -> LabelSet:
    """THE way stored ``label_vectors`` rows become the in-memory classifier.

    Rows of kind ``example`` (from the analysis file) and ``decision`` (from moderators)
    are the labeled examples the head is fitted on; ``description`` rows are the prototypes
    and the head's prior. Call it again to refit when rows are added: it is deterministic.
    A label without examples lends its description as its one example, so a partly
    labeled set still classifies over every label.
    """
    names = spec.names
    index = {name: i for i, name in enumerate(names)}
    means = description_means([(label, v) for kind, label, v in rows if kind == "description"])
    protos = np.vstack([means[n] for n in names]) if all(n in means for n in names) else None
    vectors: list[np.ndarray] = []
    targets: list[int] = []
    for kind, label, v in rows:
        if kind in EXAMPLE_KINDS and label in index:
            vectors.append(unit(np.asarray(v, dtype=np.float64)))
            targets.append(index[label])
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(names))
    fitted = None
    if vectors:
        for i, name in enumerate(names):
            if counts[i] == 0 and name in means:
                vectors.append(means[name].astype(np.float64))
                targets.append(i)
        got = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(names))
        if got.min() > 0:  # else some label has neither: classification stays zero-shot
            fitted = head.fit(np.vstack(vectors), np.asarray(targets), len(names), protos)
    return LabelSet(
        namespace=namespace, spec=spec, prototypes=protos, head=fitted, example_counts=counts
    )


def prototypes(names: Sequence[str], rows: Sequence[tuple[str, np.ndarray]]) -> np.ndarray | None:
    """One unit vector per label (the normalised mean of its descriptions); None if one lacks."""
    means = description_means(rows)
    if any(name not in means for name in names):
        return None
    return np.vstack([means[n] for n in names])


def description_means(rows: Sequence[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per label, the normalised mean of its description vectors (float32)."""
    by_label: dict[str, list[np.ndarray]] = {}
    for label, vector in rows:
        by_label.setdefault(label, []).append(np.asarray(vector, dtype=np.float32))
    return {
        label: unit(np.mean([unit(v) for v in vs], axis=0)).astype(np.float32)
        for label, vs in by_label.items()
    }


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
