"""FAISS index choice, training, filling and search-parameter tuning for the index job.

Default factory by catalog size N (inner product over L2-normalised embeddings):

    N <= 200,000    "Flat"              exact; 1M x 64 floats would be 256 MB too,
                                        but exact search at k=1000 costs ~N*D per query
    N > 200,000     "IVF{nlist},SQ8"    nlist = 4 sqrt(N) (4,000 at 1M); 8-bit scalar codes:
                                        ~4x smaller than Flat (253 -> 70 MiB at 1M x 64) and
                                        the same recall, and at k = 1000 a query scans a
                                        fifth of the catalog or more, so the scan is
                                        memory-bound: the smaller codes cut its time by a third

Search params are not guessed: `tune_search_params` tries nprobe (IVF) or efSearch (HNSW)
in increasing cost order on held-out real queries, then bisects between the last setting
that missed and the first that reached the target, and keeps the cheapest setting whose
ANN recall@k against exact search reaches it. Measured by bench/bench_index.py on the
1M-item synthetic catalog with a model trained one epoch (D = 64, k = 1000, 300 held-out
real queries, one thread, 2-core AMD EPYC machine shared with another job;
bench/results/bench_index_1m_trained.txt), each at the nprobe its tuning chose:

    IVF4000,Flat   nprobe=896   recall 0.966   253 MiB   batch-1 3.25 ms   batch-64 208 ms
    IVF4000,SQ8    nprobe=896   recall 0.964    70 MiB   batch-1 2.20 ms   batch-64 137 ms
    IVF1024,SQ8    nprobe=448   recall 0.966    69 MiB   batch-1 2.88 ms   batch-64 172 ms

(the default is IVF4000,SQ8; without the bisection its tuning stops at nprobe 1024.)
A briefly trained model's embeddings are far easier: IVF4000 at nprobe=256 reached 0.965
(bench/results/bench_index_1m.txt); a trained one needs ~20 % of the lists for 0.95.

Example:
    >>> choose_factory(1_000, 64), choose_factory(1_000_000, 64), choose_factory(10_000_000, 64)
    ('Flat', 'IVF4000,SQ8', 'IVF12649,SQ8')
    >>> default_nlist(1_000_000)
    4000
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch

from index.recall import recall_against_exact
from retrieval.index_format import apply_search_params, assemble_shards, shard_indexes
from retrieval.ranking import exact_top_k_arrays
from retrieval.searchers import faiss_has_gpu

logger = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 200_000  # exact search up to this catalog size
TRAIN_POINTS_PER_LIST = 40  # k-means sample per coarse centroid (faiss warns below 39)
MIN_TRAIN_POINTS = 20_000  # PQ / SQ training needs a few thousand vectors at least
ADD_CHUNK_ROWS = 65_536  # vectors added per `index.add` call (bounded extra memory)
EXACT_BLOCK_ROWS = 65_536  # catalog rows scored per block in exact search (Q x block floats)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def default_nlist(num_items: int) -> int:
    """Coarse lists of an IVF index: 4 sqrt(N), the usual rule of thumb."""
    return max(1, round(4 * math.sqrt(num_items)))


def choose_factory(num_items: int, dim: int) -> str:
    """The default `index_factory` string for a catalog of `num_items` vectors of `dim`."""
    if num_items < 1 or dim < 1:
        raise ValueError(f"`num_items` and `dim` must be >= 1; got {num_items}, {dim}")
    if num_items <= FLAT_MAX_ITEMS:
        return "Flat"
    return f"IVF{default_nlist(num_items)},SQ8"


def create_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string; a bad string is a ValueError."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ValueError(
            f"`factory` {factory!r} is not a valid FAISS index_factory string ({first_line})"
        ) from exc
    return index


def shard_bounds(num_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, end) of `shard`'s contiguous slice (torchrun ranks, index shards).

    >>> [shard_bounds(10, r, 3) for r in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    return num_items * shard // num_shards, num_items * (shard + 1) // num_shards


def ivf_of(index: faiss.Index) -> Any:
    """The IVF part of an index (through refine/pre-transform wrappers; of the first part
    of a `faiss.IndexShards`, whose parts share one trained state), or None."""
    parts = shard_indexes(index)
    if parts is not None:
        return ivf_of(parts[0])
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def hnsw_of(index: faiss.Index) -> Any:
    """The HNSW index inside `index` (maybe behind a refine wrapper), or None."""
    parts = shard_indexes(index)
    if parts is not None:
        return hnsw_of(parts[0])
    candidate = faiss.downcast_index(index)
    if isinstance(candidate, faiss.IndexRefine):
        candidate = faiss.downcast_index(candidate.base_index)
    return candidate if hasattr(candidate, "hnsw") else None


def train_sample_size(index: faiss.Index, num_items: int) -> int:
    """How many vectors to train on: 0 for an index that needs no training."""
    if index.is_trained:
        return 0
    ivf = ivf_of(index)
    wanted = MIN_TRAIN_POINTS
    if ivf is not None:
        if num_items < ivf.nlist:
            raise ValueError(
                f"`factory` asks for {ivf.nlist} inverted lists but the catalog has only "
                f"{num_items} items; use fewer lists or 'Flat'"
            )
        wanted = max(wanted, TRAIN_POINTS_PER_LIST * ivf.nlist)
    return min(num_items, wanted)


def sample_rows(num_items: int, size: int, seed: int) -> IntArray:
    """`size` distinct sorted rows out of `num_items` (sorted: sequential reads of a memmap)."""
    rng = np.random.default_rng(seed)
    if size >= num_items:
        return np.arange(num_items, dtype=np.int64)
    return np.sort(rng.choice(num_items, size=size, replace=False)).astype(np.int64)


def _to_gpu(index: faiss.Index) -> tuple[Any, Any] | None:
    """(gpu index, resources) when faiss-gpu can hold this index type, else None."""
    if not faiss_has_gpu():
        return None
    resources = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except RuntimeError as exc:  # e.g. HNSW has no GPU counterpart
        logger.warning(
            "index type %s has no FAISS GPU version (%s); building on CPU",
            type(index).__name__,
            exc,
        )
        return None


# IVF indexes whose coarse quantizer is a flat index are trained and filled with torch:
# this faiss-cpu wheel's BLAS runs k-means and list assignment ~5x slower than torch's on
# the 2-core development machine (bench/bench_index.py). The result is an ordinary FAISS
# index: the same centroids in its quantizer, each vector in the list of its nearest one.
TORCH_IVF_TYPES = ("IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ")
KMEANS_CHUNK_ROWS = 8_192  # rows scored against all centroids at once (8192 x K floats)


def torch_ivf_of(index: faiss.Index) -> Any:
    """The index itself (downcast) when it is a bare IVF over a flat quantizer, else None."""
    concrete: Any = faiss.downcast_index(index)
    if type(concrete).__name__ not in TORCH_IVF_TYPES:
        return None
    quantizer = faiss.downcast_index(concrete.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal:
        return None
    return concrete


@torch.inference_mode()
def assign_to_centroids(
    vectors: FloatArray | torch.Tensor, centroids: torch.Tensor, chunk_rows: int = KMEANS_CHUNK_ROWS
) -> torch.Tensor:
    """Index of the max-inner-product centroid of each row: int64 `[N]` on the CPU.

    The score and input buffers are allocated once and reused: a fresh `[chunk, K]`
    allocation per chunk is an mmap plus a page fault per 4 KiB, which cost more system
    time than the matrix products themselves on the development machine.

    Args:
        vectors: `[N, D]` rows (numpy, memmap or a tensor on `centroids.device`).
        centroids: `[K, D]` unit vectors.
    """
    num, dim = vectors.shape
    rows = max(1, min(chunk_rows, num))
    device = centroids.device
    out = torch.empty(num, dtype=torch.int64)
    scores = torch.empty((rows, centroids.shape[0]), device=device)  # (chunk, K), reused
    staging = None if isinstance(vectors, torch.Tensor) else np.empty((rows, dim), np.float32)
    centroids_t = centroids.T  # (D, K)
    for start in range(0, num, rows):
        end = min(start + rows, num)
        if isinstance(vectors, torch.Tensor):
            block = vectors[start:end]
        else:
            assert staging is not None
            np.copyto(staging[: end - start], vectors[start:end])  # memmaps are read-only
            block = torch.from_numpy(staging[: end - start]).to(device)
        torch.mm(block, centroids_t, out=scores[: end - start])
        out[start:end] = scores[: end - start].argmax(dim=1).cpu()
    return out


@torch.inference_mode()
def spherical_kmeans(
    sample: FloatArray, num_clusters: int, *, niter: int = 10, seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """Spherical k-means (Dhillon & Modha, Machine Learning 2001) on unit vectors.

    Assign each x_i to argmax_j <x_i, c_j>; then c_j = normalize(sum of its x_i). A cluster
    left empty restarts from a random sample point. Initial centroids: distinct random
    sample points (seeded).

    Args:
        sample: `[n, D]` float32 unit vectors, n >= `num_clusters`.
        num_clusters: K.
        niter: assignment / update rounds.
        seed: seed of the initial centroids and of restarts.
        device: torch device the work runs on.

    Returns:
        `[K, D]` float32 unit centroids on `device`.

    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> c = spherical_kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), 2, seed=0)
    >>> a, b, c_, d = assign_to_centroids(x, c).tolist()  # two tight pairs, two clusters
    >>> a == b != c_ == d
    True
    """
    num, dim = sample.shape
    if num < num_clusters:
        raise ValueError(f"k-means needs >= {num_clusters} points; got {num}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(device)
    first = torch.randperm(num, generator=generator)[:num_clusters].to(device)
    centroids = x[first].clone()  # (K, D)
    for _ in range(niter):
        labels = assign_to_centroids(x, centroids).to(device)  # (n,)
        sums = torch.zeros(num_clusters, dim, device=device).index_add_(0, labels, x)
        empty = (torch.bincount(labels, minlength=num_clusters) == 0).nonzero().flatten()
        if len(empty):
            restart = torch.randint(num, (len(empty),), generator=generator).to(device)
            sums[empty] = x[restart]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def train_ivf_with_torch(ivf: Any, sample: FloatArray, *, seed: int, device: str) -> torch.Tensor:
    """Train `ivf` (see `torch_ivf_of`) as `IndexIVF::train` does, with torch k-means.

    The coarse centroids come from `spherical_kmeans`; the list encoder (SQ, PQ) is then
    trained like FAISS does it: on at most `train_encoder_num_vectors()` random sample
    rows, given as residuals to their centroid when the index encodes residuals.
    Returns the centroids (on `device`).
    """
    niter = int(ivf.cp.niter)
    centroids = spherical_kmeans(sample, int(ivf.nlist), niter=niter, seed=seed, device=device)
    centroids_np = np.ascontiguousarray(centroids.cpu().numpy())
    ivf.quantizer.add(centroids_np)
    limit = int(ivf.train_encoder_num_vectors())
    if 0 < limit < len(sample):
        chosen = np.random.default_rng(seed).permutation(len(sample))[:limit]
        sample = sample[np.sort(chosen)]
    lists = assign_to_centroids(sample, centroids).numpy()  # (n,)
    data = sample - centroids_np[lists] if ivf.by_residual else sample
    data = np.ascontiguousarray(data, dtype=np.float32)
    ivf.train_encoder(len(data), faiss.swig_ptr(data), faiss.swig_ptr(lists))
    ivf.is_trained = True
    return centroids


def train_and_fill(
    factory: str,
    vectors: FloatArray,
    *,
    use_gpu: bool = False,
    seed: int = 0,
    train_size: int = 0,
    num_shards: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """Create the index, train it on a sample of `vectors`, add every row; CPU index back.

    Args:
        factory: FAISS index_factory string (inner-product metric).
        vectors: `[N, D]` float32, L2-normalised (a memmap is fine: read in chunks).
        use_gpu: train and add on the GPU when faiss-gpu supports the index type; the
            returned index is always a CPU copy (what gets written).
        seed: seed of the training sample and of k-means.
        train_size: vectors to train on (0 = `train_sample_size`).
        num_shards: > 1 returns a `faiss.IndexShards` of that many parts: the index is
            trained once (on a sample of all rows), copied per part, and part s filled with
            the contiguous rows `shard_bounds(N, s, num_shards)`, so labels and (for Flat
            and IVF, whose parts share the coarse quantizer) results equal the single index.
        progress: called with the number of rows added after each chunk.

    Returns:
        (index, info) with info = train_size, train_seconds, add_seconds, device, engine,
        num_shards.
    """
    num_items, dim = vectors.shape
    if not 1 <= num_shards <= num_items:
        raise ValueError(f"`num_shards` must be in [1, {num_items}] (the rows); got {num_shards}")
    index = create_index(factory, dim)
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf.cp.spherical = True  # centroids on the unit sphere: assignment by inner product
    size = train_sample_size(index, num_items)
    if size and train_size:
        size = min(max(train_size, ivf.nlist if ivf is not None else 1), num_items)
    fast = torch_ivf_of(index)
    gpu = None if fast is not None or not use_gpu else _to_gpu(index)
    work = gpu[0] if gpu is not None else index
    torch_device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    rows = sample_rows(num_items, size, seed) if size else np.zeros(0, np.int64)
    started = time.perf_counter()
    centroids: torch.Tensor | None = None
    if size:
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        logger.info("training %s on %d of %d vectors", factory, size, num_items)
        try:
            if fast is not None:
                centroids = train_ivf_with_torch(fast, sample, seed=seed, device=torch_device)
            else:
                work.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"training index {factory!r} failed: {exc}") from exc
        del sample
    train_seconds = time.perf_counter() - started

    def fill(target: Any, start: int, end: int) -> None:
        """Add rows [start, end) to `target` (local labels 0 .. end - start - 1)."""
        concrete: Any = faiss.downcast_index(target) if fast is not None else target
        for first in range(start, end, ADD_CHUNK_ROWS):
            last = min(first + ADD_CHUNK_ROWS, end)
            chunk = np.ascontiguousarray(vectors[first:last], dtype=np.float32)
            if fast is not None and centroids is not None:
                lists = assign_to_centroids(chunk, centroids).numpy()  # (n,) int64
                concrete.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(lists))
            else:
                target.add(chunk)
            if progress is not None:
                progress(len(chunk))

    started = time.perf_counter()
    if num_shards == 1:
        fill(work, 0, num_items)
        if gpu is not None:
            index = faiss.index_gpu_to_cpu(work)
    else:
        trained = faiss.index_gpu_to_cpu(work) if gpu is not None else index  # trained, empty
        parts = []
        for shard in range(num_shards):
            part = faiss.clone_index(trained)
            on_gpu = _to_gpu(part) if gpu is not None else None
            fill(
                on_gpu[0] if on_gpu is not None else part,
                *shard_bounds(num_items, shard, num_shards),
            )
            parts.append(faiss.index_gpu_to_cpu(on_gpu[0]) if on_gpu is not None else part)
        index = assemble_shards(parts)
    add_seconds = time.perf_counter() - started
    device = "cuda" if gpu is not None or (fast is not None and torch_device == "cuda") else "cpu"
    info = {
        "train_size": int(size),
        "train_seconds": round(train_seconds, 3),
        "add_seconds": round(add_seconds, 3),
        "device": device,
        "engine": "torch k-means + faiss add_core" if fast is not None else "faiss",
        "num_shards": num_shards,
    }
    logger.info(
        "index %s%s: trained in %.1fs, %d vectors added in %.1fs on %s",
        factory,
        f" x {num_shards} shards" if num_shards > 1 else "",
        train_seconds,
        num_items,
        add_seconds,
        f"{device} ({info['engine']})",
    )
    return index, info


# --------------------------------------------------------------------------- exact search


def exact_search(
    queries: FloatArray,
    vectors: FloatArray,
    k: int,
    *,
    device: str = "cpu",
    block_rows: int = EXACT_BLOCK_ROWS,
) -> tuple[FloatArray, IntArray]:
    """Exact inner-product top-k over `vectors` read block by block (memmap-friendly): the
    ground truth of the recall gate, `retrieval.ranking.exact_top_k_arrays` with every query
    in one block, so the catalog is read once.

    Each block of `block_rows` catalog rows is scored against all queries with one matrix
    product and merged into a running top-k, with torch on `device` (CUDA: the exact
    fallback when faiss has no GPU); ties go to the lower row.

    Returns:
        (scores [Q, k] float32 descending, rows [Q, k] int64; -inf / -1 past N).
    """
    return exact_top_k_arrays(queries, vectors, k, device=device, item_chunk_size=block_rows)


def true_scores(queries: FloatArray, vectors: FloatArray, rows: IntArray) -> FloatArray:
    """Exact inner product of each query with each of its result rows (-1 rows: -inf)."""
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    for q in range(len(queries)):
        valid = rows[q] >= 0
        picked = rows[q][valid]
        order = np.argsort(picked)  # sorted reads of a memmap
        gathered = np.empty((len(picked), vectors.shape[1]), dtype=np.float32)
        gathered[order] = vectors[picked[order]]
        out[q, valid] = gathered @ queries[q]
    return out


@dataclass
class GroundTruth:
    """Queries with their exact top-k, to measure an ANN index against."""

    queries: FloatArray
    scores: FloatArray  # exact top-k scores [Q, k], descending
    k: int
    num_items: int

    def subset(self, rows: IntArray) -> GroundTruth:
        return GroundTruth(self.queries[rows], self.scores[rows], self.k, self.num_items)


def measure_recall(
    index: faiss.Index, vectors: FloatArray, truth: GroundTruth, params: Mapping[str, Any]
) -> tuple[float, float]:
    """(recall@k against exact, search seconds) of `index` under `params` on `truth`."""
    apply_search_params(index, params)
    started = time.perf_counter()
    _, rows = index.search(truth.queries, truth.k)
    seconds = time.perf_counter() - started
    rows = rows.astype(np.int64)
    recall = recall_against_exact(
        rows, true_scores(truth.queries, vectors, rows), truth.scores, truth.num_items
    )
    return recall, seconds


def candidate_search_params(index: faiss.Index, k: int) -> list[dict[str, Any]]:
    """Search settings in increasing cost order ([{}] when the index has none to tune)."""
    ivf = ivf_of(index)
    if ivf is not None:
        values = [p for p in (2**i for i in range(20)) if p < ivf.nlist] + [int(ivf.nlist)]
        return [{"nprobe": p} for p in values if p >= min(8, ivf.nlist)]
    hnsw = hnsw_of(index)
    if hnsw is not None:
        return [{"efSearch": int(k * f)} for f in (1, 1.5, 2, 3, 4, 6, 8)]
    return [{}]


def _bisect_knob(
    missed: dict[str, Any], passed: dict[str, Any], reaches: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The smallest value of the one knob in `passed` that still reaches the target, found
    by bisection between `missed` (below the target) and `passed`, in steps >= passed / 16.

    >>> _bisect_knob({"nprobe": 512}, {"nprobe": 1024}, lambda p: p["nprobe"] >= 700)
    {'nprobe': 704}
    """
    (name, high), (_, low) = next(iter(passed.items())), next(iter(missed.items()))
    step = max(1, int(high) // 16)
    while int(high) - int(low) > step:
        middle = (int(low) + int(high)) // 2
        if reaches({name: middle}):
            high = middle
        else:
            low = middle
    return {name: int(high)}


def tune_search_params(
    index: faiss.Index,
    vectors: FloatArray,
    truth: GroundTruth,
    target: float,
    *,
    explicit: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cheapest search setting reaching `target` recall on `truth` (or `explicit`).

    The candidates (`candidate_search_params`) double in cost; once one reaches the target,
    the single knob (nprobe or efSearch) is bisected between it and the candidate before
    it, down to steps of a sixteenth of the passing value: a 1M-item IVF that misses at
    nprobe 512 and passes at 1024 usually passes near 768-960, up to a third less search
    work (each step costs one recall measurement at build time).

    Returns:
        (chosen params, trials), each trial {params, recall, seconds}. When no candidate
        reaches the target the most expensive one tried is returned (the gate decides).
    """
    candidates = [dict(explicit)] if explicit else candidate_search_params(index, truth.k)
    trials: list[dict[str, Any]] = []

    def reaches(params: dict[str, Any]) -> bool:
        recall, seconds = measure_recall(index, vectors, truth, params)
        trials.append({"params": params, "recall": round(recall, 5), "seconds": round(seconds, 4)})
        logger.info(
            "search params %s: recall@%d %.4f (%.2fs)", params or "-", truth.k, recall, seconds
        )
        return recall >= target

    chosen = candidates[-1]
    for i, params in enumerate(candidates):
        if reaches(params):
            chosen = params
            if i > 0 and len(params) == 1:
                chosen = _bisect_knob(candidates[i - 1], params, reaches)
            break
    apply_search_params(index, chosen)
    return chosen, trials
