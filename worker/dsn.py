"""Check a Postgres DSN at start, without connecting, the way asyncpg will read it.

A DSN asyncpg cannot use is a configuration error, found before anything starts; left to the
first connection it was a traceback (a port that is not a number), a silently different port
(asyncpg takes 99999 modulo 65536), or a retry loop that never ends (a bad ``sslmode`` is an
``InterfaceError``, which looks like an outage). asyncpg's own parser decides what it accepts;
the checks around it only word the common mistakes better. No message shows the password.
"""

from __future__ import annotations

import inspect
import urllib.parse
from typing import Any

import asyncpg
from asyncpg import connect_utils

SCHEMES = ("postgresql", "postgres")

# libpq connection options asyncpg does not implement: it would send them to the server as
# settings (``SET connect_timeout``...), which refuses them at every connection.
LIBPQ_ONLY = frozenset(
    {
        "hostaddr",
        "connect_timeout",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "gssencmode",
        "gssdelegation",
        "channel_binding",
        "require_auth",
        "requirepeer",
        "sslcompression",
        "sslcertmode",
        "sslsni",
        "sslkeylogfile",
        "load_balance_hosts",
        "min_protocol_version",
        "max_protocol_version",
    }
)

URI_FORM = "postgresql://user:password@host:5432/database?sslmode=require"


def dsn_problem(dsn: str) -> str | None:
    """Why asyncpg could not use ``dsn`` (worded without its password), or None."""
    problem = _problem(dsn)
    return None if problem is None else _mask(problem, dsn)


def _problem(dsn: str) -> str | None:
    if dsn != dsn.strip():
        return "it starts or ends with white space (a newline from a secret file?)"
    if "://" not in dsn:
        if "=" in dsn and "@" not in dsn:
            return (
                "a keyword/value connection string (host=... dbname=...) is not supported: "
                f"use the URI form, {URI_FORM}"
            )
        return f"not a connection URI: use the form {URI_FORM}"
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError as exc:
        return f"not a valid URI ({exc})"
    if parts.scheme not in SCHEMES:
        return f"the scheme must be postgresql:// or postgres://, not {parts.scheme}://"
    if parts.netloc.count("@") > 1:
        return "more than one '@' before the host: percent-encode it in the user or password (%40)"
    try:
        query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        return "the query string is not key=value pairs joined by '&'"
    unsupported = sorted(LIBPQ_ONLY & set(query))
    if unsupported:
        return (
            f"{', '.join(unsupported)}: libpq option(s) that asyncpg does not implement "
            "(the server would refuse them as settings); remove them"
        )
    return _asyncpg_problem(dsn)


def _asyncpg_problem(dsn: str) -> str | None:
    """What asyncpg's own DSN parser (the one ``asyncpg.connect`` runs first) refuses.

    It is private: called with every argument but the DSN left to its default (None), so a
    new keyword in a later asyncpg does not break it; tests pin the behaviour.
    """
    parse: Any = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:  # pragma: no cover - a future asyncpg; the checks above still ran
        return None
    arguments = {name: None for name in inspect.signature(parse).parameters}
    try:
        addresses, _ = parse(**{**arguments, "dsn": dsn})
    except asyncpg.ClientConfigurationError as exc:
        return str(exc)
    except ValueError as exc:
        if "invalid literal for int()" in str(exc):
            return "a port is not a number"
        return f"asyncpg cannot read it ({exc})"
    except OSError as exc:  # a certificate or key file it names cannot be read
        return f"a file it names cannot be read: {exc}"
    for address in addresses:
        if isinstance(address, tuple) and not 0 < address[1] < 65536:
            return f"port {address[1]} is out of range (1-65535)"
    return None


def _mask(message: str, dsn: str) -> str:
    """The message without the DSN's password, should a parser have quoted it."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        secrets = {parts.password or ""}
        secrets |= set(urllib.parse.parse_qs(parts.query).get("password", []))
    except ValueError:
        secrets = set()
    for secret in secrets - {""}:
        for form in {secret, urllib.parse.unquote(secret)}:
            message = message.replace(form, "***")
    return message
