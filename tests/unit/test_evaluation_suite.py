"""The development suite's converters (evaluation/datasets.py) and baselines, on tiny
synthetic sources: no fetched data, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation import baselines, datasets
from worker.tools.evaluate import read_rows, split

INTENTS = [f"scen{i}_act{i}" for i in range(20)]
XSID_INTENTS = ["PlayMusic", "weather/find", "alarm/set_alarm", "alarm/snooze_alarm"]


def _hwu_csv(rows: list[tuple[str, str]]) -> bytes:
    lines = ["answerid;scenario;intent;answer_annotation;answer_from_anno;answer_from_user"]
    for i, (label, text) in enumerate(rows):
        scenario, intent = label.split("_")
        lines.append(f'{i};{scenario};{intent};"{text}";"{text}";"{text.upper()}"')
    return ("\n".join(lines) + "\n").encode()


def _conll(lang: str, split_name: str) -> bytes:
    out = []
    for i in range(60):
        # The rare intent (3 rows) is dropped; sentence 7 disagrees across languages.
        intent = XSID_INTENTS[3] if i < 3 else XSID_INTENTS[i % 3]
        if i == 7 and lang == "sr":
            intent = XSID_INTENTS[(i + 1) % 3]
        text = f"{lang} {split_name} utterance {i}"
        out += [f"# id = {i}", f"# text = {text}", f"# intent = {intent}", "1\tx\t_\tO", ""]
    return "\n".join(out).encode()


class FakeSources:
    """What the pinned commits hold, in miniature."""

    def __init__(self) -> None:
        base = datasets.HWU_DIR
        self.files: dict[tuple[str, str], bytes] = {}
        hwu = "xliuhw/NLU-Evaluation-Data"
        for n, label in enumerate(INTENTS):
            train = [(label, f"please do {label} number {i}") for i in range(30)]
            test = [(label, f"could you {label} now {i}") for i in range(5)]
            if n == 0:  # a text under two labels and a repeat: both handled
                train.append((label, "ambiguous request"))
                test.append((label, "PLEASE do  scen0_act0 number 1"))
            if n == 1:
                train.append((label, "ambiguous request"))
            self.files[(hwu, f"{base}/trainset/{label}.csv")] = _hwu_csv(train)
            self.files[(hwu, f"{base}/testset/csv/{label}.csv")] = _hwu_csv(test)
        self.files[(hwu, f"{base}/testset/text/ignored.csv")] = b"not;a;source\n"
        ethos = "comment;isHate\n" + "".join(
            f"comment number {i};{(i % 4) / 3:.4f}\n" for i in range(40)
        )
        self.files[("intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset", datasets.ETHOS_PATH)] = (
            ethos.encode()
        )
        for lang in datasets.XSID_LANGUAGES:
            for s in ("valid", "test"):
                self.files[("mainlp/xsid", f"{datasets.XSID_DIR}/{lang}.{s}.conll")] = _conll(
                    lang, s
                )

    def read(self, repo: str, path: str) -> bytes:
        return self.files[(repo, path)]

    def listing(self, repo: str, folder: str) -> list[str]:
        return [p for r, p in reversed(list(self.files)) if r == repo and p.startswith(folder)]


def _outputs() -> dict[str, list[datasets.Row]]:
    src = FakeSources()
    return {o.file: o.rows for o in datasets.convert(src.read, src.listing)}


def test_conversion_is_deterministic_and_shaped() -> None:
    first, second = _outputs(), _outputs()
    assert {k: datasets.jsonl(v) for k, v in first.items()} == {
        k: datasets.jsonl(v) for k, v in second.items()
    }
    hwu = first["hwu64.jsonl"]
    texts = [str(r["text"]) for r in hwu]
    assert "ambiguous request" not in texts  # under two labels: dropped
    assert len({" ".join(t.split()).casefold() for t in texts}) == len(texts)
    per_label = {label: sum(r["label"] == label for r in hwu) for label in INTENTS}
    assert set(per_label.values()) == {datasets.HWU_PER_INTENT}
    assert [r["label"] for r in hwu[:5]] != sorted(r["label"] for r in hwu[:5])  # shuffled

    known, protocol = first["hwu64_oos_known.jsonl"], first["hwu64_oos.jsonl"]
    unknown = datasets.unknown_intents(INTENTS)
    assert len(unknown) == datasets.HWU_UNKNOWN
    assert protocol[: len(known)] == known
    assert {r["intent"] for r in protocol[len(known) :]} == set(unknown)
    assert {r["label"] for r in protocol[len(known) :]} == {"oos"}
    assert not {r["label"] for r in known} & set(unknown)

    assert {r["label"] for r in first["ethos.jsonl"]} == {"hate", "not_hate"}
    xsid = first["xsid.jsonl"]
    assert "alarm/snooze_alarm" not in {r["label"] for r in xsid}  # too rare
    assert {r["lang"] for r in xsid} == set(datasets.XSID_LANGUAGES)
    assert not any(r["lang"] == "sr" and r["text"].endswith(" 7") for r in xsid)


def test_the_manifest_check_catches_a_changed_or_missing_file(tmp_path: Path) -> None:
    src = FakeSources()
    outputs = datasets.convert(src.read, src.listing)
    manifest = {"files": {o.file: datasets.manifest_entry(o) for o in outputs}}
    for o in outputs:
        (tmp_path / o.file).write_bytes(datasets.jsonl(o.rows))
    assert datasets.check(tmp_path, manifest) == []

    path = tmp_path / "ethos.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"hate"', b'"not_hate"', 1))
    (tmp_path / "xsid.jsonl").unlink()
    problems = datasets.check(tmp_path, manifest)
    assert len(problems) == 2
    assert "ethos.jsonl: SHA-256" in problems[0]
    assert "xsid.jsonl: missing" in problems[1]


def test_the_oos_protocol_draws_the_examples_evaluate_draws(tmp_path: Path) -> None:
    """Baselines on the protocol file and ``evaluate`` on the known file see the same split."""
    outputs = _outputs()
    for name in ("hwu64_oos_known.jsonl", "hwu64_oos.jsonl"):
        (tmp_path / name).write_bytes(datasets.jsonl(outputs[name]))
    known = read_rows(tmp_path / "hwu64_oos_known.jsonl")
    protocol = [r for r in read_rows(tmp_path / "hwu64_oos.jsonl") if r.label != "oos"]
    for seed in (0, 1):
        a, b = split(known, 10, seed)[0], split(protocol, 10, seed)[0]
        assert [r.text for r in a] == [r.text for r in b]


def test_baselines_on_separable_vectors() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    x = baselines.normalise(np.repeat(centres, 6, axis=0) + 0.05 * rng.normal(size=(18, 8)))
    labels = [name for name in "abc" for _ in range(6)]
    model, c = baselines.logistic_regression(x, labels, seed=0)
    assert list(model.predict(baselines.normalise(centres))) == ["a", "b", "c"]
    assert c > 0
    proto = baselines.centroids(x, labels, ["a", "b", "c"])
    assert np.allclose(np.linalg.norm(proto, axis=1), 1.0)
    assert list((baselines.normalise(centres) @ proto.T).argmax(axis=1)) == [0, 1, 2]


def test_the_manifest_in_the_repo_lists_every_suite_file() -> None:
    manifest = json.loads(datasets.MANIFEST.read_text())
    files = {s.file for s in datasets.SUITE} | {s.protocol for s in datasets.SUITE if s.protocol}
    assert files <= set(manifest["files"])
    assert set(manifest["sources"]) == set(datasets.SOURCES)
    for entry in datasets.SUITE:
        assert (datasets.HERE / entry.labels).is_file()


@pytest.mark.parametrize("entry", datasets.SUITE, ids=lambda e: e.name)
def test_each_suite_config_names_exactly_the_sets_labels(entry: datasets.SuiteSet) -> None:
    manifest = json.loads(datasets.MANIFEST.read_text())
    spec = baselines._label_set(datasets.HERE / entry.labels, None)
    assert set(spec.names) == set(manifest["files"][entry.file]["labels"])
