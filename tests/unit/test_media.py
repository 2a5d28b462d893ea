"""The limits of multimodal events, checked before any request (worker/pipeline/media.py), and
how decode treats events with media for a multimodal worker and for a text worker."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest

from tests.unit.test_decode import as_change, as_letter, limits, record
from worker.config import ConfigError, OversizePolicy, load_settings
from worker.events import Reason
from worker.jsonvalue import Rejected
from worker.model import content_hash
from worker.pipeline.decode import decode
from worker.pipeline.formats import Ignored
from worker.pipeline.media import MediaLimits, checked_media, image_format

PLUS = MediaLimits.of("tongyi-embedding-vision-plus")
V1 = MediaLimits.of("multimodal-embedding-v1")
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
BMP = b"BM" + b"\x00" * 16


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def reason_of(images: list[str], video: str | None = None, media: MediaLimits = PLUS) -> Reason:
    with pytest.raises(Rejected) as caught:
        checked_media(images, video, media)
    return caught.value.reason


@pytest.mark.parametrize("data, name", [(JPEG, "jpeg"), (PNG, "png"), (BMP, "bmp")])
def test_the_three_formats_are_known_by_their_first_bytes(data: bytes, name: str) -> None:
    assert image_format(data) == name
    parts, stored = checked_media([uri(data)], None, PLUS)
    assert parts == (("image", uri(data)),)
    assert json.loads(stored)[0]["format"] == name


@pytest.mark.parametrize(
    "data", [b"GIF89a" + b"\x00" * 8, b"RIFF\x00\x00\x00\x00WEBP", b"", b"B"], ids=repr
)
def test_other_formats_are_refused_whatever_the_declared_type(data: bytes) -> None:
    assert reason_of([uri(data, "image/png")]) is Reason.MEDIA_UNSUPPORTED_FORMAT


def test_a_decoded_image_over_3_mb_is_too_large_and_one_at_the_limit_passes() -> None:
    limit = PLUS.limits.max_image_bytes
    assert limit == 3 * 1024 * 1024
    checked_media([uri(PNG + b"\x00" * (limit - len(PNG)))], None, PLUS)
    assert reason_of([uri(PNG + b"\x00" * (limit - len(PNG) + 1))]) is Reason.MEDIA_TOO_LARGE


def test_the_image_count_is_the_models() -> None:
    eight = [f"https://img.test/{n}.jpg" for n in range(8)]
    assert len(checked_media(eight, None, PLUS)[0]) == 8
    assert reason_of([*eight, "https://img.test/9.jpg"]) is Reason.TOO_MANY_IMAGES
    assert reason_of(eight[:2], media=V1) is Reason.TOO_MANY_IMAGES
    assert len(checked_media(eight[:1], None, V1)[0]) == 1


@pytest.mark.parametrize(
    "reference",
    [
        "ftp://img.test/a.png",
        "img.test/a.png",
        "https://",
        "data:image/png,rawbytes",
        "data:image/png;base64,not*base64",
    ],
)
def test_a_reference_that_is_neither_url_nor_base64_data_uri_is_invalid(reference: str) -> None:
    assert reason_of([reference]) is Reason.MEDIA_INVALID


def test_a_video_is_a_url_only_and_is_stored_by_url() -> None:
    assert reason_of([], "data:video/mp4;base64,AAAA") is Reason.MEDIA_INVALID
    parts, stored = checked_media([], "https://v.test/a.mp4", PLUS)
    assert parts == (("video", "https://v.test/a.mp4"),)
    assert json.loads(stored) == [{"type": "video", "url": "https://v.test/a.mp4"}]


def test_a_data_uri_is_stored_by_digest_not_by_its_bytes() -> None:
    _, stored = checked_media([uri(PNG)], None, PLUS)
    assert base64.b64encode(PNG).decode() not in stored
    assert json.loads(stored)[0]["bytes"] == len(PNG)


def multimodal(**changes: Any) -> Any:
    return dataclasses.replace(limits(**changes), media=PLUS)


def test_a_multimodal_worker_takes_media_with_or_without_text() -> None:
    alone = as_change(decode(record({"id": "a", "images": [uri(PNG)]}), multimodal()))
    assert (alone.text, alone.media) == ("", (("image", uri(PNG)),))
    with_text = as_change(
        decode(record({"id": "b", "text": "a cat", "images": [uri(PNG)]}), multimodal())
    )
    assert with_text.text == "a cat"
    assert with_text.content_hash == content_hash(
        "a cat", with_text.text_type, media=with_text.media
    )
    assert with_text.content_hash != content_hash("a cat", with_text.text_type)


def test_a_multimodal_events_text_obeys_the_token_limit_and_policy() -> None:
    event = {"id": "a", "text": "word " * 600, "images": [uri(PNG)]}
    letter = as_letter(
        decode(record(event), multimodal(max_tokens=512, policy=OversizePolicy.REJECT))
    )
    assert letter.reason is Reason.TEXT_TOO_LONG
    assert as_change(decode(record(event), multimodal(max_tokens=512))).truncated


def test_a_multimodal_events_limit_is_its_dead_letter_reason() -> None:
    letter = as_letter(decode(record({"id": "a", "images": [uri(b"GIF89a")]}), multimodal()))
    assert (letter.reason, letter.id) == (Reason.MEDIA_UNSUPPORTED_FORMAT, "a")


def test_a_text_worker_embeds_the_text_and_settles_a_media_only_event() -> None:
    event = {"id": "a", "text": "a cat", "images": ["https://img.test/cat.jpg"]}
    change = as_change(decode(record(event), limits()))
    assert (change.text, change.media, change.media_json) == ("a cat", (), None)
    only = {"id": "b", "images": ["https://img.test/cat.jpg"]}
    assert isinstance(decode(record(only), limits()), Ignored)


def test_settings_fix_the_dimension_and_cap_the_text_limit_by_model() -> None:
    base = {"kind": "dashscope-multimodal", "api_key": "k"}
    plus = load_settings(provider=base).provider
    assert (plus.model, plus.dimension, plus.max_tokens_per_text) == (
        "tongyi-embedding-vision-plus",
        1152,
        1024,
    )
    v1 = load_settings(provider={**base, "model": "multimodal-embedding-v1"}).provider
    assert (v1.dimension, v1.max_tokens_per_text) == (1024, 512)
    with pytest.raises(ConfigError, match="1152-d"):
        load_settings(provider={**base, "dimension": 1024})
    with pytest.raises(ConfigError, match="not a DashScope multimodal model"):
        load_settings(provider={**base, "model": "text-embedding-v4"})
    with pytest.raises(ConfigError, match="'chunk' does not apply"):
        load_settings(provider=base, oversize_policy="chunk")
