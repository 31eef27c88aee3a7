"""The batch runner applies its FAISS thread count on the thread that runs the batches."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import pytest

from retrieval.bundle import load_bundle
from service.errors import NotReadyError
from service.query import QueryFeatures, QuerySchema
from service.retriever import RetrievalJob, Retriever


def _retriever(bundle_dir: Path, faiss_threads: int | None) -> Retriever:
    encoder = load_bundle(bundle_dir).encoder
    schema = QuerySchema.from_schema(encoder.schema)
    return Retriever(
        encoder, schema, lambda batch: batch, lambda: None, faiss_threads=faiss_threads
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
