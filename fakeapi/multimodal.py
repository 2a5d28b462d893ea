"""The fake's multimodal endpoint: DashScope's request and answer shapes, limits and errors.

Each part of ``input.contents`` gets its own vector (``index`` in request order). The fake
"sees" an image or video URL as the words of its file name (``red-bicycle.jpg`` is "red
bicycle"), so text-to-image search can be tested with ``fake_vector``; a data URI's image
is a vector of its bytes' digest. URLs are not fetched: the fake judges one by its file
name's extension (an image ``.gif``, a video ``.txt``... is refused as the real service
refuses what it fetched), which is how a test gets a ``provider_rejected`` URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from fakeapi.tokens import count_tokens
from fakeapi.vectors import Vector, fake_vector

PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"


@dataclass(frozen=True)
class Model:
    dimension: int
    max_text_tokens: int
    max_images: int


MODELS = {
    "tongyi-embedding-vision-plus": Model(1152, 1024, 8),
    "tongyi-embedding-vision-flash": Model(768, 1024, 8),
    "multimodal-embedding-v1": Model(1024, 512, 1),
}
MAX_IMAGE_BYTES = 3 * 1024 * 1024
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
_DATA_URI = re.compile(r"data:[^,]*;base64,", re.I)
# The formats the guide lists, by extension (a URL without one passes).
_EXTENSIONS = {
    "image": {"jpg", "jpeg", "png", "bmp"},
    "video": {"mp4", "mpeg", "mov", "mpg", "webm", "avi", "flv", "mkv"},
}


class Invalid(Exception):
    """A 400 InvalidParameter, as the real endpoint answers a request over a limit."""


def parse(data: dict[str, Any]) -> tuple[Model, list[tuple[str, str]]]:
    """The model and the (kind, value) parts of a request, or ``Invalid``."""
    model = MODELS.get(str(data.get("model")))
    if model is None:
        raise Invalid(f"Model not exist: {data.get('model')!r} is not a multimodal model.")
    inp = data.get("input")
    items = inp.get("contents") if isinstance(inp, dict) else None
    if not isinstance(items, list) or not items:
        raise Invalid("input.contents must be a non-empty array.")
    parts: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            raise Invalid("each element of input.contents must have one of text, image, video.")
        ((kind, value),) = item.items()
        if kind not in ("text", "image", "video") or not isinstance(value, str) or not value:
            raise Invalid(f"unsupported content {kind!r}: text, image or video, a string.")
        parts.append((kind, value))
    counts = {k: sum(1 for kind, _ in parts if kind == k) for k in ("text", "image", "video")}
    if counts["text"] > 1 or counts["video"] > 1:
        raise Invalid("at most one text and one video per request.")
    if counts["image"] > model.max_images:
        raise Invalid(f"too many images: at most {model.max_images} per request.")
    return model, parts


def check(model: Model, kind: str, value: str) -> int:
    """The part's tokens (text), or ``Invalid`` for a part over a limit."""
    if kind == "text":
        tokens = count_tokens(value)
        if tokens > model.max_text_tokens:
            raise Invalid(f"Range of input length should be [1, {model.max_text_tokens}]")
        return tokens
    match = _DATA_URI.match(value)
    if match is None:
        url = urlsplit(value)
        if url.scheme not in ("http", "https"):
            raise Invalid(f"The {kind} is neither a URL nor a base64 data URI.")
        name = url.path.rsplit("/", 1)[-1]
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else None
        if extension is not None and extension not in _EXTENSIONS[kind]:
            raise Invalid(f"The {kind} format is not supported: {extension}.")
        return 0
    if kind == "video":
        raise Invalid("Video must be a URL.")
    try:
        data = base64.b64decode(value[match.end() :], validate=True)
    except binascii.Error:
        raise Invalid("The image is not valid base64.") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise Invalid(f"The image exceeds {MAX_IMAGE_BYTES} bytes.")
    if not data.startswith(_MAGIC):
        raise Invalid("The image format is not supported: JPG, PNG or BMP.")
    return 0


def seen_as(kind: str, value: str) -> str:
    """What the fake embeds for a part: a text as is, a URL's file name as words."""
    if kind == "text":
        return value
    match = _DATA_URI.match(value)
    if match is not None:
        return "image-bytes:" + hashlib.sha256(value[match.end() :].encode()).hexdigest()
    name = unquote(urlsplit(value).path.rsplit("/", 1)[-1]).rsplit(".", 1)[0]
    return re.sub(r"[-_+]+", " ", name).strip() or value


def vector(kind: str, value: str, dimension: int) -> Vector:
    return fake_vector(seen_as(kind, value), dimension)
