"""User profiles from interactions: ``{"user", "item", "weight"?, "time"?, "namespace"?}``.

A profile is the time-decayed weighted mean of the unit vectors of the items a user
interacted with (docs/recommend.md has the math and the SQL). ``parse`` and ``add`` are
pure; ``lookup`` reads the items' stored vectors; ``apply`` updates the profiles and stores
the offsets in one transaction, after locking those offsets and dropping what they say was
applied already, so an interaction read twice (a restart, a replica that lost its
partitions) is applied once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pgvector import Vector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.envelope import read_or_letter
from worker.events import DeadLetter, EventTime, Reason
from worker.jsonvalue import Rejected, describe, json_object
from worker.model import Record, identity_problem
from worker.sinks.postgres import Conn


class InteractionEvent(BaseModel):
    """The wire format of one interaction (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user: str = Field(strict=True)
    item: str = Field(strict=True)
    weight: float = Field(default=1.0, strict=True)
    time: EventTime | None = None
    namespace: str | None = Field(default=None, strict=True)


@dataclass(frozen=True, slots=True)
class Interaction:
    record: Record
    namespace: str
    user: str
    item: str
    weight: float
    time: datetime

    @property
    def item_key(self) -> tuple[str, str]:
        return (self.namespace, self.item)

    @property
    def user_key(self) -> tuple[str, str]:
        return (self.namespace, self.user)


def parse(
    record: Record, default_namespace: str, max_clock_skew_s: float, budget: int
) -> Interaction | DeadLetter:
    """Never raises: an interaction with a positive finite weight and a time, or a letter."""
    return read_or_letter(
        record,
        "the interaction",
        budget,
        lambda: _parse(record, default_namespace, max_clock_skew_s),
    )


def _parse(record: Record, default_namespace: str, max_clock_skew_s: float) -> Interaction:
    if record.value is None:
        raise Rejected(Reason.SCHEMA_VIOLATION, "an interaction needs a value (this one is null)")
    data = json_object(record.value, "an interaction")
    try:
        event = InteractionEvent.model_validate(data)
    except ValidationError as exc:
        raise Rejected(Reason.SCHEMA_VIOLATION, describe(exc)) from None
    namespace = default_namespace if event.namespace is None else event.namespace
    for what, value in (("item", event.item), ("user", event.user)):
        problem = identity_problem(namespace, value)
        if problem is not None:
            raise Rejected(Reason.SCHEMA_VIOLATION, f"{what}: {problem}")
    if not (math.isfinite(event.weight) and event.weight > 0):
        raise _about(
            Reason.SCHEMA_VIOLATION,
            f"weight must be a positive finite number, not {event.weight!r} (a mean of "
            "negative or zero weights has no direction)",
            namespace,
            event.item,
        )
    now = datetime.now(UTC)
    own = _record_time(record)
    reference = now if own is None else min(own, now)
    time = event.time or own or now
    ahead = (time - reference).total_seconds()
    if ahead > max_clock_skew_s:
        raise _about(
            Reason.TIMESTAMP_OUT_OF_RANGE,
            f"the interaction time {time.isoformat()} is {ahead:.0f} s ahead of "
            f"{reference.isoformat()}; at most {max_clock_skew_s:g} s (max_clock_skew_s), or "
            "it would decay every later interaction of this user",
            namespace,
            event.item,
        )
    return Interaction(record, namespace, event.user, event.item, event.weight, time)


def _about(reason: Reason, message: str, namespace: str, item: str) -> Rejected:
    """A rejection whose letter names the interaction's namespace and item."""
    exc = Rejected(reason, message)
    exc.namespace, exc.id = namespace, item
    return exc


def _record_time(record: Record) -> datetime | None:
    if record.timestamp_ms is None or record.timestamp_ms < 0:
        return None
    try:
        return datetime.fromtimestamp(record.timestamp_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


# ---- the math -------------------------------------------------------------------------


def decay(seconds: float, half_life_s: float) -> float:
    """What a weight is worth ``seconds`` later: 0.5 ** (seconds / half_life)."""
    return float(0.5 ** (seconds / half_life_s))


@dataclass(frozen=True, slots=True)
class Profile:
    """As of ``time``: ``weight`` = Σ wᵢ·0.5^((time−tᵢ)/h), ``mean`` = Σ wᵢ·0.5^(…)·vᵢ / weight."""

    mean: np.ndarray
    weight: float
    time: datetime
    interactions: int


def unit(vector: np.ndarray) -> np.ndarray | None:
    """The vector scaled to length 1 (float64), or None for a zero vector."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 and math.isfinite(norm) else None


def add(
    profile: Profile | None, vector: np.ndarray, weight: float, time: datetime, half_life_s: float
) -> Profile:
    """The profile after one interaction with an item of unit vector ``vector``.

    Whichever of the profile and the interaction is older is decayed to the other's time,
    so the result does not depend on the order interactions arrive in (up to rounding).
    """
    if profile is None:
        return Profile(np.asarray(vector, dtype=np.float64), weight, time, 1)
    dt = (time - profile.time).total_seconds()
    if dt >= 0:
        kept, added, now = profile.weight * decay(dt, half_life_s), weight, time
    else:  # an interaction older than the profile: it is decayed, the state is not
        kept, added, now = profile.weight, weight * decay(-dt, half_life_s), profile.time
    total = kept + added
    if total <= 0:  # both underflowed: nothing to weigh, keep the direction
        return Profile(profile.mean, 0.0, now, profile.interactions + 1)
    mean = (profile.mean * kept + np.asarray(vector, dtype=np.float64) * added) / total
    return Profile(mean, total, now, profile.interactions + 1)


# ---- Postgres -------------------------------------------------------------------------

ITEMS = """
SELECT namespace, id, embedding FROM embeddings
WHERE model = $1 AND namespace = ANY($2::text[]) AND id = ANY($3::text[]) AND chunk = 0
"""


async def lookup(
    conn: Conn, model: str, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """The unit vectors of the stored items of ``model`` (zero vectors are left out)."""
    if not keys:
        return {}
    rows = await conn.fetch(ITEMS, model, sorted({k[0] for k in keys}), [k[1] for k in keys])
    wanted = set(keys)
    out: dict[tuple[str, str], np.ndarray] = {}
    for r in rows:
        key = (r["namespace"], r["id"])
        vector = unit(r["embedding"].to_numpy())
        if key in wanted and vector is not None:
            out[key] = vector
    return out


@dataclass(frozen=True, slots=True)
class Resolved:
    """An interaction with its item's unit vector."""

    interaction: Interaction
    vector: np.ndarray


FENCE = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
SELECT $1, $2, p, 0 FROM unnest($3::int[]) AS p
ON CONFLICT (group_id, topic, partition) DO NOTHING
"""
APPLIED = """
SELECT partition, next_offset FROM consumer_offsets
WHERE group_id = $1 AND topic = $2 AND partition = ANY($3::int[])
ORDER BY partition FOR UPDATE
"""
PROFILES = """
SELECT p.namespace, p.user_id, p.mean, p.weight, p.profile_time, p.interactions
FROM profiles p JOIN unnest($2::text[], $3::text[]) AS u(namespace, user_id)
  ON p.namespace = u.namespace AND p.user_id = u.user_id
WHERE p.model = $1
ORDER BY p.namespace, p.user_id FOR UPDATE OF p
"""
STORE_PROFILES = """
INSERT INTO profiles AS p (namespace, model, user_id, mean, weight, profile_time, interactions)
SELECT namespace, $1, user_id, mean, weight, profile_time, interactions
FROM unnest($2::text[], $3::text[], $4::vector[], $5::float8[], $6::timestamptz[], $7::bigint[])
  AS s(namespace, user_id, mean, weight, profile_time, interactions)
ON CONFLICT (namespace, model, user_id) DO UPDATE SET
    mean = EXCLUDED.mean, weight = EXCLUDED.weight, profile_time = EXCLUDED.profile_time,
    interactions = EXCLUDED.interactions, updated_at = now()
"""
STORE_ITEMS = """
INSERT INTO profile_items AS i (namespace, model, user_id, item_id, last_time)
SELECT namespace, $1, user_id, item_id, last_time
FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[])
  AS s(namespace, user_id, item_id, last_time)
ON CONFLICT (namespace, model, user_id, item_id) DO UPDATE SET
    last_time = GREATEST(i.last_time, EXCLUDED.last_time)
"""
# Each touched user keeps its latest `seen_max` items.
TRIM_ITEMS = """
DELETE FROM profile_items i USING (
    SELECT namespace, user_id, item_id, row_number() OVER (
        PARTITION BY namespace, user_id ORDER BY last_time DESC, item_id) AS n
    FROM profile_items
    WHERE model = $1 AND (namespace, user_id) IN (SELECT * FROM unnest($2::text[], $3::text[]))
) r
WHERE r.n > $4 AND i.model = $1 AND i.namespace = r.namespace AND i.user_id = r.user_id
  AND i.item_id = r.item_id
"""
STORE_OFFSETS = """
INSERT INTO consumer_offsets AS o (group_id, topic, partition, next_offset)
SELECT $1, $2, * FROM unnest($3::int[], $4::bigint[])
ON CONFLICT (group_id, topic, partition) DO UPDATE SET
    next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), updated_at = now()
"""


async def apply(
    conn: Conn,
    resolved: Sequence[Resolved],
    model: str,
    half_life_s: float,
    seen_max: int,
    group_id: str,
    topic: str,
    offsets: Mapping[int, int],
) -> int:
    """Apply the interactions the stored offsets do not cover yet and store the offsets, in
    one transaction; returns the interactions applied."""
    partitions = sorted(offsets)
    async with conn.transaction():
        await conn.execute(FENCE, group_id, topic, partitions)
        done = {
            r["partition"]: r["next_offset"]
            for r in await conn.fetch(APPLIED, group_id, topic, partitions)
        }
        fresh = [
            r
            for r in resolved
            if r.interaction.record.offset >= done.get(r.interaction.record.partition, 0)
        ]
        users = sorted({r.interaction.user_key for r in fresh})
        profiles: dict[tuple[str, str], Profile | None] = dict.fromkeys(users)
        for row in await conn.fetch(PROFILES, model, [u[0] for u in users], [u[1] for u in users]):
            profiles[(row["namespace"], row["user_id"])] = Profile(
                row["mean"].to_numpy().astype(np.float64),
                float(row["weight"]),
                row["profile_time"],
                int(row["interactions"]),
            )
        seen: dict[tuple[str, str, str], datetime] = {}
        for r in fresh:
            i = r.interaction
            profiles[i.user_key] = add(
                profiles[i.user_key], r.vector, i.weight, i.time, half_life_s
            )
            key = (i.namespace, i.user, i.item)
            seen[key] = max(seen.get(key, i.time), i.time)
        changed = [(u, p) for u, p in profiles.items() if p is not None]
        if changed:
            await conn.execute(
                STORE_PROFILES,
                model,
                [u[0] for u, _ in changed],
                [u[1] for u, _ in changed],
                [Vector(p.mean.astype(np.float32)) for _, p in changed],
                [p.weight for _, p in changed],
                [p.time for _, p in changed],
                [p.interactions for _, p in changed],
            )
            items = sorted(seen.items())
            await conn.execute(
                STORE_ITEMS,
                model,
                [k[0] for k, _ in items],
                [k[1] for k, _ in items],
                [k[2] for k, _ in items],
                [t for _, t in items],
            )
            await conn.execute(
                TRIM_ITEMS, model, [u[0] for u in users], [u[1] for u in users], seen_max
            )
        await conn.execute(
            STORE_OFFSETS, group_id, topic, partitions, [offsets[p] for p in partitions]
        )
    return len(fresh)
