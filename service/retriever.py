"""One micro-batch of retrievals: encode, one query-tower pass, one index search, ids.

`Retriever.run_batch` is the batcher's ``process`` function and runs on its worker
thread. It reads the serving index version **once** (every answer of the batch names
that version), encodes the batch's checked queries with the bundle's encoder, embeds
them in one query-tower call and runs one FAISS search for the whole batch.

Exclusions (explicit ids and, with `exclude_seen`, the user's train+valid items) are
applied by over-fetching: the search asks for ``k + |exclusions|`` (the batch's largest),
then each query drops its excluded ids and keeps its first k. An excluded id appears at
most once among the candidates, so k results come back whenever the catalog holds k
items outside the exclusions — exactly what `training.evaluate.ann_ranking` does offline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from retrieval.encoders import FeatureEncoder
from service.errors import NotReadyError
from service.index_manager import ServingIndex
from service.query import QueryBatchEncoder, QueryFeatures, QuerySchema

logger = logging.getLogger(__name__)

EmbedFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
SCORE_DECIMALS = 6  # scores are cosines in [-1, 1]; 6 decimals keep answers small


@dataclass(frozen=True)
class RetrievalJob:
    """One query of a batch.

    Args:
        features: the checked query features.
        k: results wanted.
        exclude: catalog ids that must not be returned.
    """

    features: QueryFeatures
    k: int
    exclude: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class RetrievalResult:
    """Best-first catalog ids and scores, and the index version that produced them."""

    ids: list[str]
    scores: list[float]
    index_version: str


@dataclass
class BatchTimings:
    """Seconds spent in each stage of the last batches (summed; for /v1/info and benches)."""

    encode: float = 0.0
    embed: float = 0.0
    search: float = 0.0
    ids: float = 0.0
    batches: int = 0


class Retriever:
    """Runs batches of `RetrievalJob` against the serving index.

    Args:
        encoder: the bundle's fitted feature encoder.
        schema: what queries hold (`QuerySchema.from_schema(encoder.schema)`).
        embed: encoded query batch -> ``[B, D]`` unit vectors (the exported query tower).
        current_index: returns the serving index version (None before one is loaded).
        faiss_threads: OpenMP threads of the searches (None: leave FAISS's setting alone).
            OpenMP keeps the thread count per calling thread, so a process-wide
            ``faiss.omp_set_num_threads`` on the main thread does not reach the batch
            worker; each thread that runs `run_batch` applies it once. (Left at the core
            count, a worker's searches woke a second OpenMP thread that spin-waited between
            batches: ~1 ms of CPU per request taken from the event loop.)
        prefill_codes: fill the encoder's code caches now (`QueryBatchEncoder`).
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        schema: QuerySchema,
        embed: EmbedFn,
        current_index: Callable[[], ServingIndex | None],
        *,
        faiss_threads: int | None = None,
        prefill_codes: bool = False,
    ) -> None:
        if faiss_threads is not None and faiss_threads < 1:
            raise ValueError(f"`faiss_threads` must be >= 1; got {faiss_threads}")
        self.encoder = encoder
        self.schema = schema
        self.batch_encoder = QueryBatchEncoder(encoder, schema, prefill=prefill_codes)
        self.embed = embed
        self.current_index = current_index
        self.faiss_threads = faiss_threads
        self._configured = threading.local()
        self.timings = BatchTimings()

    def _configure_thread(self) -> None:
        if self.faiss_threads is not None and not getattr(self._configured, "done", False):
            faiss.omp_set_num_threads(self.faiss_threads)
            self._configured.done = True

    def embed_jobs(self, jobs: Sequence[RetrievalJob]) -> np.ndarray:
        """`[B, D]` float32 query embeddings of the jobs' features."""
        started = time.perf_counter()
        batch = self.batch_encoder.encode([job.features for job in jobs])
        encoded = time.perf_counter()
        with torch.inference_mode():
            emb = self.embed(batch)  # (B, D)
        array = np.ascontiguousarray(emb.detach().to(torch.float32).numpy())
        self.timings.encode += encoded - started
        self.timings.embed += time.perf_counter() - encoded
        return array

    def run_batch(self, jobs: Sequence[RetrievalJob]) -> list[RetrievalResult | BaseException]:
        """Answer every job of one batch (the batcher's ``process``)."""
        self._configure_thread()
        index = self.current_index()  # read once: the whole batch uses this version
        if index is None:
            raise NotReadyError("no index version is loaded yet", retry_after_s=1)
        emb = self.embed_jobs(jobs)
        started = time.perf_counter()
        fetch = min(index.num_items, max(job.k + len(job.exclude) for job in jobs))
        scores, rows = index.search(emb, max(fetch, 1))  # (B, fetch) each
        searched = time.perf_counter()
        results: list[RetrievalResult | BaseException] = [
            self._result(index, job, scores[b], rows[b]) for b, job in enumerate(jobs)
        ]
        self.timings.search += searched - started
        self.timings.ids += time.perf_counter() - searched
        self.timings.batches += 1
        return results

    @staticmethod
    def _result(
        index: ServingIndex, job: RetrievalJob, scores: np.ndarray, rows: np.ndarray
    ) -> RetrievalResult:
        valid = rows >= 0
        if job.exclude:
            candidates: list[str] = index.ids[rows[valid]].tolist()
            keep = [i for i, item in enumerate(candidates) if item not in job.exclude][: job.k]
            ids = [candidates[i] for i in keep]
            kept_scores = scores[valid].astype(np.float64)[keep]
        else:
            ids = index.ids[rows[valid][: job.k]].tolist()
            kept_scores = scores[valid][: job.k].astype(np.float64)
        return RetrievalResult(
            ids=ids,
            scores=np.round(kept_scores, SCORE_DECIMALS).tolist(),
            index_version=index.version,
        )
