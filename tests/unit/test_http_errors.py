"""DashScope's error codes turned into retry / split / stop (README, "Failure semantics")."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest

from worker.embedding.providers.base import (
    ConfigurationFault,
    PermanentError,
    TooManyInputs,
    TransientError,
)
from worker.embedding.providers.http import classify, parse_retry_after

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


def response(
    status: int,
    code: str | None = None,
    message: str = "",
    openai: bool = False,
    retry_after: str | None = None,
) -> tuple[int, bytes, str | None]:
    """``classify``'s arguments for an answer in DashScope's (or the OpenAI) error shape."""
    body: dict[str, Any] = {"message": message, "request_id": "r-1"}
    if code is not None:
        body["code"] = code
    if openai:
        body["error"] = {"code": code, "message": message, "type": "invalid_request_error"}
    return status, orjson.dumps(body), retry_after


# --- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("7", 7.0), (" 12 ", 12.0), ("0.25", 0.25), ("1.5", 1.5), ("-3", 0.0)],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize("seconds", [1, 30, 3600])
def test_retry_after_http_date(seconds: int) -> None:
    header = http_date(NOW + timedelta(seconds=seconds))
    assert header.endswith("GMT")
    assert parse_retry_after(header, now=NOW.timestamp()) == pytest.approx(seconds)


def test_retry_after_date_in_the_past_is_zero() -> None:
    header = http_date(NOW - timedelta(minutes=5))
    assert parse_retry_after(header, now=NOW.timestamp()) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "Thu, 99 Foo 2025", "12 seconds", "1,5"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) is None


@pytest.mark.parametrize("value", ["inf", "Infinity"])
def test_retry_after_non_numeric_spelling_is_not_infinite(value: str) -> None:
    parsed = parse_retry_after(value)
    assert parsed is None or math.isfinite(parsed)


# --- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("openai", [False, True], ids=["native", "openai"])
def test_400_invalid_parameter_is_permanent(openai: bool) -> None:
    exc = classify(
        *response(400, "InvalidParameter", "Range of input length should be [1, 8192]", openai)
    )
    assert type(exc) is PermanentError
    assert exc.code == "InvalidParameter"
    assert "8192" in exc.message and "400" in exc.message


@pytest.mark.parametrize("openai", [False, True], ids=["native", "openai"])
def test_400_data_inspection_failed_is_permanent_with_its_code(openai: bool) -> None:
    exc = classify(
        *response(
            400, "DataInspectionFailed", "Input data may contain inappropriate content.", openai
        )
    )
    assert type(exc) is PermanentError
    assert exc.code == "DataInspectionFailed"


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "batch size is invalid, it should not be larger than 10."),  # DashScope
        (413, "batch size 64 > maximum allowed batch size 32"),  # TEI
        (422, "Too many inputs: at most 16 per request"),
    ],
)
def test_a_refused_number_of_texts_is_too_many_inputs(status: int, message: str) -> None:
    exc = classify(*response(status, "InvalidParameter", message, openai=True))
    assert type(exc) is TooManyInputs
    assert isinstance(exc, PermanentError)  # split, never a configuration fault


@pytest.mark.parametrize(
    "message",
    [
        "Range of input length should be [1, 8192]",
        "Input text exceeds the maximum length of 8192 tokens",
        "Input data may contain inappropriate content.",
    ],
)
def test_a_refused_text_is_not_too_many_inputs(message: str) -> None:
    assert type(classify(*response(400, "InvalidParameter", message, openai=True))) is (
        PermanentError
    )


def test_400_about_the_dimension_is_a_configuration_fault() -> None:
    exc = classify(*response(400, "InvalidParameter", "parameters.dimension must be one of [...]"))
    assert type(exc) is ConfigurationFault
    assert exc.code == "InvalidParameter"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "InvalidApiKey"),
        (401, None),
        (403, "AccessDenied"),
        (403, None),
        (400, "Arrearage"),
        (403, "Arrearage"),
        (400, "Model.AccessDenied"),
        (404, "ModelNotFound"),
    ],
)
def test_account_problems_are_configuration_faults(status: int, code: str | None) -> None:
    exc = classify(*response(status, code, "Access denied, please make sure your account is ok."))
    assert type(exc) is ConfigurationFault
    assert exc.code == (code or str(status))


def test_429_with_retry_after_is_transient_with_the_delay() -> None:
    exc = classify(*response(429, "Throttling", "Requests rate limit exceeded", retry_after="2.5"))
    assert type(exc) is TransientError
    assert exc.code == "Throttling"
    assert exc.retry_after == 2.5


def test_429_with_http_date_retry_after() -> None:
    future = datetime.now(UTC) + timedelta(seconds=120)
    exc = classify(*response(429, "Throttling.RateQuota", "", retry_after=http_date(future)))
    assert isinstance(exc, TransientError)
    assert exc.retry_after is not None and 100 < exc.retry_after <= 121


def test_429_without_retry_after() -> None:
    exc = classify(*response(429, "Throttling.AllocationQuota", "quota"))
    assert isinstance(exc, TransientError)
    assert exc.retry_after is None


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "InternalError"), (502, None), (503, "ServiceUnavailable"), (504, None), (408, None)],
)
def test_server_errors_are_transient(status: int, code: str | None) -> None:
    exc = classify(*response(status, code, "An internal error has occured, please retry."))
    assert type(exc) is TransientError
    assert exc.code == (code or str(status))
    assert exc.retry_after is None


def test_non_json_error_body() -> None:
    exc = classify(502, b"<html>Bad Gateway</html>")
    assert isinstance(exc, TransientError)
    assert "Bad Gateway" in exc.message
    exc = classify(400, b"bad request")
    assert type(exc) is PermanentError and exc.code == "400"
