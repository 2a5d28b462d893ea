"""Dual write's pure parts: what a transaction writes into a target, the target's provider
settings, the setting and its scope, and the breaker's cool-down that dual write skips."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.factories import upsert
from worker.config import ConfigError, ProviderKind, load_settings
from worker.embedding.breaker import CircuitBreaker
from worker.pipeline.dualwrite import plan_rows, target_provider
from worker.sinks.reembed import Target

KEY = "sk-test-0123456789"


def test_a_transaction_writes_the_newest_version_of_each_key_into_the_target() -> None:
    older = upsert(1, "first text", id="a")
    older.dual = {"v3": (np.ones(4, dtype=np.float32), None)}
    newer = upsert(2, "first text", id="a")
    newer.unchanged = True  # the same content again: a new version, no vector
    embedded = upsert(3, "second text", id="b")
    embedded.dual = {"v3": (np.zeros(4, dtype=np.float32), None)}
    failed = upsert(4, "third text", id="c")  # the target's provider did not embed it
    other = upsert(5, "fourth text", id="d")
    other.dual = {"v4": (np.ones(4, dtype=np.float32), None)}
    deleted = replace(upsert(6, "", id="e"), op="delete")
    rows = plan_rows("v3", [older, newer, embedded, failed, other, deleted])
    assert [(ns, id, h) for ns, id, h, _, _ in rows.embedded] == [
        ("ns", "b", embedded.content_hash)
    ]
    assert rows.unchanged == [("ns", "a")]
    assert sorted(rows.keys) == [("ns", k) for k in "abcde"]


def test_the_targets_provider_is_its_stored_settings_with_the_current_key() -> None:
    current = load_settings(provider={"kind": "dashscope", "api_key": KEY, "dimension": 64})
    stored = current.provider.model_dump(mode="json", exclude={"api_key"})
    target = Target("v3", {**stored, "model": "text-embedding-v3", "dimension": 128}, "m", 128)
    provider = target_provider(target, current)
    assert (provider.model, provider.dimension) == ("text-embedding-v3", 128)
    assert provider.api_key is not None and provider.api_key.get_secret_value() == KEY
    # A rejected key must not hold the worker's batches: the target's stage raises at once.
    assert provider.on_auth_fault == "exit"
    broken = Target("v3", {**stored, "dimension": -1}, "m", 128)
    with pytest.raises(ConfigError, match="re-embed 'v3'"):
        target_provider(broken, current)


def test_dual_write_is_off_unless_set_and_refused_where_it_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().reembed.dual_write is False
    monkeypatch.setenv("EMBEDDING_WORKER_REEMBED__DUAL_WRITE", "true")
    assert load_settings().reembed.dual_write is True
    with pytest.raises(ConfigError, match=r"reembed\.dual_write does not apply to oversize_policy"):
        load_settings(oversize_policy="chunk")
    with pytest.raises(ConfigError, match=r"reembed\.dual_write does not apply to provider\.kind"):
        load_settings(provider={"kind": ProviderKind.DASHSCOPE_MULTIMODAL, "api_key": KEY})


def test_the_breaker_cools_down_only_while_open_within_its_cooldown() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    breaker.record_failure()
    assert not breaker.cooling  # closed still
    breaker.record_failure()
    assert breaker.state == "open" and breaker.cooling
    now[0] = 10.5
    assert not breaker.cooling  # the next request is the probe
