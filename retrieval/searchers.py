"""The search backends of a loaded index version: one class per way of answering top-k.

A loaded `retrieval.index_store.IndexVersion` holds exactly one `Searcher` and replaces
it to change where and how it searches:

    FaissCpuSearcher      "cpu"                 the loaded FAISS index itself (any factory)
    ListScanSearcher      "cpu (list scanner)"  `retrieval.ivf_scan.ListScanner` over a single
                                                inner-product IVF-SQ8 index: FAISS's answers,
                                                20-37 % less time at k = 1000
    FaissGpuSearcher      "cuda (faiss)"        a GPU copy of the index (faiss-gpu; k <= 2048)
    TorchExactSearcher    "cuda (torch exact)"  exact inner product with torch on CUDA over the
                                                index's reconstructed vectors (no k cap)

Every searcher takes C-contiguous float32 queries ``[Q, D]`` and an int k >= 1 (the
version checks both) and returns ``(scores [Q, k], rows [Q, k])`` best first, rows -1
where fewer than k items come back (the version turns their scores into -inf).
`set_search_params` applies search-time parameters (nprobe, efSearch, ...) to the loaded
CPU index, which stays the reference whatever searcher runs, and to the searcher's own
copy when it has one.

Example:
    >>> index = faiss.IndexFlatIP(2)
    >>> index.add(np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32))
    >>> searcher = FaissCpuSearcher(index)
    >>> scores, rows = searcher.search(np.array([[0, 1]], dtype=np.float32), 2)
    >>> searcher.name, rows.tolist()
    ('cpu', [[1, 2]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt
import torch

from retrieval.index_format import (
    IndexStoreError,
    apply_search_params,
    assemble_shards,
    shard_indexes,
)
from retrieval.ranking import exact_top_k_arrays

if TYPE_CHECKING:
    from retrieval.ivf_scan import ListScanner

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# FAISS GPU search keeps its k-selection in registers/shared memory and refuses k > 2048.
GPU_MAX_K = 2048


class Searcher(Protocol):
    """One way of answering top-k inner-product queries over a version's rows.

    Attributes:
        name: where and how it searches, e.g. "cpu" or "cuda (faiss)" (reported by the
            service as its search path).
    """

    name: str

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """``[Q, D]`` float32 queries -> ``(scores [Q, k], rows [Q, k])``, best first,
        rows -1 where fewer than k items come back."""
        ...

    def set_search_params(self, params: Mapping[str, Any]) -> None:
        """Apply search-time parameters (nprobe, efSearch, ...) to what this searches."""
        ...


# --------------------------------------------------------------------------- CPU


class FaissCpuSearcher:
    """Searches the loaded CPU FAISS index (any factory, sharded or not).

    Args:
        index: the CPU index; label r = row r of the version's id table.
    """

    name = "cpu"

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        scores, rows = self.index.search(queries, k)
        return scores, rows

    def set_search_params(self, params: Mapping[str, Any]) -> None:
        apply_search_params(self.index, params)


class ListScanSearcher:
    """Searches a single inner-product IVF-SQ8 index with `retrieval.ivf_scan.ListScanner`
    (same lists, codes and answers as FAISS; see that module for the measured speed).

    The scanner reads ``nprobe`` from `index` on every search, so parameters set here go
    to `index`. Build it with `ListScanSearcher.from_index`.

    Args:
        index: the CPU index the scanner reads (its codes copied, or its mapped lists).
        scanner: the scanner built over `index`.
    """

    name = "cpu (list scanner)"

    def __init__(self, index: faiss.Index, scanner: ListScanner) -> None:
        self.index = index
        self.scanner = scanner

    @classmethod
    def from_index(cls, index: faiss.Index) -> ListScanSearcher | None:
        """A scanner searcher for `index`, or None when `ListScanner` does not take it
        (anything but one inner-product IVF-SQ8 index). Its copy of the codes costs
        N x (D + 8) bytes."""
        from retrieval.ivf_scan import ListScanner  # numba: imported only when used

        scanner = ListScanner.from_index(index)
        return None if scanner is None else cls(index, scanner)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        return self.scanner.search(queries, k)

    def set_search_params(self, params: Mapping[str, Any]) -> None:
        apply_search_params(self.index, params)


# --------------------------------------------------------------------------- GPU


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def check_gpu_k(k: int) -> None:
    """Refuse k above the FAISS GPU limit.

    >>> check_gpu_k(4096)
    Traceback (most recent call last):
    ...
    ValueError: `k` must be <= 2048 for FAISS GPU search (a FAISS GPU limit); got 4096
    """
    if k > GPU_MAX_K:
        raise ValueError(
            f"`k` must be <= {GPU_MAX_K} for FAISS GPU search (a FAISS GPU limit); got {k}"
        )


class FaissGpuSearcher:
    """Searches a copy of the CPU index on one GPU (faiss-gpu); k is capped at `GPU_MAX_K`.

    Build it with `FaissGpuSearcher.from_index`, which copies the index and applies the
    search parameters in effect.

    Args:
        index: the CPU index the copy was made from (keeps the parameters in step).
        gpu_index: the GPU copy (a `faiss.IndexShards` of GPU parts for a sharded index).
        resources: the `faiss.StandardGpuResources` the copy lives in (kept alive here).
    """

    name = "cuda (faiss)"

    def __init__(self, index: faiss.Index, gpu_index: Any, resources: Any) -> None:
        self.index = index
        self.gpu_index = gpu_index
        self.resources = resources

    @classmethod
    def from_index(
        cls,
        index: faiss.Index,
        search_params: Mapping[str, Any],
        device: int = 0,
        *,
        what: str = "the index",
    ) -> FaissGpuSearcher:
        """Copy `index` to GPU `device` and apply `search_params` to the copy; `what`
        names the index in the error.

        Raises:
            IndexStoreError: the index cannot move to the GPU.
        """
        resources = faiss.StandardGpuResources()
        parts = shard_indexes(index)
        gpu_index: Any
        try:
            if parts is None:
                gpu_index = faiss.index_cpu_to_gpu(resources, device, index)
            else:  # the cloner has no IndexShards case: move each part, re-assemble
                gpu_index = assemble_shards(
                    [faiss.index_cpu_to_gpu(resources, device, part) for part in parts]
                )
        except RuntimeError as exc:
            raise IndexStoreError(f"{what} cannot move to the GPU: {exc}") from exc
        apply_search_params(gpu_index, search_params)
        return cls(index, gpu_index, resources)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        check_gpu_k(k)
        scores, rows = self.gpu_index.search(queries, k)
        return scores, rows

    def set_search_params(self, params: Mapping[str, Any]) -> None:
        apply_search_params(self.index, params)
        apply_search_params(self.gpu_index, params)


def reconstruct_all(index: faiss.Index) -> FloatArray:
    """Every stored vector `[ntotal, d]` (IVF indexes get a direct map first; the parts of
    a `faiss.IndexShards` in label order)."""
    parts = shard_indexes(index)
    if parts is not None:
        return np.concatenate([reconstruct_all(part) for part in parts], axis=0)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.make_direct_map()
    try:
        return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
    except RuntimeError as exc:
        raise IndexStoreError(f"index cannot reconstruct its vectors: {exc}") from exc


def torch_exact_search(
    vectors: torch.Tensor, queries: FloatArray, k: int, query_chunk_size: int = 1024
) -> tuple[FloatArray, IntArray]:
    """Exact inner-product top-k with torch on the vectors' device (the CUDA fallback):
    `retrieval.ranking.exact_top_k_arrays`, each chunk of queries scored against the whole
    catalog in one block (``query_chunk_size x N`` floats), ties to the lower row."""
    return exact_top_k_arrays(
        queries,
        vectors,
        k,
        query_chunk_size=query_chunk_size,
        item_chunk_size=max(1, vectors.shape[0]),
        items_checked=True,  # the version's vectors passed the load-time probe search
    )


class TorchExactSearcher:
    """Exact inner-product search with torch over the index's vectors (`torch_exact_search`):
    the GPU path without faiss-gpu. Exact, so search parameters change nothing here (they
    still go to the CPU index) and k has no cap.

    Args:
        index: the CPU index the vectors were reconstructed from.
        vectors: `[N, D]` float32 tensor of those vectors, on the device searched.
    """

    name = "cuda (torch exact)"

    def __init__(self, index: faiss.Index, vectors: torch.Tensor) -> None:
        self.index = index
        self.vectors = vectors

    @classmethod
    def from_index(cls, index: faiss.Index, device: str | torch.device) -> TorchExactSearcher:
        """Reconstruct the vectors of `index` (`reconstruct_all`) onto `device`.

        Raises:
            IndexStoreError: the index cannot reconstruct its vectors (e.g. PQ codes).
        """
        return cls(index, torch.from_numpy(reconstruct_all(index)).to(device))

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        return torch_exact_search(self.vectors, queries, k)

    def set_search_params(self, params: Mapping[str, Any]) -> None:
        apply_search_params(self.index, params)
