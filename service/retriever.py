"""One micro-batch of retrievals: encode, one query-tower pass, index searches, ids.

`Retriever.run_batch` is the batcher's ``process`` function and runs on its worker
thread. It reads the serving index version **once** (every answer of the batch names
that version), encodes the batch's checked queries with the bundle's encoder, embeds
them in one query-tower call and searches the index.

Exclusions (explicit ids and, with `exclude_seen`, the user's most recent seen items,
see `ServiceSettings.max_seen_ids`) are applied by over-fetching: a query's search asks
for ``k + |exclusions|`` (at most the catalog), then the query drops its excluded ids
and keeps its first k. An excluded id appears at most once among the candidates, so k
results come back whenever the catalog holds k items outside the exclusions, as
`training.evaluate.ann_ranking` does offline. The over-fetch is per query: the batch's
queries are grouped by fetch size (`fetch_groups`, one search per group, a group's size
at most `FETCH_GROUP_RATIO` times the smallest fetch in it), so one query with many
exclusions never deepens the searches of the others.

One query never fails its batch: a query whose embedding is not finite (a dense value
far outside the training range can overflow the float32 tower) gets `QueryEmbeddingError`
and is not searched; a query whose search rows fall outside the catalog, whose scores
are not finite, or whose exhaustive (Flat) search came back short gets
`SearchResultError`. Both answer 500 for that query alone; the rest of the batch is
answered as usual.

A job with ``search=False`` (POST /v1/embed) shares the batch's encoding and query-tower
pass and the same non-finite check, but is not searched: its result carries the query
embedding (`RetrievalResult.embedding`) and no ids.
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
from retrieval.row_encoding import QueryRowEncoder
from service.errors import NotReadyError, QueryEmbeddingError, SearchResultError
from service.index_manager import ServingIndex
from service.query import QueryFeatures, QuerySchema

logger = logging.getLogger(__name__)

EmbedFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
SCORE_DECIMALS = 6  # scores are cosines in [-1, 1]; 6 decimals keep answers small
FETCH_GROUP_RATIO = 2  # a query is searched at most this many times deeper than it needs


@dataclass(frozen=True)
class RetrievalJob:
    """One query of a batch.

    Args:
        features: the checked query features.
        k: results wanted.
        exclude: catalog ids that must not be returned.
        search: False: embed only; the result carries the embedding and no ids.
    """

    features: QueryFeatures
    k: int
    exclude: frozenset[str] = field(default_factory=frozenset)
    search: bool = True


@dataclass(frozen=True)
class RetrievalResult:
    """Best-first catalog ids and scores, and the index version that produced them (for
    an embed-only job: no ids, the query embedding, and the index version serving)."""

    ids: list[str]
    scores: list[float]
    index_version: str
    embedding: list[float] | None = None  # D float32 values, unit L2 norm (embed-only jobs)


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
        schema: what queries hold (`QuerySchema.from_encoder(encoder)`).
        embed: encoded query batch -> ``[B, D]`` unit vectors (the exported query tower).
        current_index: returns the serving index version (None before one is loaded).
        faiss_threads: OpenMP threads of the searches (None: leave FAISS's setting alone).
            OpenMP keeps the thread count per calling thread, so a process-wide
            ``faiss.omp_set_num_threads`` on the main thread does not reach the batch
            worker; each thread that runs `run_batch` applies it once. (Left at the core
            count, a worker's searches woke a second OpenMP thread that spin-waited between
            batches: ~1 ms of CPU per request taken from the event loop.)
        prefill_codes: fill the row encoder's code caches now (`retrieval.row_encoding.QueryRowEncoder`).
        code_cache_size: values looked up while serving kept per feature
            (`retrieval.row_encoding.QueryRowEncoder`, `ServiceSettings.code_cache_size`).
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
        code_cache_size: int = 100_000,
    ) -> None:
        if faiss_threads is not None and faiss_threads < 1:
            raise ValueError(f"`faiss_threads` must be >= 1; got {faiss_threads}")
        self.encoder = encoder
        self.schema = schema
        self.batch_encoder = QueryRowEncoder(
            encoder, prefill=prefill_codes, code_cache_size=code_cache_size
        )
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
        """Answer every job of one batch (the batcher's ``process``): a result per job, or
        the exception of that job alone (see the module docstring)."""
        self._configure_thread()
        index = self.current_index()  # read once: the whole batch uses this version
        if index is None:
            raise NotReadyError("no index version is loaded yet", retry_after_s=1)
        emb = self.embed_jobs(jobs)  # (B, D)
        answers: dict[int, RetrievalResult | BaseException] = {}
        finite = np.isfinite(emb).all(axis=1)  # (B,)
        for b in np.flatnonzero(~finite).tolist():
            answers[b] = QueryEmbeddingError(
                "the query tower gave this query a non-finite embedding (a dense value far "
                "outside the training range can overflow it); the query was not searched"
            )
        good: list[int] = []
        for b in np.flatnonzero(finite).tolist():
            if jobs[b].search:
                good.append(b)
            else:  # embed only: float32 values as Python floats (exact)
                answers[b] = RetrievalResult(
                    ids=[], scores=[], index_version=index.version, embedding=emb[b].tolist()
                )
        fetches = [min(index.num_items, jobs[b].k + len(jobs[b].exclude)) for b in good]
        for fetch, positions in fetch_groups(fetches):
            members = [good[p] for p in positions]  # batch rows searched together
            answers.update(self._search_group(index, jobs, emb, members, max(fetch, 1)))
        self.timings.batches += 1
        return [answers[b] for b in range(len(jobs))]

    def _search_group(
        self,
        index: ServingIndex,
        jobs: Sequence[RetrievalJob],
        emb: np.ndarray,
        members: list[int],
        fetch: int,
    ) -> dict[int, RetrievalResult | BaseException]:
        """One search of the batch rows `members` at depth `fetch`; each row's answer."""
        started = time.perf_counter()
        try:
            scores, rows = index.search(emb[members], fetch)  # (G, fetch) each
        except Exception:
            logger.exception(
                "index %s: a search of %d queries (fetch %d) failed",
                index.version,
                len(members),
                fetch,
            )
            return {
                b: SearchResultError(f"the search of index version {index.version!r} failed")
                for b in members
            }
        searched = time.perf_counter()
        exhaustive = _is_exhaustive(index)
        answers: dict[int, RetrievalResult | BaseException] = {}
        for g, b in enumerate(members):
            job = jobs[b]
            needed = min(index.num_items, job.k + len(job.exclude))
            problem = _check_search_row(scores[g], rows[g], index.num_items, needed, exhaustive)
            if problem is None:
                answers[b] = self._result(index, job, scores[g], rows[g])
                continue
            logger.warning(
                "index %s answered query %d of a batch of %d with %s",
                index.version,
                b,
                len(jobs),
                problem,
            )
            answers[b] = SearchResultError(
                f"index version {index.version!r} answered this query with {problem}"
            )
        self.timings.search += searched - started
        self.timings.ids += time.perf_counter() - searched
        return answers

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


def fetch_groups(
    fetches: Sequence[int], ratio: int = FETCH_GROUP_RATIO
) -> list[tuple[int, list[int]]]:
    """Queries grouped for searching: ``(search size, positions)`` per group.

    Positions are sorted by fetch size and cut into runs whose largest fetch is at most
    `ratio` times their smallest, so no query is searched more than `ratio` times deeper
    than it needs, and a batch of similar queries is still one search.

    >>> fetch_groups([10, 10, 1010, 12, 600])
    [(12, [0, 1, 3]), (1010, [4, 2])]
    """
    sizes: list[int] = []
    members: list[list[int]] = []
    for position in sorted(range(len(fetches)), key=fetches.__getitem__):  # stable
        fetch = fetches[position]
        if members and fetch <= ratio * fetches[members[-1][0]]:
            sizes[-1] = fetch  # ascending: the group's largest so far
            members[-1].append(position)
        else:
            sizes.append(fetch)
            members.append([position])
    return list(zip(sizes, members, strict=True))


def _is_exhaustive(index: ServingIndex) -> bool:
    """Whether a search of `index` returns min(k, catalog) rows for any finite query."""
    return isinstance(getattr(index.loaded, "index", None), faiss.IndexFlat)


def _check_search_row(
    scores: np.ndarray, rows: np.ndarray, num_items: int, fetch: int, exhaustive: bool
) -> str | None:
    """What is wrong with one query's search results (None: nothing)."""
    outside = (rows < -1) | (rows >= num_items)
    if outside.any():
        return f"{int(outside.sum())} rows outside the catalog of {num_items} items"
    valid = rows >= 0
    if not np.isfinite(scores[valid]).all():
        return "non-finite scores"
    if exhaustive and int(valid.sum()) < min(fetch, num_items):
        return f"{int(valid.sum())} rows where an exhaustive search gives {min(fetch, num_items)}"
    return None
