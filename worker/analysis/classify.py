"""Classification of a namespace's batch: one matrix product per batch, no state.

With labeled examples, the probabilities are the supervised head's
(``worker.analysis.head``: class-balanced logistic regression on the examples, the
descriptions as a fading prior, calibrated by a temperature fitted on held-out folds).
Without examples (zero-shot), they are ``softmax(cos(x, L_c) / temperature)``, L_c the mean
of label c's description vectors. Every result also carries an out-of-scope score in [0, 1].
docs/analysis.md has the measurements behind this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.analysis import scoring
from worker.analysis.labels import LabelSet
from worker.analysis.results import ClassificationResult, LabelScore, Method, origin
from worker.model import Change


@dataclass
class Classified:
    probabilities: np.ndarray  # (labels,)
    label: int
    out_of_scope: float  # in [0, 1]


def method_of(labels: LabelSet) -> Method:
    if labels.head is None:
        return "zero-shot"
    return "zero-shot+few-shot" if labels.prototypes is not None else "few-shot"


def classify_batch(labels: LabelSet, vectors: np.ndarray) -> list[Classified]:
    """Classify unit ``vectors``: the head's calibrated probabilities, else zero-shot.

    Zero-shot's out-of-scope score is 1 - the top probability; the head's is the rank of the
    energy among the examples' held-out energies (see ``head.Head.out_of_scope``).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if labels.head is not None:
        logits = labels.head.logits(x)
        probs = scoring.softmax(logits, 1.0)
        oos = labels.head.out_of_scope(logits)
    elif labels.prototypes is not None:
        probs = scoring.zero_shot(x, labels.prototypes, labels.spec.temperature)
        oos = 1.0 - probs.max(axis=1)
    else:  # neither a description for every label nor examples: nothing to rank by
        probs = np.full((len(x), len(labels.names)), 1.0 / len(labels.names))
        oos = np.ones(len(x))
    best = probs.argmax(axis=1)
    return [Classified(p, int(b), float(o)) for p, b, o in zip(probs, best, oos, strict=True)]


def build(
    labels: LabelSet, model: str, change: Change, classified: Classified
) -> ClassificationResult:
    spec = labels.spec
    probs = classified.probabilities
    ranked = scoring.top_k(probs, labels.names, spec.top_k)
    out_of_scope = round(min(1.0, max(0.0, classified.out_of_scope)), 6)
    action, rule = scoring.moderate(
        {name: float(p) for name, p in zip(labels.names, probs, strict=True)},
        spec.policy,
        out_of_scope,
    )
    return ClassificationResult(
        **origin(change, model),
        label=labels.names[classified.label],
        labels=[LabelScore(label=n, score=round(s, 6)) for n, s in ranked],
        method=method_of(labels),
        out_of_scope=out_of_scope,
        action=action,
        rule=None if rule is None else f"{rule.label}>={rule.min_score}",
    )
