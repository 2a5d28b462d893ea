"""User profiles as pure functions: the decay and ordering math, and reading interactions."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from worker.config import ConfigError, load_settings
from worker.events import DeadLetter
from worker.model import Record
from worker.side import profiles
from worker.side.profiles import Interaction, Profile, add, decay

DAY = 24 * 3600.0
WEEK = 7 * DAY
T0 = datetime(2026, 5, 1, tzinfo=UTC)
X = np.array([1.0, 0.0, 0.0])
Y = np.array([0.0, 1.0, 0.0])
Z = np.array([0.0, 0.0, 1.0])


def test_a_weight_halves_every_half_life() -> None:
    assert decay(0, WEEK) == 1.0
    assert decay(WEEK, WEEK) == 0.5
    assert decay(2 * WEEK, WEEK) == 0.25
    assert decay(WEEK / 2, WEEK) == pytest.approx(2**-0.5)


def test_two_interactions_one_half_life_apart_weigh_half_and_one() -> None:
    first = add(None, X, 1.0, T0, WEEK)
    second = add(first, Y, 1.0, T0 + timedelta(seconds=WEEK), WEEK)
    assert second.weight == pytest.approx(1.5)
    assert second.time == T0 + timedelta(seconds=WEEK)
    assert second.interactions == 2
    np.testing.assert_allclose(second.mean, [0.5 / 1.5, 1 / 1.5, 0.0])


def test_weights_scale_each_interaction() -> None:
    profile = add(add(None, X, 3.0, T0, WEEK), Y, 1.0, T0, WEEK)  # the same time: no decay
    assert profile.weight == pytest.approx(4.0)
    np.testing.assert_allclose(profile.mean, [0.75, 0.25, 0.0])


def test_an_older_interaction_is_decayed_and_the_profile_keeps_its_time() -> None:
    later = add(None, Y, 1.0, T0 + timedelta(seconds=WEEK), WEEK)
    profile = add(later, X, 1.0, T0, WEEK)
    assert profile.time == T0 + timedelta(seconds=WEEK)
    assert profile.weight == pytest.approx(1.5)
    np.testing.assert_allclose(profile.mean, [0.5 / 1.5, 1 / 1.5, 0.0])


def test_the_profile_does_not_depend_on_the_order_interactions_arrive_in() -> None:
    events = [
        (X, 1.0, T0),
        (Y, 2.0, T0 + timedelta(days=3)),
        (Z, 0.5, T0 + timedelta(days=10)),
        (X, 1.5, T0 + timedelta(days=1)),
    ]
    results: list[Profile] = []
    for order in itertools.permutations(events):
        profile: Profile | None = None
        for vector, weight, time in order:
            profile = add(profile, vector, weight, time, WEEK)
        assert profile is not None
        results.append(profile)
    latest = T0 + timedelta(days=10)
    expected_weight = sum(w * 0.5 ** ((latest - t).total_seconds() / WEEK) for _, w, t in events)
    expected_mean = (
        sum(v * w * 0.5 ** ((latest - t).total_seconds() / WEEK) for v, w, t in events)
        / expected_weight
    )
    for p in results:
        assert p.time == latest
        assert p.interactions == 4
        assert p.weight == pytest.approx(expected_weight)
        np.testing.assert_allclose(p.mean, expected_mean)


def test_a_long_silence_leaves_the_latest_interaction_almost_alone() -> None:
    old = add(None, X, 1.0, T0, WEEK)
    profile = add(old, Y, 1.0, T0 + timedelta(weeks=10), WEEK)
    assert profile.weight == pytest.approx(1 + 2**-10)
    assert profile.mean[1] == pytest.approx(1 / (1 + 2**-10))


def test_unit_scales_and_refuses_zero() -> None:
    np.testing.assert_allclose(profiles.unit(np.array([3.0, 4.0])), [0.6, 0.8])  # type: ignore[arg-type]
    assert profiles.unit(np.zeros(3)) is None


# ---- reading interactions ---------------------------------------------------------------

NOW_MS = int(datetime.now(UTC).timestamp() * 1000)


def parse(value: bytes | dict[str, Any] | None) -> Interaction | DeadLetter:
    raw = json.dumps(value).encode() if isinstance(value, dict) else value
    record = Record("interactions", 0, 7, b"u", raw, timestamp_ms=NOW_MS)
    return profiles.parse(record, "shop", 300.0, 100_000)


def reason(value: bytes | dict[str, Any] | None) -> str:
    out = parse(value)
    assert isinstance(out, DeadLetter), out
    return out.reason.value


def test_an_interaction_defaults_its_weight_namespace_and_time() -> None:
    out = parse({"user": "u-1", "item": "i-1"})
    assert isinstance(out, Interaction)
    assert (out.namespace, out.user, out.item, out.weight) == ("shop", "u-1", "i-1", 1.0)
    assert out.time == datetime.fromtimestamp(NOW_MS / 1000, tz=UTC)


def test_an_interaction_takes_its_own_time_as_iso_or_epoch_ms() -> None:
    iso = parse({"user": "u", "item": "i", "time": "2026-05-01T00:00:00+02:00", "weight": 2})
    assert isinstance(iso, Interaction)
    assert iso.time == datetime(2026, 4, 30, 22, tzinfo=UTC)
    assert iso.weight == 2.0
    epoch = parse({"user": "u", "item": "i", "time": 1_000, "namespace": "n"})
    assert isinstance(epoch, Interaction)
    assert epoch.time == datetime.fromtimestamp(1, tz=UTC)
    assert epoch.namespace == "n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "schema_violation"),
        (b"{not json", "invalid_json"),
        (b"[1]", "schema_violation"),
        ({"item": "i"}, "schema_violation"),
        ({"user": "u"}, "schema_violation"),
        ({"user": 5, "item": "i"}, "schema_violation"),
        ({"user": "u", "item": ""}, "schema_violation"),
        ({"user": "", "item": "i"}, "schema_violation"),
        ({"user": "u", "item": "i", "weight": "2"}, "schema_violation"),
        ({"user": "u", "item": "i", "weight": True}, "schema_violation"),
        ({"user": "u", "item": "i", "weight": 0}, "schema_violation"),
        ({"user": "u", "item": "i", "weight": -1.5}, "schema_violation"),
        (b'{"user": "u", "item": "i", "weight": NaN}', "invalid_json"),
        (b'{"user": "u", "item": "i", "weight": 1e400}', "invalid_json"),
        ({"user": "u", "item": "i", "time": "yesterday"}, "schema_violation"),
        ({"user": "u", "item": "i", "time": "2026-05-01T00:00:00"}, "schema_violation"),
        ({"user": "u", "item": "i", "time": "2999-01-01T00:00:00Z"}, "timestamp_out_of_range"),
    ],
)
def test_a_bad_interaction_is_a_dead_letter_with_its_reason(
    value: bytes | dict[str, Any] | None, expected: str
) -> None:
    assert reason(value) == expected


def test_a_bad_weight_names_the_item_in_its_letter() -> None:
    out = parse({"user": "u", "item": "i-9", "weight": -1})
    assert isinstance(out, DeadLetter)
    assert (out.namespace, out.id) == ("shop", "i-9")
    assert "positive" in out.message


def test_the_interactions_topic_must_differ_from_the_others() -> None:
    with pytest.raises(ConfigError, match=r"recommend\.interactions_topic must differ"):
        load_settings(
            provider={"kind": "local"},
            kafka={"input_topic": "a", "dlq_topic": "b"},
            recommend={"interactions_topic": "b"},
        )
    with pytest.raises(ConfigError, match="half_life_s"):
        load_settings(provider={"kind": "local"}, recommend={"half_life_s": 0})
