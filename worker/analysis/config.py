"""The analysis file: per namespace, a label set (classification + moderation) and anomaly rules.

It is a separate TOML file (``analysis.file``) because label sets are data that product
people edit and review, not deployment settings. Example texts may live inline or in a JSONL
file (``{"text": ..., "label": ...}`` per line) next to it.
"""

from __future__ import annotations

import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.events import TextType


class Action(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    BLOCK = "block"


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    # Several phrasings are averaged into one label vector (a prompt ensemble).
    descriptions: list[str] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_description(cls, data: object) -> object:
        if isinstance(data, dict) and "description" in data:
            data = dict(data)
            one = data.pop("description")
            data["descriptions"] = [one, *data.get("descriptions", [])]
        return data


# The policy's name for "none of these labels": a rule on it compares the result's
# ``out_of_scope`` score with its ``min_score``. No label set may define it.
UNKNOWN = "unknown"


class Rule(BaseModel):
    """Moderation: when ``label``'s probability (for ``unknown``, the out-of-scope score) is
    at least ``min_score``, take ``action``."""

    model_config = ConfigDict(extra="forbid")

    label: str
    min_score: float = Field(ge=0.0, le=1.0)
    action: Literal[Action.REVIEW, Action.BLOCK]


class Classification(BaseModel):
    """Defaults are the ones measured in docs/analysis.md (chosen without test labels)."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Label] = Field(min_length=2)
    # JSONL of {"text", "label"}; relative paths are relative to the analysis file.
    examples_file: Path | None = None
    top_k: int = Field(default=3, ge=1)
    # Scores are divided by this before the softmax that gives the probabilities.
    temperature: float = Field(default=0.1, gt=0)
    # Weight of the similarity to the label descriptions (zero-shot) next to the prototypes.
    description_weight: float = Field(default=1.0, ge=0.0)
    # Few-shot vote: the k nearest labeled vectors (examples, and past events with the label
    # they were given), each weighing exp(similarity / vote_temperature); 0 turns it off.
    neighbours: int = Field(default=10, ge=0)
    vote_temperature: float = Field(default=0.05, gt=0)
    vote_weight: float = Field(default=1.0, ge=0.0)
    # Self-training: every classified event joins its label's prototype (and the vote); a
    # prototype counts once it has this many members (examples included).
    adapt: bool = True
    min_members: int = Field(default=5, ge=1)
    # How label descriptions are embedded; e5 and DashScope (with `instruct`) treat
    # "query" texts differently from the "document" texts they are compared with.
    description_type: TextType = TextType.QUERY
    policy: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Classification:
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("label names must be unique")
        if UNKNOWN in names:
            raise ValueError(
                f"{UNKNOWN!r} is reserved (a policy rule on it acts on the out-of-scope "
                "score); name the label otherwise"
            )
        for rule in self.policy:
            if rule.label not in names and rule.label != UNKNOWN:
                raise ValueError(
                    f"policy rule names {rule.label!r}, which is neither a label of the set "
                    f"nor {UNKNOWN!r}"
                )
        return self

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]


class Focus(BaseModel):
    """What the operator wants alerted, as a zero-shot contrast with routine content.

    Novelty alone cannot tell a new kind of failure from a new kind of routine chatter
    (a register dump, a status line): the score is weighed by the probability that the
    event reads like ``alert`` rather than ``routine``. Descriptions only, no self-training:
    a rare class would be swamped by the routine events it absorbed.
    """

    model_config = ConfigDict(extra="forbid")

    # Several phrasings of each side are averaged into one vector (a prompt ensemble).
    alert: list[str] = Field(min_length=1)
    routine: list[str] = Field(min_length=1)
    temperature: float = Field(default=0.1, gt=0)
    # How the descriptions are embedded (as the classification's label descriptions).
    description_type: TextType = TextType.QUERY

    @field_validator("alert", "routine", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class Anomaly(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No alert before this many events of the namespace were scored (scores are still kept).
    warm_up: int = Field(default=100, ge=0)
    # The alert threshold is this quantile of the namespace's own score distribution.
    quantile: float = Field(default=0.95, gt=0.0, lt=1.0)
    # Nearest past events the k-NN distance averages over.
    neighbours: int = Field(default=50, ge=1)
    # The most recent events (after the warm-up) are left out of the history an event is
    # compared with, so a burst of repeats is not its own evidence of normality: it keeps
    # scoring high until its kind has been part of the stream for a while.
    horizon: int = Field(default=100, ge=0)
    # Weight of the centroid distance in the score (the rest is the k-NN distance).
    centroid_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    # "alerts" sends only anomalies; "all" sends every score (evaluation, dashboards).
    emit: Literal["alerts", "all"] = "alerts"
    # Optional: score = novelty x P(alert | focus descriptions) instead of novelty alone.
    focus: Focus | None = None


class NamespaceAnalysis(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classify: Classification | None = None
    anomaly: Anomaly | None = None
    # Past events kept for the k-NN vote and score (the oldest are dropped).
    history: int = Field(default=20_000, ge=1)

    @model_validator(mode="after")
    def _history_covers_anomaly(self) -> NamespaceAnalysis:
        a = self.anomaly
        if a is not None and self.history <= max(a.horizon, a.warm_up):
            raise ValueError(
                f"history ({self.history}) must exceed anomaly.horizon ({a.horizon}) "
                f"and anomaly.warm_up ({a.warm_up})"
            )
        return self


class AnalysisFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespaces: dict[str, NamespaceAnalysis] = Field(default_factory=dict)


class AnalysisFileError(ValueError):
    pass


def load_analysis(path: Path) -> AnalysisFile:
    """Parse and validate the file, folding ``examples_file`` rows into the labels."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        spec = AnalysisFile.model_validate(raw)
    except OSError as exc:
        raise AnalysisFileError(f"analysis file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AnalysisFileError(f"analysis file {path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise AnalysisFileError(f"analysis file {path}: {problems}") from None
    return finish(spec, path.parent, f"analysis file {path}")


def finish(spec: AnalysisFile, base: Path, where: str) -> AnalysisFile:
    """Fold ``examples_file`` rows into the labels and check every label can be scored."""
    for namespace, ns in spec.namespaces.items():
        if ns.classify is None:
            continue
        if ns.classify.examples_file is not None:
            _fold_examples(base, namespace, ns.classify)
            ns.classify.examples_file = None  # folded: finishing twice adds nothing
        for label in ns.classify.labels:
            if not label.descriptions and not label.examples:
                raise AnalysisFileError(
                    f"{where}: label {label.name!r} of namespace {namespace!r} "
                    "has neither a description nor examples"
                )
    return spec


def _fold_examples(base: Path, namespace: str, spec: Classification) -> None:
    assert spec.examples_file is not None
    file = spec.examples_file if spec.examples_file.is_absolute() else base / spec.examples_file
    by_name = {label.name: label for label in spec.labels}
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AnalysisFileError(f"examples file {file}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, name = row["text"], row["label"]
        except (ValueError, KeyError, TypeError):
            raise AnalysisFileError(
                f"examples file {file}:{number}: expected an object with `text` and `label`"
            ) from None
        if name not in by_name:
            raise AnalysisFileError(
                f"examples file {file}:{number}: label {name!r} is not in namespace "
                f"{namespace!r}'s label set"
            )
        if not isinstance(text, str) or not text.strip():
            raise AnalysisFileError(f"examples file {file}:{number}: empty text")
        by_name[name].examples.append(text)
