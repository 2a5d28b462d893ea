"""Multimodal events (issue 18): a worker with provider.kind = dashscope-multimodal, on its own
schema (search_path in its DSN) beside a text worker's tables, stores image, video and text
events through the fake's multimodal endpoint; events over the model's limits are
dead-lettered with their own reasons and never sent; text-to-image search finds the image."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import asyncpg
import httpx
import numpy as np

from fakeapi import FakeEmbeddingServer
from fakeapi.vectors import fake_vector
from tests.conftest import API_KEY, Env, dashscope, migrate_db, running
from tests.integration.test_cli import _env
from tests.processes import cli
from worker.sinks.migrate import migrate

MODEL = "tongyi-embedding-vision-plus"
DIMENSION = 1152
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
GIF_URI = "data:image/gif;base64," + base64.b64encode(b"GIF89a" + b"\x00" * 32).decode()

STORED: list[dict[str, Any]] = [
    {"id": "bike", "images": ["https://img.test/red-bicycle.jpg"]},
    {"id": "cat", "text": "a sleeping cat", "images": [PNG_URI]},
    {"id": "waves", "video": "https://img.test/ocean-waves.mp4"},
    {"id": "memo", "text": "quarterly budget memo"},
]
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "gif": ({"images": [GIF_URI]}, "media_unsupported_format"),
    "many": (
        {"images": [f"https://img.test/photo-{n}.jpg" for n in range(9)]},
        "too_many_images",
    ),
    "video-data": ({"video": "data:video/mp4;base64,AAAA"}, "media_invalid"),
    "ftp": ({"images": ["ftp://img.test/a.png"]}, "media_invalid"),
    "long": ({"images": ["https://img.test/long.jpg"], "text": "word " * 1500}, "text_too_long"),
}


def media_dsn(env: Env) -> str:
    return env.dsn + ("&" if "?" in env.dsn else "?") + "search_path=media,public"


def provider(fake: FakeEmbeddingServer) -> dict[str, Any]:
    return {
        "kind": "dashscope-multimodal",
        "model": MODEL,
        "base_url": fake.url + "/api/v1",
        "api_key": API_KEY,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.2,
    }


def _parts(event: dict[str, Any]) -> list[tuple[str, str]]:
    """The (kind, value) parts the worker sends for an event, as the fake records them."""
    text = [("text", event["text"])] if event.get("text") else []
    video = [("video", event["video"])] if event.get("video") else []
    return text + [("image", i) for i in event.get("images", [])] + video


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / float(np.linalg.norm(vector))


async def test_multimodal_events_are_stored_refused_by_limit_and_found_by_text(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    conn = await asyncpg.connect(media_dsn(env))
    try:
        assert await migrate(conn, DIMENSION)  # creates the schema `media`
    finally:
        await conn.close()
    await migrate_db(env, 256)  # then the text worker's tables, in public: pgvector is found
    # A URL's content is the provider's to judge: the fake refuses this one, as the real
    # service refuses what it fetched; the event is sent, then dead-lettered.
    rejected = {"id": "anim", "images": ["https://img.test/anim.gif"]}
    events = [*STORED, *({"id": id, **event} for id, (event, _) in REFUSED.items()), rejected]
    high = await env.produce(events)
    settings = env.settings(
        provider(fake_api), postgres={"dsn": media_dsn(env)}, oversize_policy="reject"
    )
    media = copy.copy(env)  # its offsets are in its own schema too
    media.dsn = media_dsn(env)
    async with running(settings):
        await media.wait_for_offsets(high)
    letters = await env.dead_letters(len(REFUSED) + 1)
    assert {letter["id"]: letter["reason"] for letter in letters} == {
        **{id: reason for id, (_, reason) in REFUSED.items()},
        "anim": "provider_rejected",
    }
    assert next(x for x in letters if x["id"] == "anim")["provider_code"] == "InvalidParameter"

    # Nothing of an event refused by its limits reached the provider: one request per stored
    # event, and one for the event the provider refused.
    sent = fake_api.multimodal_requests()
    assert sorted(map(sorted, sent)) == sorted(
        sorted(parts)
        for parts in [*(_parts(e) for e in STORED), [("image", "https://img.test/anim.gif")]]
    )
    values = {value for parts in sent for _, value in parts}
    for event, _ in REFUSED.values():
        assert not set(event.get("images", [])) & values
        assert event.get("video") not in values

    conn = await asyncpg.connect(env.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM public.embeddings") == 0
        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, embedding::text AS v, model, dimension, media, content "
                "FROM media.embeddings"
            )
        }
    finally:
        await conn.close()
    assert set(rows) == {e["id"] for e in STORED}
    digest = hashlib.sha256(base64.b64encode(PNG)).hexdigest()
    expected = {
        "bike": fake_vector("red bicycle", DIMENSION),
        "cat": unit(
            fake_vector("a sleeping cat", DIMENSION)
            + fake_vector("image-bytes:" + digest, DIMENSION)
        ),
        "waves": fake_vector("ocean waves", DIMENSION),
        "memo": fake_vector("quarterly budget memo", DIMENSION),
    }
    for id, vector in expected.items():
        stored = np.array(json.loads(rows[id]["v"]), dtype=np.float32)
        assert np.allclose(stored, vector, atol=1e-5), id
        assert (rows[id]["model"], rows[id]["dimension"]) == (MODEL, DIMENSION)
    assert json.loads(rows["bike"]["media"]) == [
        {"type": "image", "url": "https://img.test/red-bicycle.jpg"}
    ]
    cat_media = json.loads(rows["cat"]["media"])
    assert cat_media == [
        {
            "type": "image",
            "format": "png",
            "bytes": len(PNG),
            "sha256": hashlib.sha256(PNG).hexdigest(),
        }
    ]
    assert rows["memo"]["media"] is None and rows["cat"]["content"] == "a sleeping cat"

    # Text-to-image search: the query goes through the same model's text input.
    environment = _env(
        env,
        EMBEDDING_WORKER_POSTGRES__DSN=media_dsn(env),
        EMBEDDING_WORKER_PROVIDER__KIND="dashscope-multimodal",
        EMBEDDING_WORKER_PROVIDER__MODEL=MODEL,
        EMBEDDING_WORKER_PROVIDER__BASE_URL=fake_api.url + "/api/v1",
        EMBEDDING_WORKER_PROVIDER__API_KEY=API_KEY,
    )
    code, out, err = await cli("search", "red bicycle", "-k", "2", "--json", **environment)
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert hits[0]["id"] == "bike"
    assert hits[0]["score"] > 0.99

    # The text deployment on the same topic, its own group, in public: it embeds the text of
    # an event with media, skips a media-only one, and refuses none of them.
    text = copy.copy(env)
    text.group = env.group + "-text"
    text_provider = {**dashscope(fake_api, 256), "max_tokens_per_text": 8192}
    async with running(text.settings(text_provider, kafka={"group_id": text.group})):
        await text.wait_for_offsets(high)
    conn = await asyncpg.connect(env.dsn)
    try:
        stored_text = {
            r["id"]: r["plain"]
            for r in await conn.fetch("SELECT id, media IS NULL AS plain FROM public.embeddings")
        }
    finally:
        await conn.close()
    assert stored_text == {"cat": True, "memo": True, "long": True}
    assert len(await env.dead_letters(len(REFUSED) + 1)) == len(REFUSED) + 1


async def test_backfill_and_reembed_refuse_a_multimodal_provider(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    environment = _env(
        env,
        EMBEDDING_WORKER_PROVIDER__KIND="dashscope-multimodal",
        EMBEDDING_WORKER_PROVIDER__BASE_URL=fake_api.url + "/api/v1",
        EMBEDDING_WORKER_PROVIDER__API_KEY=API_KEY,
    )
    code, _, err = await cli("backfill", **environment)
    assert code == 2 and "embeds text only" in err
    code, _, err = await cli("reembed", "start", "v2", **environment)
    assert code == 2 and "a multimodal table's images" in err
    code, out, _ = await cli("search", "--help")
    assert code == 0 and "text-to-image" in "".join(out.split())  # wrapped at hyphens


async def test_the_fake_endpoint_refuses_what_the_model_refuses(
    fake_api: FakeEmbeddingServer,
) -> None:
    url = fake_api.url + "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    big = "data:image/png;base64," + base64.b64encode(PNG + b"\x00" * (3 << 20)).decode()
    refused = {
        "unknown model": ("text-embedding-v4", [{"text": "a"}]),
        "nine images": (MODEL, [{"image": f"https://img.test/{n}.jpg"} for n in range(9)]),
        "two images for v1": (
            "multimodal-embedding-v1",
            [{"image": "https://img.test/a.jpg"}, {"image": "https://img.test/b.jpg"}],
        ),
        "over 3 MB": (MODEL, [{"image": big}]),
        "gif bytes": (MODEL, [{"image": GIF_URI}]),
        "video as data": (MODEL, [{"video": "data:video/mp4;base64,AAAA"}]),
        "text over 1024 tokens": (MODEL, [{"text": "word " * 1100}]),
        "two texts": (MODEL, [{"text": "a"}, {"text": "b"}]),
    }
    async with httpx.AsyncClient(headers=headers) as client:
        for what, (model, parts) in refused.items():
            body = {"model": model, "input": {"contents": parts}}
            answer = await client.post(url, json=body)
            assert (answer.status_code, answer.json()["code"]) == (400, "InvalidParameter"), what
        body = {"model": MODEL, "input": {"contents": [{"text": "a cat"}, {"image": PNG_URI}]}}
        fake_api.configure(rate_500=1.0)  # the fault injection covers this endpoint too
        failed = await client.post(url, json=body)
        assert (failed.status_code, failed.json()["code"]) == (500, "InternalError")
        fake_api.configure(rate_500=0.0)
        answer = await client.post(url, json=body)
    assert answer.status_code == 200
    items = sorted(answer.json()["output"]["embeddings"], key=lambda e: e["index"])
    assert [e["type"] for e in items] == ["text", "image"]
    assert np.allclose(items[0]["embedding"], fake_vector("a cat", DIMENSION), atol=1e-6)
