"""Spherical k-means (cosine) in numpy: k-means++ seeding, Lloyd iterations, seeded and exact.

Pure functions over arrays, plus two small accumulators (a seeded reservoir sample and a
per-cluster summary) so that rows streamed from Postgres never have to be held all at once.
Vectors are normalised to unit length first; similarity is the dot product (cosine), and a
centroid is the normalised mean of its members (the spherical k-means update).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
Labels = npt.NDArray[np.intp]


def unit_rows(x: npt.ArrayLike) -> Matrix:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-d array of row vectors, got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    out = np.zeros_like(a)
    np.divide(a, norms, out=out, where=norms > 0)
    return out


def assign(x: Matrix, centroids: Matrix) -> tuple[Labels, Matrix]:
    """Each unit row's nearest centroid (highest cosine) and that similarity."""
    if len(centroids) == 0 or len(x) == 0:
        return np.zeros(len(x), dtype=np.intp), np.zeros(len(x), dtype=np.float32)
    sims = x @ centroids.T
    labels = np.argmax(sims, axis=1)
    return labels, sims[np.arange(len(x)), labels]


def kmeans_plus_plus(x: Matrix, k: int, rng: np.random.Generator) -> Matrix:
    """k-means++ seeding on unit rows: each next seed drawn with weight 1 - cos to its nearest.

    On the unit sphere the squared Euclidean distance is 2 (1 - cos), so this is the usual D²
    weighting. When every remaining row coincides with a seed (fewer distinct rows than k), the
    next seed is drawn uniformly among the rows not yet chosen.
    """
    n = len(x)
    if not 0 < k <= n:
        raise ValueError(f"k-means++ needs 0 < k <= rows, got k={k}, rows={n}")
    chosen = [int(rng.integers(n))]
    best = x @ x[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(1.0 - best.astype(np.float64), 0.0, None)
        weights[chosen] = 0.0
        total = weights.sum()
        if total > 0:
            pick = int(rng.choice(n, p=weights / total))
        else:
            remaining = np.setdiff1d(np.arange(n), chosen)
            pick = int(rng.choice(remaining))
        chosen.append(pick)
        best = np.maximum(best, x @ x[pick])
    return x[chosen].copy()


@dataclass(frozen=True)
class KMeans:
    centroids: Matrix  # (clusters, dimension), unit rows; empty clusters are dropped
    labels: Labels  # (rows,), index into centroids
    similarities: Matrix  # (rows,), cosine of each row to its centroid
    iterations: int

    @property
    def objective(self) -> float:
        """Sum of cosine similarities to the assigned centroids (higher is tighter)."""
        return float(self.similarities.sum(dtype=np.float64))


def _update(x: Matrix, labels: Labels, k: int) -> Matrix:
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    return unit_rows(sums)


def _lloyd(x: Matrix, centroids: Matrix, max_iter: int) -> KMeans:
    k = len(centroids)
    labels, sims = assign(x, centroids)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        centroids = _update(x, labels, k)
        # An empty cluster is re-seeded with the row that fits its own centroid worst.
        counts = np.bincount(labels, minlength=k)
        for empty in np.flatnonzero(counts == 0):
            worst = int(np.argmin(sims))
            centroids[empty] = x[worst]
            sims[worst] = np.inf  # not picked twice in this round
        new_labels, sims = assign(x, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    used = np.unique(labels)
    remap = np.full(k, -1, dtype=np.intp)
    remap[used] = np.arange(len(used))
    return KMeans(centroids[used], remap[labels], sims, iterations)


def spherical_kmeans(
    x: npt.ArrayLike, k: int, seed: int = 0, *, n_init: int = 4, max_iter: int = 100
) -> KMeans:
    """Cluster rows by cosine; the best of n_init k-means++ starts. Same input + seed, same result.

    k above the number of rows is lowered to it; identical rows may still leave fewer non-empty
    clusters than k (empty ones are dropped). No rows: no clusters.
    """
    if k < 1 or n_init < 1 or max_iter < 1:
        raise ValueError("k, n_init and max_iter must be at least 1")
    units = unit_rows(x)
    if len(units) == 0:
        return KMeans(
            np.zeros((0, units.shape[1]), dtype=np.float32),
            np.zeros(0, dtype=np.intp),
            np.zeros(0, dtype=np.float32),
            0,
        )
    rng = np.random.default_rng(seed)
    k = min(k, len(units))
    best: KMeans | None = None
    for _ in range(n_init):
        result = _lloyd(units, kmeans_plus_plus(units, k, rng), max_iter)
        if best is None or result.objective > best.objective + 1e-9:
            best = result
    assert best is not None
    return best


@dataclass
class Reservoir:
    """A uniform sample of at most `capacity` streamed items (algorithm R), seeded.

    The same items in the same order with the same seed give the same sample. While fewer than
    `capacity` items were offered, the sample is all of them, in order.
    """

    capacity: int
    seed: int = 0
    seen: int = 0
    items: list[tuple[str, str, Matrix]] = field(default_factory=list)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("a reservoir needs a capacity of at least 1")
        self._rng = np.random.default_rng(self.seed)

    def offer(self, id: str, content: str, vector: Matrix) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append((id, content, vector))
            return
        slot = int(self._rng.integers(self.seen))
        if slot < self.capacity:
            self.items[slot] = (id, content, vector)

    @property
    def complete(self) -> bool:
        """Every offered item is in the sample."""
        return self.seen == len(self.items)

    def matrix(self, dimension: int) -> Matrix:
        if not self.items:
            return np.zeros((0, dimension), dtype=np.float32)
        return np.stack([v for _, _, v in self.items]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Member:
    id: str
    content: str
    similarity: float


@dataclass(frozen=True)
class ClusterSummary:
    size: int
    cohesion: float  # mean cosine similarity of the members to the centroid
    members: list[Member]  # the ones nearest the centroid, most similar first


class Summarizer:
    """Per-cluster size, mean similarity and the `top` rows nearest each centroid, streamed."""

    def __init__(self, centroids: Matrix, top: int) -> None:
        self.centroids = unit_rows(centroids)
        self.top = top
        k = len(centroids)
        self.sizes = np.zeros(k, dtype=np.int64)
        self.sums = np.zeros(k, dtype=np.float64)
        # min-heaps of (similarity, negated order, id, content): the weakest member on top
        self._heaps: list[list[tuple[float, int, str, str]]] = [[] for _ in range(k)]
        self._order = 0

    def add(self, ids: list[str], contents: list[str], vectors: npt.ArrayLike) -> None:
        labels, sims = assign(unit_rows(vectors), self.centroids)
        np.add.at(self.sizes, labels, 1)
        np.add.at(self.sums, labels, sims.astype(np.float64))
        if self.top == 0:
            return
        for id, content, label, sim in zip(ids, contents, labels, sims, strict=True):
            self._order += 1
            entry = (float(sim), -self._order, id, content)  # ties: the earlier row wins
            heap = self._heaps[int(label)]
            if len(heap) < self.top:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)

    def summaries(self) -> list[ClusterSummary]:
        """Non-empty clusters, largest first (ties: most cohesive first)."""
        out = [
            ClusterSummary(
                size=int(size),
                cohesion=float(total / size),
                members=[
                    Member(id, content, sim) for sim, _, id, content in sorted(heap, reverse=True)
                ],
            )
            for size, total, heap in zip(self.sizes, self.sums, self._heaps, strict=True)
            if size > 0
        ]
        out.sort(key=lambda c: (-c.size, -c.cohesion))
        return out
