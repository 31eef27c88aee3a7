"""The batch runner: its FAISS thread count reaches the thread that runs the batches; one
query's bad embedding or bad search rows fail that query alone; the over-fetch for
exclusions is per query."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from retrieval.bundle import load_bundle
from retrieval.index_store import load_index_version
from service.errors import NotReadyError, QueryEmbeddingError, SearchResultError
from service.index_manager import ServingIndex
from service.query import QueryFeatures, QuerySchema, normalize_query
from service.retriever import (
    FETCH_GROUP_RATIO,
    RetrievalJob,
    RetrievalResult,
    Retriever,
    fetch_groups,
)


def _retriever(bundle_dir: Path, faiss_threads: int | None) -> Retriever:
    encoder = load_bundle(bundle_dir).encoder
    schema = QuerySchema.from_schema(encoder.schema)
    return Retriever(
        encoder, schema, lambda batch: torch.empty(0), lambda: None, faiss_threads=faiss_threads
    )


def _threads_seen_by_worker(retriever: Retriever) -> int:
    """OpenMP's thread count on a fresh thread after it ran one batch."""
    seen: list[int] = []

    def work() -> None:
        with pytest.raises(NotReadyError):
            retriever.run_batch([RetrievalJob(features=QueryFeatures({}), k=1)])
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return seen[0]


def test_faiss_threads_reach_the_batch_worker_thread(tiny_bundle: Path) -> None:
    main_before = faiss.omp_get_max_threads()
    wanted = main_before + 2  # differs from any thread's default on this machine
    assert _threads_seen_by_worker(_retriever(tiny_bundle, wanted)) == wanted
    assert faiss.omp_get_max_threads() == main_before  # per thread: the caller is untouched


def test_faiss_threads_left_alone_when_not_given(tiny_bundle: Path) -> None:
    fresh = _threads_seen_by_worker(_retriever(tiny_bundle, None))
    assert fresh == _threads_seen_by_worker(_retriever(tiny_bundle, None))


def test_faiss_threads_must_be_positive(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError, match="faiss_threads"):
        _retriever(tiny_bundle, 0)


# --------------------------------------------------------------------------- one query alone


class Batch:
    """A retriever over the tiny bundle and its Flat index whose searches are recorded
    (rows and k of each call) and whose embed / search can be spoiled for chosen rows."""

    def __init__(self, bundle_dir: Path, index_root: Path) -> None:
        bundle = load_bundle(bundle_dir)
        self.schema = QuerySchema.from_encoder(bundle.encoder)
        self.index = ServingIndex(load_index_version(index_root))
        self.searches: list[tuple[int, int]] = []  # (rows, k) per search call
        self.nan_rows: set[int] = set()  # embedding rows turned to NaN
        self.spoil: Callable[[np.ndarray, np.ndarray], None] | None = None
        original = self.index.search

        def search(query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            self.searches.append((len(query_emb), k))
            scores, rows = original(query_emb, k)
            if self.spoil is not None:
                self.spoil(scores, rows)
            return scores, rows

        self.index.search = search  # type: ignore[method-assign]

        def embed(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            emb = bundle.model.embed_queries(dict(batch)).clone()  # (B, D)
            for row in self.nan_rows:
                emb[row] = float("nan")
            return emb

        self.retriever = Retriever(bundle.encoder, self.schema, embed, lambda: self.index)

    def job(self, history: list[str], k: int = 5, exclude: frozenset[str] = frozenset()) -> Any:
        assert self.schema.history_name is not None
        features = normalize_query({self.schema.history_name: history}, self.schema)
        return RetrievalJob(features=features, k=k, exclude=exclude)

    def alone(self, job: RetrievalJob) -> Any:
        """The answer of `job` run on its own, clean (no spoiled rows)."""
        nan_rows, spoil, calls = self.nan_rows, self.spoil, len(self.searches)
        self.nan_rows, self.spoil = set(), None
        try:
            return self.retriever.run_batch([job])[0]
        finally:
            self.nan_rows, self.spoil = nan_rows, spoil
            del self.searches[calls:]


def same_answer(got: Any, alone: Any) -> bool:
    """Same ids and version, scores equal up to float32 noise (a row's embedding may differ
    in the last bits with the batch it was computed in)."""
    assert isinstance(got, RetrievalResult) and isinstance(alone, RetrievalResult)
    return (
        got.ids == alone.ids
        and got.index_version == alone.index_version
        and np.allclose(got.scores, alone.scores, rtol=0, atol=1e-5)
    )


def distinct_jobs(batch: Batch, n: int) -> list[RetrievalJob]:
    ids = batch.index.ids.tolist()
    return [batch.job([ids[3 * i], ids[3 * i + 1]]) for i in range(n)]


def test_a_non_finite_embedding_fails_its_query_alone(tiny_bundle: Path, tiny_index: Path) -> None:
    """Row 2 of 6 embeds to NaN: it gets `QueryEmbeddingError` (500, embedding_failed) and
    is not searched; the other 5 get exactly the answers they get alone."""
    batch = Batch(tiny_bundle, tiny_index)
    jobs = distinct_jobs(batch, 6)
    batch.nan_rows = {2}
    answers = batch.retriever.run_batch(jobs)
    error = answers[2]
    assert isinstance(error, QueryEmbeddingError)
    assert error.status_code == 500 and error.code == "embedding_failed"
    assert batch.searches == [(5, 5)]  # the NaN row never reached the index
    for b, job in enumerate(jobs):
        if b != 2:
            assert same_answer(answers[b], batch.alone(job)), b


def test_bad_search_rows_fail_their_query_alone(tiny_bundle: Path, tiny_index: Path) -> None:
    """The index answers row 1 with a label outside the catalog, row 3 with a NaN score and
    row 4 short (an exhaustive Flat search must fill k): each gets `SearchResultError`
    (500, search_failed); rows 0, 2 and 5 answer as alone."""
    batch = Batch(tiny_bundle, tiny_index)
    num_items = batch.index.num_items
    jobs = distinct_jobs(batch, 6)

    def spoil(scores: np.ndarray, rows: np.ndarray) -> None:
        rows[1, 2] = num_items + 7
        scores[3, 0] = np.nan
        rows[4, 3:] = -1

    batch.spoil = spoil
    answers = batch.retriever.run_batch(jobs)
    for b in (1, 3, 4):
        error = answers[b]
        assert isinstance(error, SearchResultError), b
        assert error.status_code == 500 and error.code == "search_failed"
    assert "outside the catalog" in str(answers[1]) and "non-finite" in str(answers[3])
    for b in (0, 2, 5):
        assert same_answer(answers[b], batch.alone(jobs[b])), b


def test_over_fetch_is_per_query(tiny_bundle: Path, tiny_index: Path) -> None:
    """One query excluding 40 items beside 5 plain ones (k = 5): the plain queries are
    searched at k = 5, the heavy one alone at 5 + 40; every answer equals its answer alone,
    and the heavy one still gets k results, none excluded."""
    batch = Batch(tiny_bundle, tiny_index)
    jobs = distinct_jobs(batch, 6)
    top = batch.alone(jobs[3]).ids
    exclude = frozenset(top + batch.index.ids[:35].tolist())  # its best items among them
    heavy = RetrievalJob(features=jobs[3].features, k=5, exclude=exclude)
    fetch = 5 + len(exclude)
    jobs[3] = heavy
    answers = batch.retriever.run_batch(jobs)
    assert sorted(batch.searches) == sorted([(5, 5), (1, fetch)]), batch.searches
    for b, job in enumerate(jobs):
        assert same_answer(answers[b], batch.alone(job)), b
    result = answers[3]
    assert isinstance(result, RetrievalResult)
    assert len(result.ids) == 5 and not set(result.ids) & exclude


def test_fetch_groups_never_search_a_query_more_than_twice_as_deep() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        fetches = rng.integers(1, 5000, size=int(rng.integers(1, 65))).tolist()
        groups = fetch_groups(fetches)
        positions = sorted(p for _, members in groups for p in members)
        assert positions == list(range(len(fetches)))  # every query, once
        for size, members in groups:
            assert size == max(fetches[p] for p in members)
            assert all(size <= FETCH_GROUP_RATIO * fetches[p] for p in members)
    assert fetch_groups([7, 7, 7]) == [(7, [0, 1, 2])]  # similar queries: one search
