"""Label sets in pgvector: descriptions and examples embedded once, shared by every replica.

Rows are content-addressed (namespace, model, kind, label, text hash), so a restart or a
second replica embeds nothing already stored, and an edited file re-embeds only what changed.
Rows no longer in the file are removed, under an advisory lock so two replicas that start
together do not interleave their syncs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from worker.analysis.config import Classification
from worker.config import ConfigError
from worker.decode import NO_TIME, Change
from worker.embed import EmbedStage
from worker.events import TextType
from worker.store import Conn
from worker.tokens import estimate_tokens, truncate_to_tokens

log = structlog.get_logger(__name__)

SYNC_LOCK = 0x6C61626C  # "labl"

Embed = Callable[[list[str], TextType], Awaitable[np.ndarray]]


class LabelError(ConfigError):
    """A label text the provider refuses: the analysis file must change, not the data."""


@dataclass(frozen=True, slots=True)
class LabelText:
    label: str
    kind: str  # "description" or "example"
    text: str
    text_type: TextType

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(f"{self.text_type.value}\x1f{self.text}".encode()).digest()


@dataclass
class LabelSet:
    """What classification needs in memory: label vectors and the examples' sums."""

    namespace: str
    spec: Classification
    # (labels, dimension) unit vectors: mean of each label's descriptions. None when some
    # label has no description (zero-shot then cannot rank every label).
    prototypes: np.ndarray | None
    # Per label, the sum and count of its examples' unit vectors (the few-shot prototype).
    example_sums: np.ndarray
    example_counts: np.ndarray

    @property
    def names(self) -> list[str]:
        return self.spec.names

    @property
    def examples(self) -> int:
        return int(self.example_counts.sum())

    @property
    def example_mean(self) -> np.ndarray | None:
        """The centre the few-shot prototypes are compared around (None without examples)."""
        if not self.examples:
            return None
        mean: np.ndarray = self.example_sums.sum(axis=0) / self.examples
        return mean


def label_texts(spec: Classification) -> list[LabelText]:
    out: list[LabelText] = []
    for label in spec.labels:
        out += [
            LabelText(label.name, "description", t, spec.description_type)
            for t in label.descriptions
        ]
        out += [LabelText(label.name, "example", t, TextType.DOCUMENT) for t in label.examples]
    return out


def stage_embedder(stage: EmbedStage, max_texts: int, max_tokens: int) -> Embed:
    """Embed label texts through the pipeline's stage (same limits, retries and quotas)."""

    async def embed(texts: list[str], text_type: TextType) -> np.ndarray:
        changes = []
        for i, text in enumerate(texts):
            text = truncate_to_tokens(text, max_tokens)
            changes.append(
                Change(
                    topic="labels",
                    partition=0,
                    offset=i,
                    namespace="labels",
                    id=str(i),
                    op="upsert",
                    event_time=NO_TIME,
                    text=text,
                    text_type=text_type,
                    tokens=estimate_tokens(text),
                )
            )
        vectors: list[np.ndarray] = []
        for start in range(0, len(changes), max_texts):
            outcome = await stage.run(changes[start : start + max_texts])
            if outcome.refused:
                change, error = outcome.refused[0]
                raise LabelError(f"the provider refuses label text {change.text[:80]!r}: {error}")
            vectors += [
                c.vector for c in changes[start : start + max_texts] if c.vector is not None
            ]
        return np.vstack(vectors).astype(np.float32)

    return embed


async def sync(
    conn: Conn, embed: Embed, model: str, namespace: str, spec: Classification
) -> LabelSet:
    """Store the label set's vectors (embedding only new texts) and load the prototypes."""
    wanted = label_texts(spec)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SYNC_LOCK)
        stored = {
            (r["kind"], r["label"], bytes(r["text_hash"]))
            for r in await conn.fetch(
                "SELECT kind, label, text_hash FROM label_vectors "
                "WHERE namespace = $1 AND model = $2",
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
            "SELECT kind, label, embedding FROM label_vectors WHERE namespace = $1 AND model = $2",
            namespace,
            model,
        )
    log.info(
        "label set ready",
        namespace=namespace,
        labels=len(spec.labels),
        embedded=len(missing),
        removed=len(stale),
    )
    names = spec.names
    index = {name: i for i, name in enumerate(names)}
    descriptions = [
        (r["label"], r["embedding"].to_numpy()) for r in rows if r["kind"] == "description"
    ]
    dimension = len(rows[0]["embedding"].to_numpy()) if rows else 0
    sums = np.zeros((len(names), dimension))
    counts = np.zeros(len(names), dtype=np.int64)
    for r in rows:
        if r["kind"] == "example" and r["label"] in index:
            sums[index[r["label"]]] += unit(r["embedding"].to_numpy().astype(np.float64))
            counts[index[r["label"]]] += 1
    return LabelSet(
        namespace=namespace,
        spec=spec,
        prototypes=prototypes(names, descriptions),
        example_sums=sums,
        example_counts=counts,
    )


def prototypes(names: Sequence[str], rows: Sequence[tuple[str, np.ndarray]]) -> np.ndarray | None:
    """One unit vector per label: the normalised mean of its description vectors."""
    by_label: dict[str, list[np.ndarray]] = {}
    for label, vector in rows:
        by_label.setdefault(label, []).append(np.asarray(vector, dtype=np.float32))
    if any(name not in by_label for name in names):
        return None
    means = np.vstack([np.mean([unit(v) for v in by_label[n]], axis=0) for n in names])
    return np.vstack([unit(m) for m in means]).astype(np.float32)


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
