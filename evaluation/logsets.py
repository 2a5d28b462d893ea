"""Labeled log streams for ``evaluate --task anomaly`` beside BGL, from loghub's 2k samples.

Issue 13 asks for incident-level figures on more than one labeled log. Among loghub's 2k
samples only BGL carries per-line labels (Thunderbird_2k's alert tags are all ``-``), so
the second family is built by injection, as the label-free check of docs/analysis.md did:
a real stream of one system (every line normal by its own tags) with bursts of another
system's consecutive lines injected, each burst interleaved with 0-2 base lines, at seeded
positions after the warm-up. An injected burst is a new *kind* of content arriving as a run,
which is what an operator's incident is; its lines are labeled ``anomaly``. The ground truth
is exact, the content real; what it cannot measure is the focus (nothing reads like a
failure).

Read from a pinned commit of ``logpai/loghub`` (its licence: free for research, cite the
repository), written outside the repository (``$EMBEDDING_WORKER_EVAL_DATA``, default
``../evaluation-data``), checksums in ``evaluation/logsets.json``:

    python -m evaluation.logsets build      # convert, check against logsets.json
    python -m evaluation.logsets check
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.datasets import check, data_dir, jsonl, sha256

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "logsets.json"
REPO = "logpai/loghub"
COMMIT = "dd61d0952749ee7963bde24220d1be5ede023033"
LICENCE = "loghub licence: free for research or academic work, citing the repository"
SEED = 13
BURSTS = 6  # injected incidents per stream
BURST_LINES = 12  # lines per incident
MAX_INTERLEAVE = 2  # base lines between two injected lines of a burst (0..2)
FIRST = 200  # no injection before this line (after the default 100-line warm-up)
SPACING = 150  # minimum base lines between two bursts

Row = dict[str, Any]


@dataclass(frozen=True)
class Stream:
    file: str
    base: str  # loghub folder of the base system
    injected: str  # loghub folder of the injected system


STREAMS = [
    Stream("thunderbird_hdfs.jsonl", "Thunderbird", "HDFS"),
    Stream("hdfs_thunderbird.jsonl", "HDFS", "Thunderbird"),
    Stream("linux_openssh.jsonl", "Linux", "OpenSSH"),
]


def contents(data: bytes) -> list[str]:
    """The ``Content`` column of a loghub structured CSV, in line order."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
    return [r["Content"].strip() for r in reader if r["Content"].strip()]


def inject(base: list[str], other: list[str], seed: int) -> list[Row]:
    """``base`` with BURSTS runs of BURST_LINES consecutive ``other`` lines woven in."""
    rng = np.random.default_rng(seed)
    slots = len(base) - FIRST - SPACING * BURSTS
    offsets = np.sort(rng.choice(slots, size=BURSTS, replace=False))
    at = [FIRST + int(o) + SPACING * k for k, o in enumerate(offsets)]
    starts = rng.choice(len(other) - BURST_LINES, size=BURSTS, replace=False)
    rows: list[Row] = []
    b = 0
    for k, position in enumerate(at):
        rows += [{"text": t, "label": "normal"} for t in base[b:position]]
        b = position
        for j, line in enumerate(other[int(starts[k]) : int(starts[k]) + BURST_LINES]):
            if j:
                gap = int(rng.integers(0, MAX_INTERLEAVE + 1))
                rows += [{"text": t, "label": "normal"} for t in base[b : b + gap]]
                b += gap
            rows.append({"text": line, "label": "anomaly", "incident": k})
    rows += [{"text": t, "label": "normal"} for t in base[b:]]
    return rows


def convert(read: Any) -> dict[str, tuple[list[Row], list[str]]]:
    out: dict[str, tuple[list[Row], list[str]]] = {}
    for s in STREAMS:
        paths = [f"{name}/{name}_2k.log_structured.csv" for name in (s.base, s.injected)]
        base, other = (contents(read(p)) for p in paths)
        out[s.file] = (inject(base, other, SEED), [f"{REPO}@{COMMIT}:{p}" for p in paths])
    return out


def git_reader(where: Path) -> Any:
    def read(path: str) -> bytes:
        result = subprocess.run(
            ["git", "-C", str(where), "show", f"{COMMIT}:{path}"], capture_output=True
        )
        if result.returncode != 0:
            raise SystemExit(
                f"cannot read {REPO} at {where}: {result.stderr.decode().strip()}\n"
                f"clone https://github.com/{REPO} and pass --repo PATH"
            )
        return result.stdout

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.logsets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["build", "check"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--repo", type=Path, default=Path("/work/.mirror") / REPO.replace("/", "+") / "repo"
    )
    parser.add_argument("--update-manifest", action="store_true")
    args = parser.parse_args(argv)
    out_dir: Path = args.out or data_dir()
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"files": {}}
    if args.action == "build":
        out_dir.mkdir(parents=True, exist_ok=True)
        converted = convert(git_reader(args.repo))
        for name, (rows, _) in converted.items():
            (out_dir / name).write_bytes(jsonl(rows))
            print(f"{out_dir / name}: {len(rows)} rows")
        if args.update_manifest:
            manifest = {
                "sources": {
                    REPO: {
                        "commit": COMMIT,
                        "licence": LICENCE,
                        "url": f"https://github.com/{REPO}",
                    }
                },
                "files": {
                    name: {
                        "sha256": sha256(jsonl(rows)),
                        "rows": len(rows),
                        "anomalies": sum(r["label"] == "anomaly" for r in rows),
                        "sources": sources,
                    }
                    for name, (rows, sources) in converted.items()
                },
            }
            MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    problems = check(out_dir, manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{len(manifest['files'])} files match {MANIFEST.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
