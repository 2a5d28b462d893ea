"""`embedding-worker evaluate` as a user runs it: its own embedded stack, the local model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import broker_kind
from tests.processes import cli
from worker.analysis import quality
from worker.config import ConfigError
from worker.tools.devstack import BROKER_ENV
from worker.tools.evaluate import Plan, Row, flagged_unknown, plan_classification, read_rows, split

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
# Neither sports nor cooking: the out-of-scope rows.
ELSEWHERE = [
    "The orchestra played a symphony by Beethoven to a full concert hall.",
    "Heavy rain and strong winds are expected along the coast tonight.",
    "The museum opened a new exhibition of medieval manuscripts.",
    "Parliament passed the new tax law after a long debate.",
    "The telescope photographed a distant galaxy and its planets.",
    "My laptop keeps crashing whenever I open the spreadsheet.",
]

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


def corpus(path: Path, elsewhere: bool = False) -> None:
    rows = [{"text": t.format(t=x), "label": "sports"} for t in SPORTS for x in TEAMS] + [
        {"text": t.format(t=x), "label": "cooking"} for t in COOKING for x in FOODS
    ]
    if elsewhere:
        rows += [{"text": t, "label": "other"} for t in ELSEWHERE]
    random.Random(3).shuffle(rows)
    write_jsonl(path, rows)


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
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
    rows = tmp_path / "rows.jsonl"
    code, out, err = await cli(
        *("evaluate", str(data), "--task", "anomaly", "--labels", str(config), "--json"),
        *("--rows", str(rows)),
        **BROKER,
    )
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert m["base_rate"] == round(2 / 152, 4)
    assert m["auroc"] >= 0.99 and m["pr_auc"] >= 0.9, m
    assert m["recall"] == 1.0, "both injected lines alert"
    scored = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [(x["line"], x["text"]) for x in scored] == [
        (i + 1, r["text"]) for i, r in enumerate(lines)
    ]
    assert sum(x["anomaly"] for x in scored) == m["alerts"]
    assert all(x["warm_up"] == (i < 50) for i, x in enumerate(scored))
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


@pytest.mark.devstack
async def test_train_file_shuffle_rows_and_out_of_scope_report(tmp_path: Path) -> None:
    """--train, --shuffle, --unknown-label and --rows in one run; every figure of the report
    is recomputed from the rows file, and the policy's `unknown` rule routes to review."""
    data, train, labels, out = (tmp_path / n for n in ("d.jsonl", "t.jsonl", "l.toml", "r.jsonl"))
    corpus(data, elsewhere=True)
    write_jsonl(
        train,
        [
            {"text": "The goalkeeper saved a penalty in the last minute.", "label": "sports"},
            {"text": "She won the tennis tournament after three sets.", "label": "sports"},
            {"text": "Knead the dough until smooth and let it rise.", "label": "cooking"},
            {"text": "Simmer the tomatoes with garlic for twenty minutes.", "label": "cooking"},
            {"text": "The striker scored twice before half-time.", "label": "sports"},
            {
                "text": "The marathon runners crossed the finish line in the rain.",
                "label": "sports",
            },
            {
                "text": "The cyclist took the yellow jersey on the mountain stage.",
                "label": "sports",
            },
            {"text": "Whisk the eggs with sugar until pale and fluffy.", "label": "cooking"},
            {"text": "Roast the vegetables in a hot oven for forty minutes.", "label": "cooking"},
            {"text": "Season the soup with salt, pepper and fresh herbs.", "label": "cooking"},
            {"text": "The stock market fell sharply this morning.", "label": "other"},
        ],
    )
    labels.write_text(
        LABELS.replace(
            "[namespaces.topics.classify]\n",
            "[namespaces.topics.classify]\n"
            'policy = [{ label = "unknown", min_score = 0.2, action = "review" }]\n',
        )
    )
    code, stdout, stderr = await cli(
        *("evaluate", str(data), "--labels", str(labels), "--train", str(train)),
        *("--shuffle", "7", "--unknown-label", "other", "--rows", str(out), "--json"),
        **BROKER,
    )
    assert code == 0, stderr
    report = json.loads(stdout)  # stdout is the report alone
    assert "46/46 events" in stderr, "progress goes to stderr with --json"
    # Every data row is a test row; the train file's `other` row is never an example.
    assert (report["rows"], report["test_rows"], report["examples"]) == (46, 46, 10)
    assert report["split"].startswith(f"10 examples from {train}, 46 test rows (6 of them")
    assert "shuffled with numpy default_rng(7)" in report["split"]

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    data_rows = read_rows(data)
    stream = [data_rows[int(i)] for i in np.random.default_rng(7).permutation(46)]
    assert [(x["line"], x["text"], x["label"]) for x in lines] == [
        (r.line, r.text, r.label) for r in stream
    ]
    for x in lines:
        assert set(x["probabilities"]) == {"sports", "cooking"}
        assert sum(x["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert x["predicted"] == max(x["probabilities"], key=x["probabilities"].get)
        assert 0.0 <= x["out_of_scope"] <= 1.0  # the head's rank among held-out examples
        assert x["in_scope"] == (x["label"] != "other")
        review = x["out_of_scope"] >= 0.2
        assert (x["action"], x["rule"]) == (
            ("review", "unknown>=0.2") if review else ("allow", None)
        )

    m = report["metrics"]
    known = [x for x in lines if x["in_scope"]]
    assert m["accuracy"] == round(
        quality.accuracy([x["label"] for x in known], [x["predicted"] for x in known]), 4
    )
    assert m["accuracy"] >= 0.9, m
    assert set(m["per_label"]) == {"sports", "cooking"}
    assert sum(s["support"] for s in m["per_label"].values()) == 40
    oos = m["out_of_scope"]
    truth = [not x["in_scope"] for x in lines]
    flagged = [flagged_unknown(x["rule"]) for x in lines]
    expected = quality.prf(truth, flagged)
    assert (oos["label"], oos["rows"], oos["in_scope_rows"]) == ("other", 6, 40)
    assert oos["auroc"] == round(quality.auroc(truth, [x["out_of_scope"] for x in lines]), 4)
    assert oos["policy"] == {
        "rules": ["unknown>=0.2:review"],
        "flagged": sum(flagged),
        "precision": round(expected.precision, 4),
        "recall": round(expected.recall, 4),
        "f1": round(expected.f1, 4),
    }
    assert m["actions"].get("review", 0) == sum(flagged)
    # And it tells something: the off-topic rows score higher than chance (USE, 5 examples per
    # label: AUROC 0.625, the energy rank is coarse with 10 held-out examples; the development
    # suite's out-of-scope protocol measures it properly, docs/analysis.md).
    assert oos["auroc"] > 0.5 and sum(flagged) >= 1, oos


def plan(
    rows: list[Row],
    shots: int,
    seed: int = 0,
    labels: Path | None = None,
    train: Path | None = None,
    unknown: str | None = None,
) -> Plan:
    return plan_classification(
        rows,
        shots=shots,
        seed=seed,
        labels_file=labels,
        namespace=None,
        train=train,
        unknown_label=unknown,
    )


def test_split_line_counts_the_label_files_examples(tmp_path: Path) -> None:
    rows = [Row(i, f"text {i}", "ab"[i % 2], i + 1) for i in range(10)]
    (tmp_path / "ex.jsonl").write_text(
        '{"text": "text 0", "label": "a"}\n{"text": "an example", "label": "b"}\n'
    )
    labels = tmp_path / "l.toml"
    labels.write_text(
        '[namespaces.x.classify]\nexamples_file = "ex.jsonl"\n'
        '[[namespaces.x.classify.labels]]\nname = "a"\ndescription = "A"\n'
        '[[namespaces.x.classify.labels]]\nname = "b"\ndescription = "B"\n'
    )
    got = plan(rows, 0, labels=labels)
    assert (got.examples, len(got.test)) == (2, 10)
    assert got.how == (
        f"2 examples in {labels}, 10 test rows; 1 of them with the text of an example"
    )
    got = plan(rows, 2, labels=labels)
    assert (got.examples, len(got.test)) == (6, 6)
    assert got.how.startswith(
        f"seed 0: 2 examples per label drawn with numpy default_rng(0) + "
        f"2 examples in {labels}, 6 test rows"
    )


def test_out_of_scope_rows_are_never_examples_nor_a_class(tmp_path: Path) -> None:
    rows = [Row(i, f"t{i}", "abz"[i % 3], i + 1) for i in range(30)]
    for seed in range(5):
        got = plan(rows, 3, seed=seed, unknown="z")
        assert got.spec.names == ["a", "b"]
        assert got.examples == 6
        assert sum(r.label == "z" for r in got.test) == 10
        assert "(10 of them out of scope, 'z')" in got.how
    # Rows named `unknown` need --unknown-label: the name is the policy's.
    named = [Row(r.index, r.text, r.label.replace("z", "unknown"), r.line) for r in rows]
    with pytest.raises(ConfigError, match="--unknown-label unknown"):
        plan(named, 3)


def test_train_file_draws_shots_from_itself_and_tests_every_row(tmp_path: Path) -> None:
    train = tmp_path / "t.jsonl"
    write_jsonl(train, [{"text": f"ex {i}", "label": "ab"[i % 2]} for i in range(12)])
    rows = [Row(i, f"t{i}", "ab"[i % 2], i + 1) for i in range(8)]
    got = plan(rows, 2, seed=3, train=train)
    assert (got.examples, len(got.test)) == (4, 8)
    assert got.how.startswith(
        f"seed 3: 2 examples per label drawn with numpy default_rng(3) from {train}, 8 test rows"
    )
    assert {e for label in got.spec.labels for e in label.examples} <= {
        f"ex {i}" for i in range(12)
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "2", "--positive", "spam"], "--positive 'spam' is not a label of"),
        (["--shots", "2", "--unknown-label", "oos"], "--unknown-label 'oos' is not a label of"),
        (["--task", "anomaly", "--normal", "ok"], "--normal 'ok' is not a label of"),
        (["--task", "anomaly", "--normal", "sports", "--positive", "x"], "for --task classify"),
        (["--shots", "2", "--rows", "/nonexistent/dir/rows.jsonl"], "--rows /nonexistent"),
    ],
)
async def test_options_naming_missing_labels_or_paths_exit_2_before_any_run(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    data = tmp_path / "topics.jsonl"
    corpus(data)
    code, out, err = await cli("evaluate", str(data), *extra)
    assert (code, out) == (2, ""), err
    assert message in err and "Traceback" not in err, err
    assert "/40 events" not in err, "refused before the stack started"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[namespaces.x.classify\n", "is not valid TOML"),
        ("[namespaces.x.classify]\nlabels = [{name = 'a'}, {name = 'b'}]\ntop = 1\n", "top"),
        (
            "[namespaces.x.classify]\nlabels = [{name = 'unknown'}, {name = 'b'}]\n",
            "'unknown' is reserved",
        ),
    ],
)
async def test_an_analysis_file_error_exits_2_with_its_own_message(
    tmp_path: Path, text: str, message: str
) -> None:
    data, labels = tmp_path / "topics.jsonl", tmp_path / "labels.toml"
    corpus(data)
    labels.write_text(text)
    code, _, err = await cli("evaluate", str(data), "--labels", str(labels))
    assert code == 2
    assert f"analysis file {labels}" in err and message in err, err
    assert "Traceback" not in err
