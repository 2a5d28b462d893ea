"""The read side: k-means math, then `similar` and `cluster` as a user runs them (subprocesses)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import Env, migrate_db, running
from tests.integration.test_cli import _env
from tests.processes import cli
from worker.read.kmeans import Reservoir, Summarizer, spherical_kmeans, unit_rows

# --- k-means math --------------------------------------------------------------------------


def _planted(
    groups: int, per_group: int, dimension: int = 32, noise: float = 0.15, seed: int = 7
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """Rows scattered around `groups` random directions (nearly orthogonal in high dimension)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dimension))
    x = np.concatenate(
        [
            c
            + noise
            * np.linalg.norm(c)
            * rng.normal(size=(per_group, dimension))
            / np.sqrt(dimension)
            for c in centres
        ]
    )
    truth = np.repeat(np.arange(groups), per_group)
    order = rng.permutation(len(x))  # interleaved, so a row's position says nothing
    return x[order].astype(np.float32), truth[order]


def _same_partition(labels: npt.NDArray[np.intp], truth: npt.NDArray[np.intp]) -> bool:
    """Each true group is exactly one cluster and each cluster exactly one group."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


def test_recovers_well_separated_planted_clusters() -> None:
    x, truth = _planted(groups=5, per_group=40)
    result = spherical_kmeans(x, 5, seed=0)
    assert len(result.centroids) == 5
    assert _same_partition(result.labels, truth)
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    assert result.similarities.min() > 0.9  # every row close to its own centroid


def test_same_seed_same_result_and_seeds_matter_only_through_the_start() -> None:
    x, _ = _planted(groups=6, per_group=30, noise=0.8)  # overlapping: starts can disagree
    a, b = spherical_kmeans(x, 6, seed=3), spherical_kmeans(x, 6, seed=3)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.centroids, b.centroids)
    assert a.iterations == b.iterations


def test_more_clusters_than_rows_gives_one_cluster_per_distinct_row() -> None:
    x = np.eye(3, 8, dtype=np.float32)
    result = spherical_kmeans(x, 8, seed=0)
    assert len(result.centroids) == 3
    assert sorted(result.labels.tolist()) == [0, 1, 2]
    assert np.allclose(result.similarities, 1.0)

    # Fewer distinct rows than k: empty clusters are dropped, not reported as size 0.
    dup = np.repeat(np.eye(2, 8, dtype=np.float32), 5, axis=0)
    result = spherical_kmeans(dup, 4, seed=0)
    assert len(result.centroids) == 2
    assert _same_partition(result.labels, np.repeat([0, 1], 5))


def test_no_rows_no_clusters() -> None:
    result = spherical_kmeans(np.zeros((0, 8), dtype=np.float32), 4, seed=0)
    assert result.centroids.shape == (0, 8)
    assert len(result.labels) == 0
    summary = Summarizer(result.centroids, top=3)
    summary.add([], [], np.zeros((0, 8), dtype=np.float32))
    assert summary.summaries() == []


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        spherical_kmeans(np.eye(3), 0)
    with pytest.raises(ValueError):
        spherical_kmeans(np.ones(3), 1)  # not a matrix


def test_unit_rows_leaves_zero_rows_alone() -> None:
    out = unit_rows([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_reservoir_is_bounded_seeded_and_uniform() -> None:
    def sample(seed: int, n: int = 100, capacity: int = 10) -> list[str]:
        r = Reservoir(capacity, seed)
        for i in range(n):
            r.offer(f"r{i}", "", np.zeros(2, dtype=np.float32))
        assert r.seen == n and len(r.items) == min(n, capacity)
        return [item[0] for item in r.items]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, n=7) == [f"r{i}" for i in range(7)]  # below capacity: everything, in order
    # Each row is kept with probability capacity / n (0.25 here), the first as the last.
    counts = Counter(i for seed in range(4000) for i in sample(seed, n=20, capacity=5))
    for row in ("r0", "r10", "r19"):
        assert 0.22 < counts[row] / 4000 < 0.28, (row, counts[row])


def test_summarizer_streamed_in_chunks_matches_one_pass() -> None:
    x, _ = _planted(groups=3, per_group=50)
    ids = [f"id{i:03d}" for i in range(len(x))]
    fitted = spherical_kmeans(x, 3, seed=0)

    whole = Summarizer(fitted.centroids, top=4)
    whole.add(ids, ids, x)
    chunked = Summarizer(fitted.centroids, top=4)
    for start in range(0, len(x), 7):
        chunked.add(ids[start : start + 7], ids[start : start + 7], x[start : start + 7])
    # BLAS may round a float32 product differently by block size: equal up to that.
    for w, c in zip(whole.summaries(), chunked.summaries(), strict=True):
        assert w.size == c.size and np.isclose(w.cohesion, c.cohesion, atol=1e-6)
        assert [m.id for m in w.members] == [m.id for m in c.members]

    summaries = whole.summaries()
    assert sum(c.size for c in summaries) == len(x)
    units = unit_rows(x)
    for c in summaries:
        assert len(c.members) == 4
        sims = [m.similarity for m in c.members]
        assert sims == sorted(sims, reverse=True)
        # The members really are the rows nearest their centroid, and cohesion is the mean.
        label = fitted.labels[ids.index(c.members[0].id)]
        mine = np.flatnonzero(fitted.labels == label)
        to_centroid = units[mine] @ fitted.centroids[label]
        assert c.size == len(mine)
        assert np.isclose(c.cohesion, to_centroid.mean(), atol=1e-5)
        assert np.isclose(sims[0], to_centroid.max(), atol=1e-5)
        assert sims[-1] >= np.sort(to_centroid)[-4] - 1e-6


# --- `similar` and `cluster` on a database the local model filled ------------------------

TOPICS: dict[str, list[str]] = {
    "space": [
        "The rocket lifted off towards the Moon with four astronauts on board.",
        "NASA delayed the launch of its lunar lander because of a fuel leak.",
        "Astronomers discovered a new exoplanet orbiting a distant star.",
        "The space station crew completed a six-hour spacewalk to repair a solar panel.",
        "Die Rakete startete mit vier Astronauten zum Mond.",
    ],
    "baking": [
        "Knead the dough, let it rise overnight and bake the bread at 220 degrees.",
        "For a flaky pie crust, keep the butter cold and do not overwork the pastry.",
        "Whisk the eggs and sugar until pale before folding in the flour for the sponge cake.",
        "Sourdough needs an active starter fed with flour and water every day.",
        "Amasa la masa, déjala reposar y hornea el pan por la mañana.",
    ],
    "finance": [
        "The central bank raised interest rates by a quarter point to fight inflation.",
        "Stock markets fell sharply after the quarterly earnings disappointed investors.",
        "The bond yield curve inverted, a signal many economists read as a recession warning.",
        "The currency weakened against the dollar as the trade deficit widened.",
        "La banque centrale a relevé ses taux d'intérêt pour freiner l'inflation.",
    ],
}
QUERY_ID = "space-0"
NEAR_DUPLICATE = {  # a paraphrase of space-0: the recommendation that must come first
    "id": "space-dup",
    "text": "Four astronauts lifted off on a rocket bound for the Moon.",
    "namespace": "news",
    "metadata": {"lang": "en", "topic": "space"},
}


def _corpus() -> list[dict[str, Any]]:
    events = [
        {
            "id": f"{topic}-{i}",
            "text": text,
            "namespace": "news",
            # A number and a boolean too, for the typed --where filters.
            "metadata": {
                "lang": "en" if i < 4 else "xx",
                "topic": topic,
                "rank": i,
                "lead": i == 0,
            },
        }
        for topic, texts in TOPICS.items()
        for i, text in enumerate(texts)
    ]
    events.append(NEAR_DUPLICATE)
    # The query's exact text in another namespace: similar stays within the row's namespace.
    events.append({"id": "copy", "text": TOPICS["space"][0], "namespace": "elsewhere"})
    return events


@pytest.fixture
async def filled(env: Env) -> Env:
    """The corpus stored by the real worker with the local model (512-d)."""
    await migrate_db(env, 512)
    high = await env.produce(_corpus())
    async with running(env.settings()):
        await env.wait_for_offsets(high)
    return env


async def _json_lines(env: Env, *args: str) -> list[dict[str, Any]]:
    code, out, err = await cli(*args, "--json", **_env(env))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_similar_ranks_the_near_duplicate_first_and_excludes_the_query(
    filled: Env,
) -> None:
    hits = await _json_lines(filled, "similar", QUERY_ID, "--namespace", "news", "-k", "4")
    assert len(hits) == 4
    assert set(hits[0]) == {
        "namespace",
        "id",
        "score",
        "content",
        "metadata",
        "chunk",
    }  # like search
    assert hits[0]["id"] == NEAR_DUPLICATE["id"]
    assert hits[0]["content"] == NEAR_DUPLICATE["text"]
    ids = [h["id"] for h in hits]
    assert QUERY_ID not in ids
    assert all(h["namespace"] == "news" for h in hits)  # not the exact copy in `elsewhere`
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # The other space texts outrank every baking and finance text.
    assert {h["metadata"]["topic"] for h in hits} == {"space"}

    # Metadata filters apply to the results, not to the query row.
    hits = await _json_lines(
        filled, "similar", QUERY_ID, "--namespace", "news", "--where", "topic=finance"
    )
    assert hits and {h["metadata"]["topic"] for h in hits} == {"finance"}

    # Plain output: one line per hit, score first.
    code, out, err = await cli(
        "similar", QUERY_ID, "--namespace", "news", "-k", "1", **_env(filled)
    )
    assert code == 0, err
    [line] = out.splitlines()
    score, name, *_ = line.split()
    assert name == "news/space-dup" and 0 < float(score) <= 1


async def test_where_matches_numbers_and_booleans_as_well_as_strings(filled: Env) -> None:
    """`--where` values are JSON when they parse as JSON: rank=0 is the number 0 (a string
    "0" matches no row), lead=true the boolean, topic="space" a quoted string."""

    async def ids(*args: str) -> set[str]:
        return {h["id"] for h in await _json_lines(filled, *args, "-k", "20")}

    leads = {"space-0", "baking-0", "finance-0"}
    assert await ids("search", "news", "--where", "rank=0") == leads
    assert await ids("search", "news", "--where", "lead=true") == leads
    assert await ids("search", "news", "--where", "rank=4", "--where", "lang=xx") == {
        "space-4",
        "baking-4",
        "finance-4",
    }
    assert await ids("search", "news", "--where", 'rank="0"') == set()
    assert await ids("search", "news", "--where", 'topic="space"', "--where", "lead=false") == {
        "space-1",
        "space-2",
        "space-3",
        "space-4",
    }
    assert await ids("similar", QUERY_ID, "--namespace", "news", "--where", "lead=true") == {
        "baking-0",
        "finance-0",
    }


async def test_similar_unknown_id_is_a_clear_error(filled: Env) -> None:
    code, out, err = await cli("similar", "no-such-id", "--namespace", "news", **_env(filled))
    assert code == 1
    assert out == ""
    assert "no-such-id" in err and "news" in err
    assert "Traceback" not in err
    # The id exists, but in another namespace than the default one.
    code, _, err = await cli("similar", QUERY_ID, **_env(filled))
    assert code == 1 and "'default'" in err


async def test_cluster_groups_the_planted_topics(filled: Env) -> None:
    args = ("cluster", "--namespace", "news", "-k", "3", "--members", "2", "--seed", "1")
    code, out, err = await cli(*args, "--json", **_env(filled))
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"namespace", "model", "rows", "fitted_on", "clusters", "k", "seed"}
    assert (report["namespace"], report["model"]) == ("news", "use-multilingual-v3")
    assert report["rows"] == report["fitted_on"] == 16  # 15 + the near-duplicate
    assert (report["k"], report["seed"]) == (3, 1)
    clusters = report["clusters"]
    assert len(clusters) == 3
    for c in clusters:
        assert set(c) == {"size", "cohesion", "members"}
        assert 0 < c["cohesion"] <= 1
        assert len(c["members"]) == 2
        assert all(set(m) == {"id", "content", "similarity"} for m in c["members"])
        sims = [m["similarity"] for m in c["members"]]
        assert sims == sorted(sims, reverse=True) and sims[0] <= 1 + 1e-6
    # One topic per cluster: the members' id prefixes, and the sizes (space has the duplicate).
    topics = [{m["id"].split("-")[0] for m in c["members"]} for c in clusters]
    assert all(len(t) == 1 for t in topics)
    assert sorted(t.pop() for t in topics) == ["baking", "finance", "space"]
    assert [c["size"] for c in clusters] == [6, 5, 5]

    # Deterministic: the same command prints the same report.
    code, again, _ = await cli(*args, "--json", **_env(filled))
    assert code == 0 and again == out

    # Plain output: a header, then each cluster with its members.
    code, text, err = await cli(*args, **_env(filled))
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].startswith("news (use-multilingual-v3): 16 rows, 3 clusters")
    assert sum(line.startswith("cluster ") for line in lines) == 3
    assert lines[1] == f"cluster 1: 6 rows, cohesion {clusters[0]['cohesion']:.3f}"


async def test_cluster_empty_namespace_and_more_clusters_than_rows(filled: Env) -> None:
    code, out, err = await cli("cluster", "--namespace", "nothing-here", "--json", **_env(filled))
    assert code == 0, err
    report = json.loads(out)
    assert (report["rows"], report["clusters"]) == (0, [])

    code, out, err = await cli("cluster", "--namespace", "elsewhere", "--json", **_env(filled))
    assert code == 0, err
    report = json.loads(out)
    assert report["rows"] == 1 and report["k"] == 8
    assert [(c["size"], c["members"][0]["id"]) for c in report["clusters"]] == [(1, "copy")]


# --- `cluster` with a sample smaller than the namespace (planted vectors, no model) ---------

MODEL = "use-multilingual-v3"  # what the default (local) configuration reads


async def _insert(env: Env, rows: list[tuple[str, str, str, npt.NDArray[np.float32], str]]) -> None:
    """(namespace, id, content, vector, model) rows, written directly."""
    conn = await env.connect()
    try:
        await conn.executemany(
            "INSERT INTO embeddings (namespace, id, embedding, content, content_hash, model, "
            "dimension, source_topic, source_partition, source_offset, event_time) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, 't', 0, 0, $8)",
            [
                (
                    ns,
                    id,
                    vec,
                    text,
                    hashlib.sha256(text.encode()).digest(),
                    model,
                    len(vec),
                    datetime.now(UTC),
                )
                for ns, id, text, vec, model in rows
            ],
        )
    finally:
        await conn.close()


async def test_cluster_fits_on_a_sample_then_assigns_every_row(env: Env) -> None:
    await migrate_db(env, 512)
    x, truth = _planted(groups=4, per_group=150, dimension=512, noise=0.5)
    await _insert(
        env,
        [
            ("big", f"g{t}-{i:04d}", f"text {i}", v, MODEL)
            for i, (v, t) in enumerate(zip(x, truth, strict=True))
        ],
    )
    # Rows of another model in the same namespace are not part of its clustering.
    await _insert(
        env, [("big", f"other-{i}", "x", v, "another-model") for i, v in enumerate(x[:20])]
    )

    args = ("cluster", "--namespace", "big", "-k", "4", "--sample", "40", "--members", "5")
    code, out, err = await cli(*args, "--json", **_env(env))
    assert code == 0, err
    report = json.loads(out)
    assert (report["rows"], report["fitted_on"]) == (600, 40)
    assert [c["size"] for c in report["clusters"]] == [150] * 4  # every row assigned, correctly
    for c in report["clusters"]:
        assert len({m["id"].split("-")[0] for m in c["members"]}) == 1
        assert not any(m["id"].startswith("other") for m in c["members"])

    # Another seed draws another sample, but the planted groups are found all the same.
    code, other, err = await cli(*args, "--seed", "5", "--json", **_env(env))
    assert code == 0, err
    assert [c["size"] for c in json.loads(other)["clusters"]] == [150] * 4
