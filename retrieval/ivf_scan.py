"""A faster CPU search for inner-product `IVF{n},SQ8` indexes (the default above 200k items).

`ListScanner` answers exactly what ``index.search`` answers (same lists probed, same
8-bit codes, same scores up to float rounding; tested against FAISS), with a compiled
scan that FAISS's generic scalar-quantizer path does not have: each probed list's codes
are read as one contiguous ``[n, D]`` uint8 block and scored by a numba loop that the
compiler vectorises (uint8 -> float32 conversion and fused multiply-adds, 8 lanes),
and a running top-k threshold rejects most candidates with one comparison.

Why it is exact: FAISS's SQ8 (``QT_8bit``) stores, per dimension j, a code c_j with the
reconstruction ``vmin_j + (c_j + 0.5) / 255 * vdiff_j`` of the vector (or of its residual
from the list's centroid). The inner product with a query q is therefore

    <q, centroid> (residual encoding only) + sum_j q_j (vmin_j + 0.5 vdiff_j / 255)
                                           + sum_j (q_j vdiff_j / 255) c_j

a per-list constant plus one dot product of a fixed weight vector with the codes.

Measured on the 1M-item benchmark index (bench/bench_service.py's, IVF4000,SQ8, k=1000,
one thread, 2-core AMD EPYC VM, interleaved rounds): at nprobe 1024, 3.4-3.6 ms per query
against FAISS's 4.8-5.0 ms in one set of rounds, 5.1-5.4 against 6.4-7.7 in another (the VM's
speed varies); the benchmark's in-process floor, 4.4 against 7.0 ms. Same top-1000 sets on 100 queries,
largest score difference 1.3e-7. Nearly all the time is the dot products (k = 1 costs 96 %
of k = 1000), and they are compute-bound: 4-bit codes derived from the 8-bit ones halve
the bytes read but were slower (6.3 against 4.5 ms), so they are not used.

The two kernels are compiled on first use, about 1.5 s once per process (the service's
warm-up search pays it before it reports ready); nothing is cached on disk, so a read-only
container runs them.

Memory: the kernel reads the codes from one flat uint8 buffer, list l's codes starting at
byte ``starts[l]``. For an index read into memory (`faiss.ArrayInvertedLists`) the scanner
copies every list into a private buffer of its own, contiguous by list (N x D bytes: 64 MB
at 1M items of D=64). For an index read with ``faiss.IO_FLAG_MMAP``
(`retrieval.index_format.read_index_file` with ``mmap=True``; read-only
`faiss.OnDiskInvertedLists`) the buffer is a read-only numpy view of FAISS's mapping of the
index file, each list at the offset FAISS records for it: no copy, the codes stay in the
page cache, shared by every process that maps the same file (`codes_mapped`). Either way
the scanner keeps its own ids (8 bytes per item, so that a result row maps to its label
without touching the lists) and the coarse centroids (L x D floats); `nbytes` counts only
this private memory. Unsupported indexes (anything but a single IVF with SQ8 codes and
inner product, in memory or mapped read-only) get None from `ListScanner.from_index`;
callers keep using FAISS for them.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numba
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
_PAGE_BYTES = 4096


@numba.njit(nogil=True, fastmath=True)
def _scan_lists(
    codes: Any,
    starts: Any,
    offsets: Any,
    probe: Any,
    bases: Any,
    weights: Any,
    k: int,
    heap_scores: Any,
    heap_rows: Any,
    buffer: Any,
) -> int:
    """Top-k (min-heap) of ``bases[p] + weights . code`` over the probed lists' codes.

    List l holds ``offsets[l + 1] - offsets[l]`` codes of D bytes, one after the other in
    the flat uint8 `codes` from byte ``starts[l]``; its code r is heap row ``offsets[l] + r``.
    Returns how many heap slots are filled (< k when the lists hold fewer items).
    """
    dim = weights.shape[0]
    filled = 0
    threshold = -np.inf
    for p in range(probe.shape[0]):
        first = offsets[probe[p]]
        count = offsets[probe[p] + 1] - first
        start = starts[probe[p]]
        block = codes[start : start + count * dim].reshape((count, dim))  # (n, D) view
        base = bases[p]
        for r in range(count):  # the vectorised part: one dot product per code
            acc = np.float32(0.0)
            for j in range(dim):
                acc += np.float32(block[r, j]) * weights[j]
            buffer[r] = acc + base
        for r in range(count):
            score = buffer[r]
            if score <= threshold:
                continue
            if filled < k:  # sift up
                i = filled
                filled += 1
                while i > 0:
                    parent = (i - 1) >> 1
                    if heap_scores[parent] <= score:
                        break
                    heap_scores[i] = heap_scores[parent]
                    heap_rows[i] = heap_rows[parent]
                    i = parent
                heap_scores[i] = score
                heap_rows[i] = first + r
                if filled == k:
                    threshold = heap_scores[0]
            else:  # replace the smallest, sift down
                i = 0
                while True:
                    child = 2 * i + 1
                    if child >= k:
                        break
                    if child + 1 < k and heap_scores[child + 1] < heap_scores[child]:
                        child += 1
                    if heap_scores[child] >= score:
                        break
                    heap_scores[i] = heap_scores[child]
                    heap_rows[i] = heap_rows[child]
                    i = child
                heap_scores[i] = score
                heap_rows[i] = first + r
                threshold = heap_scores[0]
    return filled


@numba.njit(nogil=True, fastmath=True)
def _dot_rows(matrix: Any, vector: Any, out: Any) -> None:
    """``out[i] = matrix[i] . vector`` (the coarse scores, without numpy's BLAS threads)."""
    for i in range(matrix.shape[0]):
        acc = np.float32(0.0)
        for j in range(matrix.shape[1]):
            acc += matrix[i, j] * vector[j]
        out[i] = acc


class ListScanner:
    """Searches an inner-product IVF-SQ8 FAISS index (see the module docstring).

    Build it with `ListScanner.from_index`; `search` reads the index's current
    ``nprobe`` on every call, so search parameters set on the index apply here too.
    Safe to call from several threads at once (the scan releases the GIL).

    Args:
        index: the index searched (kept referenced: a mapped index's file mapping, which
            `codes` views, lives as long as the index does).
        ivf: `index` downcast to its `faiss.IndexIVFScalarQuantizer`.
    """

    def __init__(self, index: faiss.Index, ivf: Any) -> None:
        self._index = index
        self._ivf = ivf
        dim, nlist = int(ivf.d), int(ivf.nlist)
        invlists: Any = faiss.downcast_InvertedLists(ivf.invlists)
        sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
        offsets = np.zeros(nlist + 1, dtype=np.int64)  # heap rows of list l: offsets[l:l+2]
        np.cumsum(sizes, out=offsets[1:])
        labels = np.empty(int(offsets[-1]), dtype=np.int64)
        self._mapped = isinstance(invlists, faiss.OnDiskInvertedLists)
        if self._mapped:
            # The mapping of the whole index file, each list's codes at its own offset.
            codes = faiss.rev_swig_ptr(invlists.ptr, int(invlists.totsize))
            starts = np.array([invlists.lists.at(i).offset for i in range(nlist)], np.int64)
            if (starts + sizes * dim > codes.size).any():  # the kernel reads unchecked
                raise ValueError("an inverted list lies outside the mapped index file")
            for i in np.flatnonzero(sizes):
                _copy_ids(invlists, int(i), labels[offsets[i] : offsets[i + 1]])
            # One read per page now maps every page, so no search pays the page faults.
            int(codes[::_PAGE_BYTES].sum(dtype=np.int64))
        else:
            codes = np.empty(int(offsets[-1]) * dim, dtype=np.uint8)  # (N * D), by list
            starts = offsets[:-1] * dim
            for i in np.flatnonzero(sizes):
                first, end = int(offsets[i]), int(offsets[i + 1])
                _copy_ids(invlists, int(i), labels[first:end])
                _copy_codes(invlists, int(i), codes[first * dim : end * dim])
        codes.flags.writeable = False  # the mapping is read-only; one compiled kernel for both
        trained = faiss.vector_to_array(ivf.sq.trained).astype(np.float32)
        vmin, vdiff = trained[:dim], trained[dim:]
        self.dim = dim
        self.nlist = nlist
        self.codes = codes
        self.starts = starts
        self.labels = labels
        self.offsets = offsets
        self.centroids = np.ascontiguousarray(  # (L, D)
            ivf.quantizer.reconstruct_n(0, nlist), dtype=np.float32
        )
        self.by_residual = bool(ivf.by_residual)
        self._scale = (vdiff / np.float32(255.0)).astype(np.float32)  # (D,)
        self._offset = (vmin + np.float32(0.5) * self._scale).astype(np.float32)  # (D,)
        self._longest = int(sizes.max()) if nlist else 0

    @classmethod
    def from_index(cls, index: faiss.Index) -> ListScanner | None:
        """A scanner for `index`, or None unless it is one inner-product IVF-SQ8 index
        (no shards, refine or pre-transform around it) with in-memory lists or lists
        mapped read-only (`retrieval.index_format.read_index_file` with ``mmap=True``)."""
        ivf: Any = faiss.downcast_index(index)
        if (
            not isinstance(ivf, faiss.IndexIVFScalarQuantizer)
            or ivf.metric_type != faiss.METRIC_INNER_PRODUCT
            or ivf.sq.qtype != faiss.ScalarQuantizer.QT_8bit
            or ivf.invlists is None
        ):
            return None
        invlists = faiss.downcast_InvertedLists(ivf.invlists)
        in_memory = isinstance(invlists, faiss.ArrayInvertedLists)
        mapped = isinstance(invlists, faiss.OnDiskInvertedLists) and invlists.read_only
        if not (in_memory or mapped):
            return None
        return cls(index, ivf)

    @property
    def nprobe(self) -> int:
        return min(int(self._ivf.nprobe), self.nlist)

    @property
    def codes_mapped(self) -> bool:
        """Whether `codes` is a view of the index file's mapping (no private copy)."""
        return self._mapped

    @property
    def nbytes(self) -> int:
        """Private memory of the scanner's own arrays (mapped codes are not counted: they
        are the page cache's, shared with every process mapping the index file)."""
        codes = 0 if self.codes_mapped else self.codes.nbytes
        return int(codes + self.labels.nbytes + self.centroids.nbytes + self.starts.nbytes)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """``(scores [Q, k], labels [Q, k])`` best first; -inf / -1 where fewer than k."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        nprobe = self.nprobe
        if nprobe == 0 or len(self.labels) == 0:
            return scores, labels
        heap_scores = np.empty(k, dtype=np.float32)
        heap_rows = np.empty(k, dtype=np.int64)
        buffer = np.empty(max(self._longest, 1), dtype=np.float32)
        coarse = np.empty(self.nlist, dtype=np.float32)
        for q, query in enumerate(queries):
            # Coarse scores in compiled code, not numpy's BLAS, whose idle threads spin
            # between the service's small batches; then the nprobe best lists, best first.
            _dot_rows(self.centroids, query, coarse)
            if nprobe < self.nlist:
                probe = np.argpartition(-coarse, nprobe - 1)[:nprobe]
            else:
                probe = np.arange(self.nlist)
            probe = probe[np.argsort(-coarse[probe], kind="stable")]
            common = np.float32(np.dot(query, self._offset))
            if self.by_residual:
                bases = coarse[probe] + common  # float32
            else:
                bases = np.full(nprobe, common, dtype=np.float32)
            filled = _scan_lists(
                self.codes,
                self.starts,
                self.offsets,
                probe.astype(np.int64, copy=False),
                bases,
                query * self._scale,  # float32 weights of the codes
                k,
                heap_scores,
                heap_rows,
                buffer,
            )
            order = np.argsort(-heap_scores[:filled], kind="stable")
            scores[q, :filled] = heap_scores[:filled][order]
            labels[q, :filled] = self.labels[heap_rows[:filled][order]]
        return scores, labels


def _copy_ids(invlists: Any, list_no: int, labels: IntArray) -> None:
    """Copy one inverted list's ids into `labels` (contiguous, the list's length)."""
    ids = invlists.get_ids(list_no)
    try:
        faiss.memcpy(faiss.swig_ptr(labels), ids, labels.nbytes)
    finally:
        invlists.release_ids(list_no, ids)


def _copy_codes(invlists: Any, list_no: int, codes: npt.NDArray[np.uint8]) -> None:
    """Copy one inverted list's codes into `codes` (contiguous, length x code size bytes)."""
    list_codes = invlists.get_codes(list_no)
    try:
        faiss.memcpy(faiss.swig_ptr(codes), list_codes, codes.nbytes)
    finally:
        invlists.release_codes(list_no, list_codes)
