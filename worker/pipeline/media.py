"""The images and video of a multimodal event, checked against the model's limits (for decode).

Everything that can be known without a network call is checked here, so an event over a
limit is dead-lettered with its own reason and never sent: the number of images, the form of
each reference, and for a base64 data URI its decoded size and its format by magic bytes.
The size of a URL's content is not known without fetching it; the worker does not fetch
(docs/multimodal.md): the provider refuses it, and that is a ``provider_rejected`` letter.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from worker.config import MULTIMODAL_MODELS, MultimodalModel
from worker.events import Reason
from worker.jsonvalue import Rejected

# The formats the models take, by their first bytes.
IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
)
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64,", re.I)


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """The multimodal model a worker embeds with (None in ``decode.Limits`` for text)."""

    model: str
    limits: MultimodalModel

    @classmethod
    def of(cls, model: str) -> MediaLimits:
        return cls(model, MULTIMODAL_MODELS[model])


def checked_media(
    images: list[str], video: str | None, limits: MediaLimits
) -> tuple[tuple[tuple[str, str], ...], str]:
    """The parts to send ((kind, reference), images first) and their JSON description to
    store; ``Rejected`` with the reason of the first limit an event exceeds."""
    model = limits.limits
    if len(images) > model.max_images:
        raise Rejected(
            Reason.TOO_MANY_IMAGES,
            f"the event has {len(images)} images; {limits.model} takes at most "
            f"{model.max_images} per request",
        )
    parts: list[tuple[str, str]] = []
    stored: list[dict[str, object]] = []
    for n, reference in enumerate(images):
        parts.append(("image", reference))
        stored.append(_image(reference, n, model))
    if video is not None:
        if reference_kind(video) != "url":
            raise Rejected(
                Reason.MEDIA_INVALID,
                "`video` must be an http(s) URL (the models take videos by URL only)",
            )
        parts.append(("video", video))
        stored.append({"type": "video", "url": video})
    return tuple(parts), orjson.dumps(stored).decode()


def reference_kind(reference: str) -> str | None:
    """ "url" (http or https with a host), "data" (a data URI), or None."""
    if reference[:5].lower() == "data:":
        return "data"
    parts = urlsplit(reference)
    if parts.scheme.lower() in ("http", "https") and parts.hostname:
        return "url"
    return None


def _image(reference: str, n: int, model: MultimodalModel) -> dict[str, object]:
    kind = reference_kind(reference)
    if kind == "url":
        return {"type": "image", "url": reference}
    if kind is None:
        raise Rejected(
            Reason.MEDIA_INVALID,
            f"images[{n}] is neither an http(s) URL nor a base64 data URI",
        )
    data = decoded_data_uri(reference, f"images[{n}]")
    if len(data) > model.max_image_bytes:
        raise Rejected(
            Reason.MEDIA_TOO_LARGE,
            f"images[{n}] is {len(data)} bytes decoded; the model takes at most "
            f"{model.max_image_bytes}",
        )
    form = image_format(data)
    if form is None:
        raise Rejected(
            Reason.MEDIA_UNSUPPORTED_FORMAT,
            f"images[{n}] is not JPG, PNG or BMP (its first bytes are {data[:8].hex()})",
        )
    return {
        "type": "image",
        "format": form,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def decoded_data_uri(reference: str, what: str) -> bytes:
    """The bytes of a ``data:[<mime>][;...];base64,<data>`` URI (base64 only, strictly)."""
    match = _DATA_URI.match(reference)
    if match is None:
        raise Rejected(Reason.MEDIA_INVALID, f"{what} is a data URI without `;base64,`")
    try:
        return binascii.a2b_base64(reference[match.end() :], strict_mode=True)
    except binascii.Error as exc:
        raise Rejected(Reason.MEDIA_INVALID, f"{what} is not valid base64: {exc}") from None


def image_format(data: bytes) -> str | None:
    """JPG, PNG or BMP by their magic bytes, else None."""
    for magic, name in IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    return None
