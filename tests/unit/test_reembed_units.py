"""The re-embed's pure parts: target names, the guard, the target's provider settings, the
SQL of a pass's cursor, and the progress line's rate and ETA."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from worker.cli import _parser
from worker.config import ConfigError, ProviderKind, load_settings
from worker.sinks import reembed as sql
from worker.sinks.reembed import Shape, Target
from worker.tools.progress import Progress, clock, eta, line
from worker.tools.reembed import target_provider

TARGET = Target("v4", {}, "text-embedding-v4", 2048)
SHAPE = Shape(("namespace", "id", "chunk"), ("text", "text", "integer"), ())


@pytest.mark.parametrize("name", ["v4", "v4_2048", "a" * 30])
def test_names_that_become_table_names_are_accepted(name: str) -> None:
    assert sql.table_of(sql.check_name(name)) == f"reembed_{name}"


@pytest.mark.parametrize("name", ["", "V4", "4v", "v-4", "v4;drop table x", "a" * 31])
def test_other_names_are_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigError, match="target name"):
        sql.check_name(name)


def test_the_guard_refuses_another_model_or_dimension() -> None:
    sql.guard(TARGET, "text-embedding-v4", [np.zeros(2048)])
    with pytest.raises(ConfigError, match="for model 'text-embedding-v4'"):
        sql.guard(TARGET, "text-embedding-v3", [np.zeros(2048)])
    with pytest.raises(ConfigError, match="1024-d vector"):
        sql.guard(TARGET, "text-embedding-v4", [np.zeros(2048), np.zeros(1024)])


def test_the_cursor_compares_the_whole_primary_key_with_its_types() -> None:
    assert (
        sql._after(SHAPE, 3) == "(e.namespace, e.id, e.chunk) > ($3::text, $4::text, $5::integer)"
    )
    assert sql._unnest(SHAPE, [("content_hash", "bytea")]) == (
        "unnest($1::text[], $2::text[], $3::integer[], $4::bytea[]) "
        "AS v(namespace, id, chunk, content_hash)"
    )


def test_the_target_takes_the_current_settings_with_the_options_over_them() -> None:
    current = load_settings(
        provider={"kind": "dashscope", "api_key": "k", "dimension": 1024, "rpm": 600}
    )
    target = target_provider(current, None, {"dimension": 2048, "instruct": "Represent it"})
    assert (target.model, target.dim, target.rpm, target.instruct) == (
        "text-embedding-v4",
        2048,
        600,
        "Represent it",
    )
    assert target.api_key is not None and target.api_key.get_secret_value() == "k"
    # Another kind does not inherit what was resolved for this one (its URL, model, size).
    local = target_provider(current, None, {"kind": "local"})
    assert (local.kind, local.dim) == (ProviderKind.LOCAL, 512)
    with pytest.raises(ConfigError, match=r"provider\.dimension 100"):
        target_provider(current, None, {"dimension": 100})


def test_the_eta_is_what_is_left_at_the_rate_so_far() -> None:
    assert eta(0, 100, 5.0) is None
    assert eta(25, 100, 10.0) == 30.0
    assert (clock(None), clock(75), clock(3725)) == ("--:--", "1:15", "1:02:05")
    assert line("v4", 25, 100, 10.0) == (
        "v4 [#######.......................]  25%  25/100  2/s  ETA 0:30"
    )


def test_a_progress_bar_not_on_a_terminal_writes_plain_lines() -> None:
    out = io.StringIO()
    bar = Progress("v4", 10, out=out, quiet_s=3600)
    bar.add(4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("v4 [############") and "4/10" in lines[0]
    assert "\r" not in out.getvalue()


@pytest.mark.parametrize("action", ["start", "status", "switch", "drop"])
def test_every_reembed_action_has_help_with_its_defaults(action: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parser().parse_args(["reembed", action, "--help"])
    text = " ".join(out.getvalue().split())
    assert f"usage: embedding-worker reembed {action}" in text and "--config FILE" in text
    if action in ("start", "switch"):
        assert "rows per transaction (default: 500)" in text
    if action == "switch":
        assert "(default: 1000)" in text and "(default: 30.0)" in text


def test_a_resumed_run_counts_only_its_own_rows_in_the_rate() -> None:
    # 60 of 100 done before; 20 more in 10 s: 2/s, 20 left: 10 s.
    assert line("v4", 80, 100, 10.0, base=60).endswith("80/100  2/s  ETA 0:10")
