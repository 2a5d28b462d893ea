"""The development suite: public labeled sets converted to the JSONL ``evaluate`` reads.

Issue 13: the defaults were chosen on three sets; this widens the suite. Each set is read
from a pinned commit of a public GitHub repository, converted deterministically (sorted
input, seeded draws, no clock, no dict-order dependence) and written OUTSIDE the repository
(``$EMBEDDING_WORKER_EVAL_DATA``, default ``../evaluation-data`` beside the checkout); the
SHA-256 of every output is recorded in ``evaluation/manifest.json`` and checked, so a
figure in docs/analysis.md names exactly the rows it was measured on.

The sources are read with ``git show COMMIT:PATH`` from a local copy of each repository,
bare or not: by default the ``fetch`` mirrors on the development machine
(``/work/.mirror/OWNER+NAME/repo``). Elsewhere, clone ``https://github.com/OWNER/NAME``
(the commit is in SOURCES) and pass ``--repo OWNER/NAME=PATH``; the outputs are the same.

    python -m evaluation.datasets build            # convert every set, check the manifest
    python -m evaluation.datasets check            # only check the files already there
    python -m evaluation.datasets build --update-manifest   # after changing a converter
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
Row = dict[str, Any]
Read = Callable[[str, str], bytes]
"""(repository, path) -> the file's bytes at the pinned commit."""


@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    licence: str


SOURCES = {
    "xliuhw/NLU-Evaluation-Data": Source(
        "xliuhw/NLU-Evaluation-Data", "f6071b496b17d71e6eb43f543af0707f4ff30557", "CC-BY-4.0"
    ),
    "intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset": Source(
        "intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset",
        "705258e118ce9611ebbd5ab2a4841b0066547293",
        "GPL-3.0",
    ),
    "mainlp/xsid": Source(
        "mainlp/xsid", "761d926c3f2e9f6bea13192d2f39cec1d04d9777", "CC-BY-SA-4.0"
    ),
}

# HWU64 (Liu et al., IWSDS 2019): the 64 intents' rows of the authors' first cross-validation
# fold (train and test files together; the full annotated CSV is over the mirror's size cap).
HWU_DIR = (
    "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation/KFold_1"
)
HWU_PER_INTENT = 30  # rows drawn per intent: 10 examples + 20 test rows at --shots 10
HWU_UNKNOWN = 16  # intents held out as unknown in the out-of-scope protocol
ETHOS_PATH = "ethos/ethos_data/Ethos_Dataset_Binary.csv"
XSID_DIR = "data/xSID-0.7"
# Natural orthography only (xSID's ja is word-segmented with spaces); one language per
# utterance, so no test row has its translation among the examples.
XSID_LANGUAGES = ("ar", "da", "de", "id", "it", "kk", "nl", "sr", "tr", "zh")
XSID_MIN_ROWS = 20  # intents rarer than this (snooze, time left, modify alarm) are dropped
SEED = 13


def _shuffled(rows: list[Row], seed: int) -> list[Row]:
    """A fixed order that is not grouped by label (the worker self-trains on the stream)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[int(i)] for i in order]


def _csv(data: bytes, delimiter: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=delimiter))


def _unambiguous(rows: Iterable[Row]) -> list[Row]:
    """The first of equal texts (whitespace and case folded); texts under two labels dropped."""
    labels: dict[str, set[str]] = defaultdict(set)
    first: dict[str, Row] = {}
    for row in rows:
        key = " ".join(row["text"].split()).casefold()
        labels[key].add(row["label"])
        first.setdefault(key, row)
    return [row for key, row in first.items() if len(labels[key]) == 1]


def hwu64_pool(read: Read, listing: Callable[[str, str], list[str]]) -> list[Row]:
    """Every HWU64 row of the fold, deduplicated, sorted by label and text."""
    repo = "xliuhw/NLU-Evaluation-Data"
    paths = sorted(
        p
        for p in listing(repo, HWU_DIR)
        if p.endswith(".csv") and ("/trainset/" in p or "/testset/csv/" in p)
    )
    rows: list[Row] = []
    for path in paths:
        for r in _csv(read(repo, path), ";"):
            text = (r.get("answer_from_anno") or "").strip()
            if text:
                label = f"{r['scenario']}_{r['intent']}"
                rows.append({"text": text, "label": label})
    rows.sort(key=lambda r: (r["label"], r["text"]))
    return _unambiguous(rows)


def hwu64_sample(pool: list[Row]) -> list[Row]:
    """HWU_PER_INTENT rows of each intent, drawn with the seed, in a shuffled order."""
    rng = np.random.default_rng(SEED)
    by_label: dict[str, list[Row]] = defaultdict(list)
    for row in pool:
        by_label[row["label"]].append(row)
    out: list[Row] = []
    for label in sorted(by_label):
        members = by_label[label]
        take = min(HWU_PER_INTENT, len(members))
        out += [members[int(i)] for i in sorted(rng.choice(len(members), take, replace=False))]
    return _shuffled(out, SEED)


def unknown_intents(labels: Iterable[str]) -> list[str]:
    """The intents the out-of-scope protocol holds out: HWU_UNKNOWN drawn with the seed."""
    names = sorted(set(labels))
    rng = np.random.default_rng(SEED + 1)
    return sorted(names[int(i)] for i in rng.choice(len(names), HWU_UNKNOWN, replace=False))


def hwu64_oos(sample: list[Row]) -> tuple[list[Row], list[Row]]:
    """(known rows, known rows then the held-out intents' rows labeled ``oos``).

    The first file is what ``evaluate`` classifies (the known intents only); the second is
    the protocol: the same known rows, hence the same examples at the same seed, then every
    row of the unknown intents as a test row whose right answer is "none of these".
    """
    unknown = set(unknown_intents(r["label"] for r in sample))
    known = [r for r in sample if r["label"] not in unknown]
    oos = [{**r, "label": "oos", "intent": r["label"]} for r in sample if r["label"] in unknown]
    return known, known + oos


def ethos(read: Read) -> list[Row]:
    """ETHOS binary: ``isHate`` is the share of annotators who judged the comment hateful."""
    data = read("intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset", ETHOS_PATH)
    rows = [
        {
            "text": r["comment"].strip(),
            "label": "hate" if float(r["isHate"]) >= 0.5 else "not_hate",
            "is_hate": float(r["isHate"]),
        }
        for r in _csv(data, ";")
        if r["comment"].strip()
    ]
    return _shuffled(_unambiguous(rows), SEED)


def _conll_sentences(data: bytes) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in [*data.decode("utf-8").splitlines(), ""]:
        if line.startswith("# ") and " = " in line:
            key, value = line[2:].split(" = ", 1)
            current[key.strip()] = value.strip()
        elif not line.strip() and current:
            out.append(current)
            current = {}
    return out


def xsid(read: Read) -> list[Row]:
    """xSID 0.7 valid + test, each utterance in one of XSID_LANGUAGES drawn with the seed."""
    by_language = {
        (lang, split): _conll_sentences(read("mainlp/xsid", f"{XSID_DIR}/{lang}.{split}.conll"))
        for lang in XSID_LANGUAGES
        for split in ("valid", "test")
    }
    ids = [
        (split, s["id"], s["intent"])
        for split in ("valid", "test")
        for s in by_language[(XSID_LANGUAGES[0], split)]
    ]
    counts = Counter(intent for _, _, intent in ids)
    order = np.random.default_rng(SEED).permutation(len(ids))
    rows: list[Row] = []
    for position, i in enumerate(order):
        split, sid, intent = ids[int(i)]
        if counts[intent] < XSID_MIN_ROWS:
            continue
        lang = XSID_LANGUAGES[position % len(XSID_LANGUAGES)]
        sentence = next(s for s in by_language[(lang, split)] if s["id"] == sid)
        if sentence["intent"] != intent:
            continue  # the translations disagree on the intent: left out
        rows.append({"text": sentence["text"], "label": intent, "lang": lang, "split": split})
    return _unambiguous(rows)


@dataclass(frozen=True)
class SuiteSet:
    """How a set is measured: ``evaluate`` on ``file``, the baselines on ``protocol``."""

    name: str
    file: str
    labels: str  # the evaluate config in evaluation/
    shots: int
    positive: str | None = None
    protocol: str | None = None  # the out-of-scope protocol's file (default: ``file``)


SUITE = (
    SuiteSet("hwu64", "hwu64.jsonl", "hwu64.toml", 10),
    SuiteSet("hwu64_oos", "hwu64_oos_known.jsonl", "hwu64_oos.toml", 10, None, "hwu64_oos.jsonl"),
    SuiteSet("ethos", "ethos.jsonl", "ethos.toml", 32, "hate"),
    SuiteSet("xsid", "xsid.jsonl", "xsid.toml", 8),
)


@dataclass(frozen=True)
class Output:
    file: str
    rows: list[Row]
    sources: list[str]  # "repo@commit:path" (or a folder)


def convert(read: Read, listing: Callable[[str, str], list[str]]) -> list[Output]:
    def src(repo: str, path: str) -> str:
        return f"{repo}@{SOURCES[repo].commit}:{path}"

    hwu = hwu64_sample(hwu64_pool(read, listing))
    known, protocol = hwu64_oos(hwu)
    hwu_src = [src("xliuhw/NLU-Evaluation-Data", f"{HWU_DIR}/{{trainset,testset/csv}}/*.csv")]
    xsid_src = [
        src("mainlp/xsid", f"{XSID_DIR}/{{{','.join(XSID_LANGUAGES)}}}.{{valid,test}}.conll")
    ]
    return [
        Output("hwu64.jsonl", hwu, hwu_src),
        Output("hwu64_oos_known.jsonl", known, hwu_src),
        Output("hwu64_oos.jsonl", protocol, hwu_src),
        Output(
            "ethos.jsonl",
            ethos(read),
            [src("intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset", ETHOS_PATH)],
        ),
        Output("xsid.jsonl", xsid(read), xsid_src),
    ]


def jsonl(rows: list[Row]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_entry(out: Output) -> dict[str, Any]:
    data = jsonl(out.rows)
    return {
        "sha256": sha256(data),
        "rows": len(out.rows),
        "labels": dict(sorted(Counter(r["label"] for r in out.rows).items())),
        "sources": out.sources,
    }


def check(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the files in ``directory`` against the manifest (empty: all match)."""
    problems = []
    for name, entry in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing (run `python -m evaluation.datasets build`)")
        elif (digest := sha256(path.read_bytes())) != entry["sha256"]:
            problems.append(f"{path}: SHA-256 {digest}, the manifest says {entry['sha256']}")
    return problems


def data_dir() -> Path:
    raw = os.environ.get("EMBEDDING_WORKER_EVAL_DATA")
    return Path(raw) if raw else HERE.parent.parent / "evaluation-data"


class GitSources:
    """Files of the pinned commits, from local git copies (bare mirrors or clones)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def _git(self, repo: str, *args: str) -> bytes:
        where = self.paths.get(repo) or Path("/work/.mirror") / repo.replace("/", "+") / "repo"
        result = subprocess.run(["git", "-C", str(where), *args], capture_output=True)
        if result.returncode != 0:
            raise SystemExit(
                f"cannot read {repo} at {where}: {result.stderr.decode().strip()}\n"
                f"clone https://github.com/{repo} and pass --repo {repo}=PATH"
            )
        return result.stdout

    def read(self, repo: str, path: str) -> bytes:
        return self._git(repo, "show", f"{SOURCES[repo].commit}:{path}")

    def listing(self, repo: str, folder: str) -> list[str]:
        out = self._git(repo, "ls-tree", "-r", "--name-only", SOURCES[repo].commit, folder)
        return out.decode().splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["build", "check"])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: $EMBEDDING_WORKER_EVAL_DATA or ../evaluation-data",
    )
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="OWNER/NAME=PATH",
        help="a local git copy of a source repository (default: the fetch mirror)",
    )
    parser.add_argument("--update-manifest", action="store_true")
    args = parser.parse_args(argv)
    out_dir: Path = args.out or data_dir()
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"files": {}}
    if args.action == "build":
        paths = dict(item.split("=", 1) for item in args.repo)
        git = GitSources({k: Path(v) for k, v in paths.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = convert(git.read, git.listing)
        for out in outputs:
            (out_dir / out.file).write_bytes(jsonl(out.rows))
            print(f"{out_dir / out.file}: {len(out.rows)} rows")
        if args.update_manifest:
            manifest = {
                "sources": {
                    k: {"commit": s.commit, "licence": s.licence, "url": f"https://github.com/{k}"}
                    for k, s in SOURCES.items()
                },
                "files": {out.file: manifest_entry(out) for out in outputs},
            }
            MANIFEST.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    problems = check(out_dir, manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{len(manifest['files'])} files match {MANIFEST.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
