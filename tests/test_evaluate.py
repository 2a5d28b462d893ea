"""`embedding-worker evaluate` as a user runs it: its own embedded stack, the local model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import broker_kind
from tests.processes import cli
from worker.config import ConfigError
from worker.devstack import BROKER_ENV
from worker.evaluate import Row, read_rows, split

SPORTS = [
    "The {t} won the final after a late goal in extra time.",
    "Our {t} lost the match but the coach praised the players.",
    "The {t} signed a new striker before the season opener.",
    "Fans cheered as the {t} lifted the championship trophy.",
]
COOKING = [
    "Add the {t} to the pan and simmer the sauce for ten minutes.",
    "Bake the {t} at two hundred degrees until golden brown.",
    "Chop the {t} finely and stir it into the soup before serving.",
    "This recipe for {t} needs butter, flour and fresh herbs.",
]
TEAMS = ["city club", "home side", "national team", "visitors", "young squad"]
FOODS = ["onions", "bread", "chicken", "mushrooms", "apple pie"]

LABELS = """
[namespaces.topics.classify]
[[namespaces.topics.classify.labels]]
name = "sports"
description = "Sports: teams, matches, goals, players and championships."
[[namespaces.topics.classify.labels]]
name = "cooking"
description = "Cooking: recipes, ingredients, kitchens, baking and meals."
"""


# `evaluate` starts its own stack: on the broker the suite runs on.
BROKER = {BROKER_ENV: broker_kind()}


def corpus(path: Path) -> None:
    rows = [{"text": t.format(t=x), "label": "sports"} for t in SPORTS for x in TEAMS] + [
        {"text": t.format(t=x), "label": "cooking"} for t in COOKING for x in FOODS
    ]
    random.Random(3).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.devstack
async def test_classification_report_is_accurate_and_deterministic(tmp_path: Path) -> None:
    data, labels = tmp_path / "topics.jsonl", tmp_path / "labels.toml"
    corpus(data)
    labels.write_text(LABELS)
    args = ("evaluate", str(data), "--labels", str(labels), "--shots", "4", "--json")
    code, out, err = await cli(*args, **BROKER)
    assert code == 0, err
    report = json.loads(out)
    assert report["rows"] == 40 and report["task"] == "classify"
    assert report["split"].startswith("seed 0: 4 examples per label")
    assert "32 test rows" in report["split"]
    m = report["metrics"]
    assert m["accuracy"] >= 0.9, m
    assert sum(s["support"] for s in m["per_label"].values()) == 32
    code, again, _ = await cli(*args, **BROKER)
    assert code == 0
    first, second = json.loads(again)["metrics"], m
    assert first == second, "same file and seed, same report"


@pytest.mark.devstack
async def test_anomaly_report_ranks_injected_off_topic_lines_first(tmp_path: Path) -> None:
    rng = random.Random(5)
    lines = [
        {
            "text": f"user {rng.randint(1, 99)} logged in from 10.0.0.{rng.randint(1, 254)}",
            "label": "normal",
        }
        for _ in range(150)
    ]
    odd = [
        "The violin concerto moved the whole audience to tears.",
        "Fresh basil and tomatoes make the best summer salad.",
    ]
    for i, text in enumerate(odd):
        lines.insert(120 + 15 * i, {"text": text, "label": "alert"})
    data = tmp_path / "log.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = tmp_path / "a.toml"
    config.write_text("[namespaces.log.anomaly]\nwarm_up = 50\nhorizon = 10\nneighbours = 5\n")
    code, out, err = await cli(
        "evaluate", str(data), "--task", "anomaly", "--labels", str(config), "--json", **BROKER
    )
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert m["base_rate"] == round(2 / 152, 4)
    assert m["auroc"] >= 0.99 and m["pr_auc"] >= 0.9, m
    assert m["recall"] == 1.0, "both injected lines alert"
    # 15 lines apart: one true incident (gap 50), found by an incident the worker sent.
    i = m["incidents"]
    assert i["gap"] == 50 and i["worker"]["true_incidents"] == 1
    assert i["worker"]["found"] == 1 and i["worker"]["median_delay_lines"] == 0.0, i
    assert i["worker"]["incidents"] >= 1 and i["fixed_quantile"]["true_incidents"] == 1


async def test_zero_shot_without_descriptions_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "topics.jsonl"
    corpus(data)
    code, _, err = await cli("evaluate", str(data))
    assert code == 2
    assert "--labels" in err


def test_split_is_stratified_seeded_and_keeps_file_order() -> None:
    rows = [Row(i, f"t{i}", "ab"[i % 2]) for i in range(20)]
    examples, test = split(rows, 3, seed=0)
    assert sorted(r.label for r in examples) == ["a"] * 3 + ["b"] * 3
    assert [r.index for r in test] == sorted(r.index for r in test)
    assert {r.index for r in examples} | {r.index for r in test} == set(range(20))
    again, _ = split(rows, 3, seed=0)
    other, _ = split(rows, 3, seed=1)
    assert again == examples and other != examples
    # The draw is numpy's: for each label in sorted order, rng.choice over its rows.
    rng = np.random.default_rng(0)
    expected = {
        int(i) for i in rng.choice([r.index for r in rows if r.label == "a"], 3, replace=False)
    }
    assert expected <= {r.index for r in examples}


def test_read_rows_dedupes_and_refuses_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"text": "a", "label": "x"}\n{"text": "a", "label": "x"}\n{"text": " ", "label": "y"}\n'
    )
    assert len(read_rows(path)) == 2
    assert [r.text for r in read_rows(path, dedupe=True)] == ["a"]
    path.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r"x\.jsonl:1"):
        read_rows(path)
