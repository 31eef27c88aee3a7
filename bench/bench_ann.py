"""ANN libraries side by side at k = 1000 on this system's embeddings: FAISS (IVF-SQ8, IVF-PQ
fast-scan + refine, IVF-RaBitQ fast-scan + refine, HNSW, IVF with an HNSW coarse quantizer),
the project's IVF-SQ8 list scanner (`retrieval.ivf_scan`), ScaNN, hnswlib and usearch.

Usage::

    # the 1M catalog embedded with a bundle's item tower, real test-split queries; keep the
    # vectors so later runs skip the embedding:
    retrieval data synth --items 1000000 --users 20000 --interactions 400000 --seed 0 --out D
    retrieval train --data D --out M --config synth --epochs 1  # synth: no EASE/ALS baselines
    python bench/bench_ann.py --model M --data D --save-embeddings E
    # the same vectors again (float32, L2-normalised .npy files):
    python bench/bench_ann.py --embeddings E/items.npy --queries E/queries.npy
    # a subset, a smoke run:
    python bench/bench_ann.py --embeddings E/items.npy --queries E/queries.npy \
        --candidates ivf-sq8,scann --quick --out /tmp/ann.json --md /tmp/ann.md

Candidates (`--candidates`, comma-separated; a library that is not installed is reported as
unavailable with the reason, not skipped silently):

    ivf-sq8               IVF{nlist},SQ8 (the index job's default above 200k items), searched
                          by FAISS and by `retrieval.ivf_scan.ListScanner` (two paths)
    ivf-many-sq8          IVF{coarse_nlist},SQ8: more lists, flat coarse quantizer, searched
                          by FAISS and by the list scanner (two paths)
    ivf-hnsw-sq8          IVF{coarse_nlist}_HNSW32,SQ8: more lists behind an HNSW coarse
                          quantizer, so each probe scans fewer items; FAISS and the scanner
                          (whose coarse step is exact over all centroids)
    ivf-pq-fs-refine      IVF{nlist},PQ{D/2}x4fs,RFlat: 4-bit PQ fast-scan, exact re-rank
    ivf-rabitq-fs-refine  IVF{nlist},RaBitQfs,RFlat: 1-bit RaBitQ fast-scan, exact re-rank
    faiss-hnsw            HNSW32,Flat
    hnswlib               hnswlib, M = 32, space "ip"
    scann                 ScaNN tree + anisotropic hashing (2 dims / block) + float re-order
    usearch-f32           usearch HNSW, connectivity 32, metric "ip", float32 vectors
    usearch-i8            the same with int8 vectors

IVF candidates share nlist = 4 sqrt(N) (`--nlist`; ScaNN's leaves too); graph candidates share
M = 32 and construction beam 128. Procedure per path: build (seconds, serialised bytes, RSS
growth), tune on one half of the queries for the cheapest setting whose recall@k against
exact search reaches `--recall-floor` (the main knob walked up a geometric grid, then
bisected down to steps of 1/32; a second knob such as the refine factor tried at a few
values, each one's cheapest main setting timed at batch 1 and the fastest kept), then on
the other half: recall@k, and latency p50 / p99 of batch-1 searches on one thread (FAISS,
torch, numba, BLAS, ScaNN, hnswlib and usearch all limited to one) after a warm-up. Builds
and recall measurements use `--threads`. Exact truth: faiss IndexFlatIP, queries batched.
Each index is freed before the next is built.

The report (JSON on stdout and in `--out`, markdown in `--md`) records the machine and a
speed probe (seconds a Python loop of 10^7 additions takes, at start and end), and applies
the rule for the default CPU search: the fastest maintained-library path, unless the
hand-written scanner takes at least 15 % less time at the floor (then keep the scanner and
say why), with memory and build time weighed beside it (`recommend`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import embed_catalog_to_file, rss_mib
from common import emit, machine

from index.factory import (
    ADD_CHUNK_ROWS,
    GroundTruth,
    assign_to_centroids,
    choose_factory,
    create_index,
    default_nlist,
    sample_rows,
    train_and_fill,
    train_ivf_with_torch,
    train_sample_size,
    true_scores,
)
from index.recall import recall_against_exact
from retrieval.index_format import apply_search_params

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Setting = dict[str, int]

GROUPS = (
    "ivf-sq8",
    "ivf-many-sq8",
    "ivf-hnsw-sq8",
    "ivf-pq-fs-refine",
    "ivf-rabitq-fs-refine",
    "faiss-hnsw",
    "hnswlib",
    "scann",
    "usearch-f32",
    "usearch-i8",
)
GRAPH_M = 32  # links per node of every graph index (FAISS HNSW, hnswlib, usearch)
GRAPH_EF_CONSTRUCTION = 128  # construction beam of every graph index
GRAPH_EF_FACTORS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16)  # search beam grid, in units of k
SCANN_DIMS_PER_BLOCK = 2  # anisotropic hashing: 4-bit codes over 2 dims, as PQ{D/2}x4fs
SCANN_AH_THRESHOLD = 0.2  # ScaNN's recommended anisotropic threshold for unit vectors
TUNE_STEPS = 32  # bisection stops at steps of 1/32 of the passing value (~0.3 % recall)
UNIT_NORM_TOLERANCE = 1e-3
EXACT_QUERY_BATCH = 256


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON report)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def python_loop_seconds(additions: int = 10**7) -> float:
    """Seconds a plain Python loop of `additions` integer additions takes (a speed probe)."""
    started = time.perf_counter()
    total = 0
    for i in range(additions):
        total += i
    return round(time.perf_counter() - started, 3)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries compared (None: not installed)."""
    versions: dict[str, str | None] = {"faiss": faiss.__version__}
    for name in ("numba", "scann", "hnswlib", "usearch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- inputs


def check_unit_rows(name: str, array: npt.NDArray[Any]) -> FloatArray:
    """`array` as float32 `[N, D]` rows of unit L2 norm, or a ValueError naming `name`.

    >>> check_unit_rows("queries", np.array([[0.6, 0.8]], np.float32)).shape
    (1, 2)
    >>> check_unit_rows("queries", np.array([[3.0, 4.0]], np.float32))
    Traceback (most recent call last):
    ...
    ValueError: `queries` must hold L2-normalised rows; row 0 has norm 5
    """
    if array.dtype != np.float32 or array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"`{name}` must be a non-empty float32 [N, D] array; got {array.dtype} {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` holds non-finite values")
    norms = np.linalg.norm(array, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > UNIT_NORM_TOLERANCE)
    if len(bad):
        raise ValueError(
            f"`{name}` must hold L2-normalised rows; row {bad[0]} has norm {norms[bad[0]]:.4g}"
        )
    return np.ascontiguousarray(array)


def normalise_rows(array: FloatArray) -> FloatArray:
    """Rows scaled to unit L2 norm (inner-product rankings are unchanged for queries)."""
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


def embed_with_model(
    model: Path, data: Path, max_queries: int, seed: int, work: Path
) -> tuple[FloatArray, FloatArray, dict[str, Any]]:
    """The catalog embedded with the bundle's item tower (via a memmap, as the index job
    and bench/bench_index.py do) and real query embeddings of test-split users.

    Returns:
        (items [N, D], queries [Q, D], info): unit rows, float32, in memory.
    """
    from index.build import EMBEDDINGS_FILE, gate_query_embeddings, open_catalog
    from retrieval.bundle import load_bundle

    bundle = load_bundle(model)
    catalog = open_catalog(data, bundle.encoder)
    num_items = catalog.num_items
    path = work / EMBEDDINGS_FILE
    embed_seconds = embed_catalog_to_file(bundle, catalog, path)
    items = np.load(path)  # into memory: every library below wants a plain array
    path.unlink()
    queries, source = gate_query_embeddings(bundle, data, max_queries, seed, "cpu")
    info = {
        "source": f"catalog of {data} embedded by {model}",
        "embed_seconds": round(embed_seconds, 1),
        "items_per_second": round(num_items / max(embed_seconds, 1e-9)),
        "query_source": source,
    }
    return items, normalise_rows(queries), info


def save_array(path: Path, array: FloatArray) -> None:
    """`np.save` to a temporary name beside `path`, fsync, then rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_text(path: Path, text: str) -> None:
    """Write `text` atomically (temporary name in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def exact_top_k(vectors: FloatArray, queries: FloatArray, k: int) -> tuple[FloatArray, float]:
    """Exact inner-product top-k scores `[Q, k]` (faiss IndexFlatIP, queries in batches)
    and the seconds the searches took."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    for first in range(0, len(vectors), ADD_CHUNK_ROWS):
        flat.add(np.ascontiguousarray(vectors[first : first + ADD_CHUNK_ROWS]))
    scores = np.empty((len(queries), k), dtype=np.float32)
    started = time.perf_counter()
    for first in range(0, len(queries), EXACT_QUERY_BATCH):
        block = np.ascontiguousarray(queries[first : first + EXACT_QUERY_BATCH])
        scores[first : first + len(block)] = flat.search(block, k)[0]
    return scores, time.perf_counter() - started


def recall_of(rows: IntArray, truth: GroundTruth, vectors: FloatArray) -> float:
    """Recall@k of ANN `rows [Q, k]` against `truth`, ties at the k-th score counted as hits
    (`index.recall.recall_against_exact`, the index job's own check)."""
    rows = np.asarray(rows, dtype=np.int64)
    return recall_against_exact(
        rows, true_scores(truth.queries, vectors, rows), truth.scores, truth.num_items
    )


# --------------------------------------------------------------------------- search paths


class ThreadCount:
    """The threads a library's search passes on each call (`SearchPath.set_threads` is
    `set`), for libraries that take a thread count per search rather than globally."""

    def __init__(self, count: int) -> None:
        self.count = count

    def set(self, count: int) -> None:
        self.count = count


def _no_threads(_: int) -> None:
    """`SearchPath.set_threads` of a path whose library has no thread setting of its own."""


@dataclass
class SearchPath:
    """One way of answering top-k over one built index, with the knobs its tuning turns.

    Attributes:
        name: e.g. "ivf-sq8/scanner".
        group: the `--candidates` name that built it.
        library: what answers the queries, with its version.
        maintained: True for a maintained library, False for the project's own scanner.
        description: the index: factory string or library configuration.
        search: ``queries [Q, D] float32 -> rows [Q, k] int64`` (-1 where empty).
        apply: sets a search setting; returns the parameters it set (for the report).
        set_threads: threads the library may use in `search`.
        knob: the main search knob (walked up `grid`).
        grid: ascending values of `knob`.
        secondary: settings of other knobs, each tried with its own cheapest `knob`;
            ordered so that each later one needs no more of `knob` ([{}]: none).
        index_bytes: serialised size (or the library's own figure, see notes).
        build: build details: ``seconds`` (wall time of the build, training included),
            ``rss_delta_mib`` (resident memory growth of this process over the build),
            train / add seconds, engine, ...
        notes: what a reader needs beside the figures.
    """

    name: str
    group: str
    library: str
    maintained: bool
    description: str
    search: Callable[[FloatArray, int], IntArray]
    apply: Callable[[Setting], dict[str, Any]]
    knob: str
    grid: list[int]
    index_bytes: int
    build: dict[str, Any]
    secondary: list[Setting] = field(default_factory=lambda: [{}])
    set_threads: Callable[[int], None] = _no_threads
    notes: list[str] = field(default_factory=list)

    @property
    def build_seconds(self) -> float:
        return float(self.build["seconds"])

    @property
    def rss_delta_mib(self) -> float:
        return float(self.build["rss_delta_mib"])


@dataclass
class BuildContext:
    """What every candidate's build reads."""

    vectors: FloatArray  # [N, D] unit rows
    k: int
    nlist: int  # lists of the IVF candidates (and ScaNN leaves)
    coarse_nlist: int  # lists of the HNSW-coarse IVF candidate
    threads: int  # build / tuning threads
    seed: int
    work: Path  # scratch folder (serialised sizes)
    quick: bool


def ivf_grid(nlist: int) -> list[int]:
    """nprobe values to walk: powers of two from 8 (from 1 for 8 lists or fewer) to `nlist`.

    >>> ivf_grid(100), ivf_grid(4)
    ([8, 16, 32, 64, 100], [1, 2, 4])
    """
    start = 8 if nlist > 8 else 1
    values = [2**i for i in range(32) if start <= 2**i < nlist]
    return [*values, nlist]


def graph_grid(k: int) -> list[int]:
    """Search-beam values of a graph index, from k (a beam below k cannot return k).

    >>> graph_grid(10)
    [10, 15, 20, 30, 40, 60, 80, 120, 160]
    """
    return [round(k * factor) for factor in GRAPH_EF_FACTORS]


def coarse_hnsw_nlist(num_items: int) -> int:
    """Lists of the HNSW-coarse IVF: the power of two nearest 16 sqrt(N), 4x the default.

    >>> coarse_hnsw_nlist(1_000_000), coarse_hnsw_nlist(30_000)
    (16384, 2048)
    """
    return int(2 ** round(math.log2(16 * math.sqrt(num_items))))


def faiss_bytes(index: faiss.Index, work: Path) -> int:
    """Serialised size of a FAISS index (written to a scratch file, then removed)."""
    path = work / "sized.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Times the block and measures RSS growth: fills `seconds` and `rss_delta_mib`."""
    gc.collect()
    before, started = rss_mib(), time.perf_counter()
    figures: dict[str, float] = {}
    yield figures
    figures["seconds"] = round(time.perf_counter() - started, 2)
    gc.collect()
    figures["rss_delta_mib"] = round(rss_mib() - before, 1)


def faiss_path(
    name: str,
    group: str,
    index: faiss.Index,
    description: str,
    *,
    knob: str,
    grid: list[int],
    build: dict[str, Any],
    work: Path,
    secondary: list[Setting] | None = None,
    translate: Callable[[Setting], dict[str, Any]] | None = None,
    notes: list[str] | None = None,
) -> SearchPath:
    """A FAISS index searched by FAISS; `translate` maps a setting to its FAISS parameters
    (default: the setting itself, applied with `apply_search_params`)."""

    def search(queries: FloatArray, k: int) -> IntArray:
        return index.search(queries, k)[1]

    def apply(setting: Setting) -> dict[str, Any]:
        params = translate(setting) if translate else dict(setting)
        apply_search_params(index, params)
        return params

    return SearchPath(
        name=name,
        group=group,
        library=f"faiss {faiss.__version__}",
        maintained=True,
        description=description,
        search=search,
        apply=apply,
        set_threads=faiss.omp_set_num_threads,
        knob=knob,
        grid=grid,
        secondary=secondary or [{}],
        index_bytes=faiss_bytes(index, work),
        build=dict(build),
        notes=notes or [],
    )


def scanner_path(name: str, group: str, index: faiss.Index, base: SearchPath) -> SearchPath:
    """`retrieval.ivf_scan.ListScanner` over the IVF-SQ8 `index` that `base` searches: the
    service's "cpu (list scanner)" path, which keeps the FAISS index beside its own copy."""
    import numba

    from retrieval.ivf_scan import ListScanner

    with measured() as figures:
        scanner = ListScanner.from_index(index)
    if scanner is None:
        raise ValueError(f"{base.description}: ListScanner does not take this index")
    started = time.perf_counter()
    scanner.search(np.zeros((1, scanner.dim), dtype=np.float32), 1)  # compiles the kernels
    compile_seconds = time.perf_counter() - started

    def search(queries: FloatArray, k: int) -> IntArray:
        return scanner.search(queries, k)[1]

    def apply(setting: Setting) -> dict[str, Any]:
        apply_search_params(index, setting)  # the scanner reads nprobe from the index
        return dict(setting)

    most_threads = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))

    def set_threads(threads: int) -> None:
        numba.set_num_threads(max(1, min(threads, most_threads)))

    own_mib = scanner.nbytes / 2**20
    return SearchPath(
        name=name,
        group=group,
        library=f"retrieval.ivf_scan (numba {numba.__version__})",
        maintained=False,
        description=base.description,
        search=search,
        apply=apply,
        set_threads=set_threads,
        knob="nprobe",
        grid=ivf_grid(scanner.nlist),
        index_bytes=base.index_bytes + scanner.nbytes,
        build={
            **base.build,
            "seconds": round(base.build_seconds + figures["seconds"], 2),
            "rss_delta_mib": round(base.rss_delta_mib + figures["rss_delta_mib"], 1),
            "scanner_copy_seconds": figures["seconds"],
        },
        notes=[
            f"memory: the FAISS index plus the scanner's copy of codes and labels "
            f"({own_mib:.1f} MiB); coarse step exact over all {scanner.nlist} centroids",
            f"first search in this process {compile_seconds:.1f} s (the kernels compile once "
            f"per process)",
        ],
    )


def build_ivf_sq8(ctx: BuildContext, *, many_lists: bool = False) -> list[SearchPath]:
    """IVF-SQ8 with a flat (exact) coarse quantizer, as the index job builds it: `nlist`
    lists, or `coarse_nlist` with `many_lists` (fewer items scanned per probe, a costlier
    k-means)."""
    num_items, dim = ctx.vectors.shape
    nlist = ctx.coarse_nlist if many_lists else ctx.nlist
    group = "ivf-many-sq8" if many_lists else "ivf-sq8"
    factory = f"IVF{nlist},SQ8"
    with measured() as figures:
        index, info = train_and_fill(factory, ctx.vectors, seed=ctx.seed)
    notes = []
    if factory == choose_factory(num_items, dim):
        notes.append("the index job's default factory for this catalog")
    build = {**figures, "train_seconds": info["train_seconds"], "add_seconds": info["add_seconds"]}
    build["engine"] = info["engine"]
    base = faiss_path(
        f"{group}/faiss",
        group,
        index,
        factory,
        knob="nprobe",
        grid=ivf_grid(nlist),
        build=build,
        work=ctx.work,
        notes=notes,
    )
    return [base, scanner_path(f"{group}/scanner", group, index, base)]


def build_ivf_hnsw_sq8(ctx: BuildContext) -> list[SearchPath]:
    """IVF-SQ8 with `coarse_nlist` lists behind an HNSW coarse quantizer. Trained like the
    index job trains its flat-quantizer IVF (torch spherical k-means, FAISS's SQ training)
    and filled with exact list assignment; FAISS searches through the HNSW quantizer."""
    num_items, dim = ctx.vectors.shape
    factory = f"IVF{ctx.coarse_nlist}_HNSW{GRAPH_M},SQ8"
    with measured() as figures:
        index = create_index(factory, dim)
        ivf: Any = faiss.downcast_index(index)
        started = time.perf_counter()
        rows = sample_rows(num_items, train_sample_size(index, num_items), ctx.seed)
        sample = np.ascontiguousarray(ctx.vectors[rows])
        centroids = train_ivf_with_torch(ivf, sample, seed=ctx.seed, device="cpu")
        del sample
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for first in range(0, num_items, ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(ctx.vectors[first : first + ADD_CHUNK_ROWS])
            lists = assign_to_centroids(chunk, centroids).numpy()  # (n,) int64
            ivf.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(lists))
        add_seconds = time.perf_counter() - started
    build: dict[str, Any] = {**figures, "train_seconds": round(train_seconds, 2)}
    build |= {"add_seconds": round(add_seconds, 2), "engine": "torch k-means + faiss add_core"}
    factors = [1] if ctx.quick else [1, 2]

    def translate(setting: Setting) -> dict[str, Any]:
        nprobe = setting["nprobe"]
        return {"nprobe": nprobe, "quantizer_efSearch": nprobe * setting["ef_per_probe"]}

    base = faiss_path(
        "ivf-hnsw-sq8/faiss",
        "ivf-hnsw-sq8",
        index,
        factory,
        knob="nprobe",
        grid=ivf_grid(ctx.coarse_nlist),
        build=build,
        work=ctx.work,
        secondary=[{"ef_per_probe": f} for f in factors],
        translate=translate,
        notes=[f"coarse quantizer: HNSW{GRAPH_M} over {ctx.coarse_nlist} centroids"],
    )
    return [base, scanner_path("ivf-hnsw-sq8/scanner", "ivf-hnsw-sq8", index, base)]


def refine_path(ctx: BuildContext, group: str, factory: str, factors: list[int]) -> SearchPath:
    """An IVF fast-scan index with an exact re-rank (`IndexRefineFlat`): knobs nprobe and
    the re-rank factor (k_factor x k candidates re-scored with the float vectors)."""
    num_items, dim = ctx.vectors.shape
    with measured() as figures:
        index, info = train_and_fill(factory, ctx.vectors, seed=ctx.seed)
    build = {**figures, "train_seconds": info["train_seconds"], "add_seconds": info["add_seconds"]}
    build["engine"] = info["engine"]
    refine: Any = faiss.downcast_index(index)

    def apply(setting: Setting) -> dict[str, Any]:
        # ParameterSpace knows the refine factor as "k_factor_rf" (not among the project's
        # search params): set it on the wrapper itself.
        refine.k_factor = float(setting["k_factor"])
        apply_search_params(index, {"nprobe": setting["nprobe"]})
        return {"nprobe": setting["nprobe"], "k_factor": setting["k_factor"]}

    path = faiss_path(
        group,
        group,
        index,
        factory,
        knob="nprobe",
        grid=ivf_grid(ctx.nlist),
        build=build,
        work=ctx.work,
        secondary=[{"k_factor": f} for f in factors],
        notes=[f"the refine step keeps the float vectors ({num_items * dim * 4 / 2**20:.0f} MiB)"],
    )
    path.apply = apply
    return path


def build_ivf_pq_fs_refine(ctx: BuildContext) -> list[SearchPath]:
    dim = ctx.vectors.shape[1]
    if dim % 2:
        raise ValueError(f"PQ{dim / 2}x4fs needs an even dimension; got D = {dim}")
    factory = f"IVF{ctx.nlist},PQ{dim // 2}x4fs,RFlat"
    factors = [4] if ctx.quick else [1, 2, 4, 8]
    return [refine_path(ctx, "ivf-pq-fs-refine", factory, factors)]


def build_ivf_rabitq_fs_refine(ctx: BuildContext) -> list[SearchPath]:
    factory = f"IVF{ctx.nlist},RaBitQfs,RFlat"
    factors = [8] if ctx.quick else [2, 4, 8, 16]
    return [refine_path(ctx, "ivf-rabitq-fs-refine", factory, factors)]


def build_faiss_hnsw(ctx: BuildContext) -> list[SearchPath]:
    num_items, dim = ctx.vectors.shape
    factory = f"HNSW{GRAPH_M},Flat"
    with measured() as figures:
        index = create_index(factory, dim)
        hnsw: Any = faiss.downcast_index(index)
        hnsw.hnsw.efConstruction = GRAPH_EF_CONSTRUCTION
        for first in range(0, num_items, ADD_CHUNK_ROWS):
            index.add(np.ascontiguousarray(ctx.vectors[first : first + ADD_CHUNK_ROWS]))
    description = f"{factory}, efConstruction {GRAPH_EF_CONSTRUCTION}"
    return [
        faiss_path(
            "faiss-hnsw",
            "faiss-hnsw",
            index,
            description,
            knob="efSearch",
            grid=graph_grid(ctx.k),
            build=dict(figures),
            work=ctx.work,
        )
    ]


def build_hnswlib(ctx: BuildContext) -> list[SearchPath]:
    import hnswlib

    num_items, dim = ctx.vectors.shape
    with measured() as figures:
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(
            max_elements=num_items,
            M=GRAPH_M,
            ef_construction=GRAPH_EF_CONSTRUCTION,
            random_seed=ctx.seed,
        )
        for first in range(0, num_items, ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(ctx.vectors[first : first + ADD_CHUNK_ROWS])
            ids = np.arange(first, first + len(chunk), dtype=np.int64)
            index.add_items(chunk, ids, num_threads=ctx.threads)
    threads = ThreadCount(ctx.threads)

    def search(queries: FloatArray, k: int) -> IntArray:
        labels, _ = index.knn_query(queries, k=k, num_threads=threads.count)
        return labels.astype(np.int64)

    def apply(setting: Setting) -> dict[str, Any]:
        index.set_ef(setting["ef"])
        return dict(setting)

    return [
        SearchPath(
            name="hnswlib",
            group="hnswlib",
            library=f"hnswlib {importlib.metadata.version('hnswlib')}",
            maintained=True,
            description=f"M {GRAPH_M}, ef_construction {GRAPH_EF_CONSTRUCTION}, space ip",
            search=search,
            apply=apply,
            set_threads=threads.set,
            knob="ef",
            grid=graph_grid(ctx.k),
            index_bytes=int(index.index_file_size()),
            build=dict(figures),
        )
    ]


def build_usearch(ctx: BuildContext, dtype: str) -> list[SearchPath]:
    from usearch.index import BatchMatches, Index

    num_items, dim = ctx.vectors.shape
    with measured() as figures:
        index: Any = Index(
            ndim=dim,
            metric="ip",
            dtype=dtype,
            connectivity=GRAPH_M,
            expansion_add=GRAPH_EF_CONSTRUCTION,
        )
        index.add(np.arange(num_items, dtype=np.uint64), ctx.vectors, threads=ctx.threads)
    threads = ThreadCount(ctx.threads)

    def search(queries: FloatArray, k: int) -> IntArray:
        matches = index.search(queries, k, threads=threads.count)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        if isinstance(matches, BatchMatches):
            valid = np.arange(k)[None, :] < matches.counts[:, None]  # (Q, k)
            rows[valid] = matches.keys[valid].astype(np.int64)
        else:  # one query: a Matches of the found keys
            keys = np.asarray(matches.keys, dtype=np.int64)[:k]
            rows[0, : len(keys)] = keys
        return rows

    def apply(setting: Setting) -> dict[str, Any]:
        index.expansion_search = setting["expansion_search"]
        return dict(setting)

    name = f"usearch-{dtype}"
    return [
        SearchPath(
            name=name,
            group=name,
            library=f"usearch {importlib.metadata.version('usearch')}",
            maintained=True,
            description=f"{dtype}, connectivity {GRAPH_M}, expansion_add {GRAPH_EF_CONSTRUCTION}",
            search=search,
            apply=apply,
            set_threads=threads.set,
            knob="expansion_search",
            grid=graph_grid(ctx.k),
            index_bytes=int(index.serialized_length),
            build=dict(figures),
            notes=[f"the library's memory_usage: {index.memory_usage / 2**20:.0f} MiB"],
        )
    ]


def build_scann(ctx: BuildContext) -> list[SearchPath]:
    from scann.scann_ops.py import scann_ops_pybind

    num_items, _ = ctx.vectors.shape
    leaves = ctx.nlist
    sample = min(num_items, max(100_000, 40 * leaves))
    with measured() as figures:
        builder = scann_ops_pybind.builder(ctx.vectors, ctx.k, "dot_product")
        builder = builder.set_n_training_threads(ctx.threads)
        builder = builder.tree(
            num_leaves=leaves,
            num_leaves_to_search=min(leaves, 64),
            training_sample_size=sample,
            spherical=True,
        )
        builder = builder.score_ah(
            SCANN_DIMS_PER_BLOCK,
            anisotropic_quantization_threshold=SCANN_AH_THRESHOLD,
            training_sample_size=sample,
        )
        searcher = builder.reorder(4 * ctx.k).build()
    folder = ctx.work / "scann"
    folder.mkdir()
    searcher.serialize(str(folder))
    size = sum(path.stat().st_size for path in folder.iterdir())
    shutil.rmtree(folder)
    threads = ThreadCount(ctx.threads)
    knobs: dict[str, int] = {}

    def pad(found: npt.NDArray[Any], k: int) -> IntArray:
        rows = np.full((len(found), k), -1, dtype=np.int64)
        rows[:, : found.shape[1]] = found
        return rows

    def search(queries: FloatArray, k: int) -> IntArray:
        options = {"final_num_neighbors": k, **knobs}
        if len(queries) == 1:
            found, _ = searcher.search(queries[0], **options)  # one thread
            return pad(np.asarray(found, dtype=np.int64)[None, :], k)
        if threads.count > 1:
            searcher.set_num_threads(threads.count)
            found, _ = searcher.search_batched_parallel(queries, **options)
        else:
            found, _ = searcher.search_batched(queries, **options)
        return pad(np.asarray(found, dtype=np.int64), k)

    def apply(setting: Setting) -> dict[str, Any]:
        knobs.update(setting)
        return dict(setting)

    reorder = [2] if ctx.quick else [1, 2, 4, 8, 16]  # x k float re-order candidates
    description = (
        f"tree {leaves} leaves (spherical, {sample} training rows), AH {SCANN_DIMS_PER_BLOCK} "
        f"dims/block threshold {SCANN_AH_THRESHOLD}, float re-order"
    )
    return [
        SearchPath(
            name="scann",
            group="scann",
            library=f"scann {importlib.metadata.version('scann')}",
            maintained=True,
            description=description,
            search=search,
            apply=apply,
            set_threads=threads.set,
            knob="leaves_to_search",
            grid=ivf_grid(leaves),
            secondary=[{"pre_reorder_num_neighbors": f * ctx.k} for f in reorder],
            index_bytes=size,
            build=dict(figures),
            notes=["memory: serialised searcher, float dataset for the re-order included"],
        )
    ]


@dataclass(frozen=True)
class Candidate:
    """A `--candidates` entry: what it needs installed and how it is built."""

    module: str  # must be importable
    build: Callable[[BuildContext], list[SearchPath]]
    needs: Callable[[], str | None] = lambda: None  # a reason it cannot run, or None


def _rabitq_missing() -> str | None:
    if not hasattr(faiss, "IndexIVFRaBitQFastScan"):
        return f"faiss {faiss.__version__} has no IndexIVFRaBitQFastScan"
    return None


CANDIDATES: dict[str, Candidate] = {
    "ivf-sq8": Candidate("numba", build_ivf_sq8),
    "ivf-many-sq8": Candidate("numba", lambda ctx: build_ivf_sq8(ctx, many_lists=True)),
    "ivf-hnsw-sq8": Candidate("numba", build_ivf_hnsw_sq8),
    "ivf-pq-fs-refine": Candidate("faiss", build_ivf_pq_fs_refine),
    "ivf-rabitq-fs-refine": Candidate("faiss", build_ivf_rabitq_fs_refine, _rabitq_missing),
    "faiss-hnsw": Candidate("faiss", build_faiss_hnsw),
    "hnswlib": Candidate("hnswlib", build_hnswlib),
    "scann": Candidate("scann", build_scann),
    "usearch-f32": Candidate("usearch", lambda ctx: build_usearch(ctx, "f32")),
    "usearch-i8": Candidate("usearch", lambda ctx: build_usearch(ctx, "i8")),
}
assert tuple(CANDIDATES) == GROUPS


# --------------------------------------------------------------------------- tuning


def smallest_passing(values: Sequence[int], passes: Callable[[int], bool]) -> int | None:
    """The smallest value in ``[values[0], values[-1]]`` that passes, assuming that passing
    is monotone: walk the ascending grid to its first passing value, then bisect the gap
    below it down to steps of 1/`TUNE_STEPS` of the passing value. None if none passes.

    >>> smallest_passing([8, 16, 32, 64], lambda v: v >= 40)
    40
    >>> smallest_passing([8, 16], lambda v: v >= 1), smallest_passing([8, 16], lambda v: False)
    (8, None)
    """
    previous: int | None = None
    for value in values:
        if passes(value):
            if previous is None:
                return value
            low, high = previous, value
            step = max(1, high // TUNE_STEPS)
            while high - low > step:
                middle = (low + high) // 2
                if passes(middle):
                    high = middle
                else:
                    low = middle
            return high
        previous = value
    return None


@contextmanager
def one_thread(path: SearchPath, threads_after: int) -> Iterator[None]:
    """Every library `path` may touch limited to one thread; `threads_after` restored."""
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    path.set_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        faiss.omp_set_num_threads(threads_after)
        torch.set_num_threads(threads_after)
        path.set_threads(threads_after)


def batch1_latency_ms(
    path: SearchPath, queries: FloatArray, k: int, count: int, warmup: int, threads_after: int
) -> dict[str, float]:
    """p50 / p99 / mean milliseconds of `count` batch-1 searches on one thread, cycling
    through `queries`, after `warmup` untimed ones (garbage collection off while timed)."""
    singles = [np.ascontiguousarray(queries[i : i + 1]) for i in range(len(queries))]
    times = np.empty(count, dtype=np.float64)
    with one_thread(path, threads_after):
        for i in range(warmup):
            path.search(singles[i % len(singles)], k)
        gc.collect()
        gc.disable()
        try:
            for i in range(count):
                query = singles[i % len(singles)]
                started = time.perf_counter_ns()
                path.search(query, k)
                times[i] = (time.perf_counter_ns() - started) / 1e6
        finally:
            gc.enable()
    return {
        "p50": round(float(np.percentile(times, 50)), 3),
        "p99": round(float(np.percentile(times, 99)), 3),
        "mean": round(float(times.mean()), 3),
        "queries": count,
        "distinct_queries": min(count, len(singles)),
        "warmup": warmup,
    }


@dataclass
class Tuned:
    """The outcome of `tune`."""

    setting: Setting
    recall: float  # on the tuning half
    reached: bool
    trials: list[dict[str, Any]]


def tune(
    path: SearchPath,
    truth: GroundTruth,
    vectors: FloatArray,
    target: float,
    *,
    choice_queries: int,
    threads: int,
) -> Tuned:
    """The cheapest setting of `path` whose recall@k on `truth` reaches `target`.

    For each secondary setting (in order, each one needing no more of the main knob than the
    one before), the smallest main-knob value reaching `target` (`smallest_passing`, searched
    below the previous one's value). With several such settings, the fastest at batch 1 on
    one thread over the first `choice_queries` tuning queries is kept. When none reaches
    `target`, the setting of highest recall is returned with ``reached=False``.
    """
    trials: list[dict[str, Any]] = []
    recalls: dict[tuple[tuple[str, int], ...], float] = {}

    def recall_at(setting: Setting) -> float:
        key = tuple(sorted(setting.items()))
        if key not in recalls:
            applied = path.apply(setting)
            started = time.perf_counter()
            rows = path.search(truth.queries, truth.k)
            seconds = time.perf_counter() - started
            recalls[key] = recall_of(rows, truth, vectors)
            trials.append(
                {
                    "setting": dict(setting),
                    "applied": applied,
                    "recall": round(recalls[key], 5),
                    "seconds": round(seconds, 3),
                }
            )
            log(f"  {path.name} {applied}: recall {recalls[key]:.4f} ({seconds:.1f} s)")
        return recalls[key]

    def reaches_with(extra: Setting) -> Callable[[int], bool]:
        def reaches(value: int) -> bool:
            return recall_at({**extra, path.knob: value}) >= target

        return reaches

    found: list[Setting] = []
    upper = path.grid[-1]
    for extra in path.secondary:
        values = [value for value in path.grid if value < upper] + [upper]
        if (
            len(path.secondary) > 1
            and not found  # can this one reach the target at all?
            and recall_at({**extra, path.knob: upper}) < target
        ):
            continue
        value = smallest_passing(values, reaches_with(extra))
        if value is not None:
            found.append({**extra, path.knob: value})
            upper = value
    if not found:
        best = max(trials, key=lambda trial: trial["recall"])
        return Tuned(best["setting"], best["recall"], False, trials)
    chosen = found[0]
    if len(found) > 1:
        sample = truth.queries[:choice_queries]
        fastest = math.inf
        for setting in found:
            path.apply(setting)
            latency = batch1_latency_ms(path, sample, truth.k, len(sample), 3, threads)
            trials.append({"setting": dict(setting), "choice_p50_ms": latency["p50"]})
            log(f"  {path.name} {setting}: p50 {latency['p50']:.2f} ms on the tuning half")
            if latency["p50"] < fastest:
                chosen, fastest = setting, latency["p50"]
    return Tuned(chosen, recall_at(chosen), True, trials)


# --------------------------------------------------------------------------- recommendation


def recommend(
    rows: Sequence[dict[str, Any]], *, scanner_margin: float = 0.15, speed_tie: float = 0.05
) -> dict[str, Any]:
    """The default CPU search under the project's rule, from measured rows.

    The rule: the fastest maintained-library path, unless the hand-written scanner takes at
    least `scanner_margin` less time at the same recall floor (then keep the scanner and
    record why); memory and build time are weighed. Here: only rows with ``status == "ok"``
    (recall floor reached) count; speed is batch-1 p50 on one thread; library paths within
    `speed_tie` of the fastest are tied on speed, and of those the smallest index (then the
    quickest build) is chosen; the scanner must then beat that choice by the margin.

    Args:
        rows: report rows with name, maintained, status, recall, latency_ms.p50, index_mib,
            build_seconds.

    Returns:
        {"default", "kind" ("library" | "scanner" | None), "fastest_library", "scanner",
        "scanner_time_saving", "reason", "weighed"}.

    >>> def row(name, maintained, p50, mib, build):
    ...     return {"name": name, "maintained": maintained, "status": "ok", "recall": 0.95,
    ...             "latency_ms": {"p50": p50}, "index_mib": mib, "build_seconds": build}
    >>> rows = [row("ivf-sq8/faiss", True, 5.0, 70, 20), row("ivf-sq8/scanner", False, 3.5, 140, 21),
    ...         row("scann", True, 4.0, 300, 60), row("hnswlib", True, 3.9, 600, 900)]
    >>> result = recommend(rows)  # hnswlib is fastest, scann within 5 % with half the memory
    >>> result["fastest_library"], result["default"], round(result["scanner_time_saving"], 3)
    ('scann', 'scann', 0.125)
    >>> recommend(rows, scanner_margin=0.1)["default"]
    'ivf-sq8/scanner'
    """
    ok = [row for row in rows if row["status"] == "ok"]
    libraries = sorted((r for r in ok if r["maintained"]), key=lambda r: r["latency_ms"]["p50"])
    scanners = sorted((r for r in ok if not r["maintained"]), key=lambda r: r["latency_ms"]["p50"])
    result: dict[str, Any] = {
        "default": None,
        "kind": None,
        "fastest_library": None,
        "scanner": None,
        "scanner_time_saving": None,
        "weighed": [],
    }
    if not libraries and not scanners:
        result["reason"] = "no measured path reached the recall floor; nothing to recommend"
        return result
    scanner = scanners[0] if scanners else None
    if not libraries:
        assert scanner is not None
        result |= {
            "default": scanner["name"],
            "kind": "scanner",
            "scanner": scanner["name"],
            "reason": "no maintained-library path reached the recall floor",
        }
        return result

    def p50(row: dict[str, Any]) -> float:
        return float(row["latency_ms"]["p50"])

    fastest = libraries[0]
    tied = [r for r in libraries if p50(r) <= p50(fastest) * (1 + speed_tie)]
    library = min(tied, key=lambda r: (r["index_mib"], r["build_seconds"]))
    result["fastest_library"] = library["name"]
    weighed = result["weighed"]
    if library is not fastest:
        weighed.append(
            f"{library['name']} ({p50(library):.2f} ms) is within {speed_tie:.0%} of the "
            f"fastest, {fastest['name']} ({p50(fastest):.2f} ms), with a smaller index "
            f"({library['index_mib']:.0f} vs {fastest['index_mib']:.0f} MiB): taken as the "
            f"fastest library path"
        )
    for other in libraries:
        if other is library or p50(other) > p50(library) * 1.25:
            continue
        if other["index_mib"] < 0.5 * library["index_mib"]:
            weighed.append(
                f"{other['name']} is {p50(other) / p50(library) - 1:+.0%} in p50 with "
                f"{other['index_mib']:.0f} MiB against {library['index_mib']:.0f} MiB"
            )
    described = (
        f"{library['name']}: p50 {p50(library):.2f} ms at recall {library['recall']:.3f}, "
        f"{library['index_mib']:.0f} MiB, built in {library['build_seconds']:.0f} s"
    )
    if scanner is None:
        result |= {
            "default": library["name"],
            "kind": "library",
            "reason": f"fastest maintained-library path, {described}; no scanner row "
            f"reached the floor",
        }
        return result
    saving = 1 - p50(scanner) / p50(library)
    result |= {"scanner": scanner["name"], "scanner_time_saving": saving}
    scanner_described = (
        f"{scanner['name']}: p50 {p50(scanner):.2f} ms at recall {scanner['recall']:.3f}, "
        f"{scanner['index_mib']:.0f} MiB, built in {scanner['build_seconds']:.0f} s"
    )
    if abs(scanner["recall"] - library["recall"]) > 0.005:
        weighed.append(
            f"the two sit at different held-out recall ({scanner['recall']:.3f} vs "
            f"{library['recall']:.3f}): the higher one pays for recall above the floor"
        )
    if scanner["index_mib"] > 1.5 * library["index_mib"]:
        weighed.append(
            f"the scanner holds {scanner['index_mib']:.0f} MiB against "
            f"{library['index_mib']:.0f} MiB for {library['name']}"
        )
    if scanner["build_seconds"] > 1.5 * library["build_seconds"]:
        weighed.append(
            f"the scanner's index builds in {scanner['build_seconds']:.0f} s against "
            f"{library['build_seconds']:.0f} s"
        )
    if saving >= scanner_margin:
        result |= {
            "default": scanner["name"],
            "kind": "scanner",
            "reason": f"keep the scanner: it takes {saving:.0%} less time than the "
            f"fastest maintained-library path (>= {scanner_margin:.0%}); "
            f"{scanner_described}; {described}",
        }
    else:
        verdict = f"only {saving:.0%} less time" if saving > 0 else f"{-saving:.0%} more time"
        result |= {
            "default": library["name"],
            "kind": "library",
            "reason": f"adopt the maintained-library path: the scanner takes {verdict} "
            f"(< {scanner_margin:.0%} needed); {described}; "
            f"{scanner_described}",
        }
    return result


# --------------------------------------------------------------------------- report


def setting_text(applied: dict[str, Any]) -> str:
    """`{"nprobe": 8, "k_factor": 2.0}` -> "nprobe=8 k_factor=2"."""
    return " ".join(f"{name}={value:g}" for name, value in applied.items())


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: machine, data, one table row per path, the choice."""
    m, data, config = report["machine"], report["data"], report["config"]
    probe = report["speed_probe_seconds"]
    load = " / ".join(f"{value:.2f}" for value in m["load_average"])
    versions = ", ".join(f"{name} {v}" for name, v in m["libraries"].items() if v)
    lines = [
        f"# ANN search at k = {data['k']}: libraries side by side",
        "",
        f"JSON: `{config['out']}`. Written by `bench/bench_ann.py`"
        f"{' (--quick: a smoke run, not a measurement)' if config['quick'] else ''}.",
        "",
        f"**Machine.** {m['cpu_model']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, "
        f"{m['platform']}; load average at start {load}; a Python loop of 10^7 "
        f"additions took {probe['start']} s at the start and {probe['end']} s at the end. "
        f"{versions}.",
        "",
        f"**Data.** {data['items']:,} items x {data['dim']} ({data['source']}); "
        f"{data['queries']} queries ({data['query_source']}): {data['tune_queries']} tune each "
        f"setting, the other {data['measure_queries']} measure recall and latency. Exact truth: "
        f"faiss IndexFlatIP ({data['exact_seconds']} s). Floor: recall@{data['k']} >= "
        f"{config['recall_floor']} on the tuning half. Latency: batch 1, one thread, "
        f"{config['latency_queries']} searches after {config['warmup']} warm-up; builds and "
        f"recall on {config['threads']} thread(s). IVF lists {config['nlist']} "
        f"(HNSW-coarse variant {config['coarse_nlist']}). RSS growth: resident memory gained "
        f"over the build; memory freed by an earlier candidate and reused counts as none, so "
        f"the index size is the figure to compare.",
        "",
        f"| path | library | recall@{data['k']} | setting | p50 ms | p99 ms | build s "
        f"| index MiB | RSS growth MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["candidates"]:
        recall = f"{row['recall']:.4f}" + ("" if row["status"] == "ok" else " (below floor)")
        lines.append(
            f"| {row['name']} | {row['library']} | {recall} | {setting_text(row['applied'])} "
            f"| {row['latency_ms']['p50']:.2f} | {row['latency_ms']['p99']:.2f} "
            f"| {row['build_seconds']:.1f} | {row['index_mib']:.1f} | {row['rss_delta_mib']:.0f} "
            f"| {'; '.join([row['description'], *row['notes']])} |"
        )
    for entry in report["unavailable"]:
        lines.append(f"| {entry['name']} | - | - | - | - | - | - | - | - | {entry['reason']} |")
    choice = report["recommendation"]
    lines += ["", f"**Default CPU search.** {choice['default'] or 'none'}: {choice['reason']}."]
    lines += [f"- weighed: {text}" for text in choice["weighed"]]
    if report.get("coarse"):
        lines += ["", f"**Fewer probes.** {report['coarse']}"]
    return "\n".join(lines) + "\n"


def coarse_summary(rows: Sequence[dict[str, Any]], nlist: int, coarse_nlist: int) -> str | None:
    """nprobe at the floor of the default IVF against the HNSW-coarse one (fraction of the
    catalog each query scans, if lists were even)."""
    by_name = {row["name"]: row for row in rows if row["status"] == "ok"}
    parts = []
    for name, lists in (("ivf-sq8/faiss", nlist), ("ivf-hnsw-sq8/faiss", coarse_nlist)):
        if name in by_name:
            nprobe = by_name[name]["applied"]["nprobe"]
            parts.append(
                f"{name}: nprobe {nprobe} of {lists} lists ({nprobe / lists:.1%} of the items), "
                f"p50 {by_name[name]['latency_ms']['p50']:.2f} ms"
            )
    return "; ".join(parts) + "." if parts else None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("input: --model + --data, or --embeddings + --queries")
    source.add_argument("--model", type=Path, help="model bundle (its item and query towers)")
    source.add_argument("--data", type=Path, help="dataset (catalog + test split users)")
    source.add_argument("--embeddings", type=Path, help="items .npy, float32 [N, D], unit rows")
    source.add_argument("--queries", type=Path, help="queries .npy, float32 [Q, D], unit rows")
    source.add_argument(
        "--save-embeddings", type=Path, help="with --model: write items.npy, queries.npy here"
    )
    parser.add_argument(
        "--candidates",
        default=",".join(GROUPS),
        help=f"comma-separated subset of: {', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--recall-floor", type=float, default=0.95)
    parser.add_argument(
        "--recall-slack",
        type=float,
        default=0.005,
        help="a path counts as at the floor when its held-out recall is >= floor - slack "
        "(the split's sampling noise); default 0.005",
    )
    parser.add_argument(
        "--num-queries",
        type=int,
        help="queries used, half tune, half measure (default 1000; --quick 200)",
    )
    parser.add_argument("--latency-queries", type=int, help="timed searches (default 500)")
    parser.add_argument("--warmup", type=int, help="untimed searches first (default 20)")
    parser.add_argument(
        "--choice-queries",
        type=int,
        help="batch-1 searches that pick between second-knob settings (default 100)",
    )
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 4 sqrt(N))")
    parser.add_argument(
        "--coarse-nlist", type=int, default=0, help="lists of ivf-hnsw-sq8 (0: ~16 sqrt(N))"
    )
    parser.add_argument("--threads", type=int, default=0, help="build/tuning threads (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer queries/settings")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_ann.json"))
    parser.add_argument("--md", type=Path, default=Path("bench/results/bench_ann.md"))
    args = parser.parse_args(argv)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")
    if (args.embeddings is None) != (args.queries is None):
        parser.error("--embeddings and --queries go together")
    if (args.model is None) == (args.embeddings is None):
        parser.error("give either --model + --data or --embeddings + --queries")
    if args.save_embeddings and args.model is None:
        parser.error("--save-embeddings needs --model + --data (the vectors it embeds)")
    names = [name.strip() for name in args.candidates.split(",") if name.strip()]
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown or not names:
        parser.error(f"--candidates: unknown {unknown}; choose from {', '.join(GROUPS)}")
    args.candidates = names
    defaults = (200, 100, 5, 20) if args.quick else (1000, 500, 20, 100)
    for name, value in zip(
        ("num_queries", "latency_queries", "warmup", "choice_queries"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("k", "num_queries", "latency_queries", "choice_queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.num_queries < 2:
        parser.error(
            f"--num-queries must be >= 2 (half tune, half measure); got {args.num_queries}"
        )
    if args.warmup < 0 or args.threads < 0 or args.nlist < 0 or args.coarse_nlist < 0:
        parser.error("--warmup, --threads, --nlist and --coarse-nlist must be >= 0")
    if not 0 < args.recall_floor <= 1:
        parser.error(f"--recall-floor must be in (0, 1]; got {args.recall_floor}")
    return args


def load_inputs(
    args: argparse.Namespace, work: Path
) -> tuple[FloatArray, FloatArray, dict[str, Any]]:
    """(items, queries, info) from the model + dataset or from the .npy files."""
    if args.model is not None:
        log(f"embedding the catalog of {args.data} with {args.model}")
        items, queries, info = embed_with_model(
            args.model, args.data, args.num_queries, args.seed, work
        )
        if args.save_embeddings:
            save_array(args.save_embeddings / "items.npy", items)
            save_array(args.save_embeddings / "queries.npy", queries)
            info["saved_to"] = str(args.save_embeddings)
            log(f"saved items.npy and queries.npy to {args.save_embeddings}")
    else:
        items = check_unit_rows(str(args.embeddings), np.load(args.embeddings))
        queries = check_unit_rows(str(args.queries), np.load(args.queries))
        info = {"source": str(args.embeddings), "query_source": str(args.queries)}
    if items.shape[1] != queries.shape[1]:
        raise ValueError(
            f"items have D = {items.shape[1]} but queries D = {queries.shape[1]}; same model?"
        )
    if len(queries) > args.num_queries:
        chosen = np.random.default_rng(args.seed).permutation(len(queries))[: args.num_queries]
        queries = np.ascontiguousarray(queries[np.sort(chosen)])
    if len(queries) < 2:
        raise ValueError(f"need >= 2 queries (half tune, half measure); got {len(queries)}")
    return items, queries, info


def run_path(
    path: SearchPath,
    vectors: FloatArray,
    tune_truth: GroundTruth,
    measure_truth: GroundTruth,
    args: argparse.Namespace,
    threads: int,
) -> dict[str, Any]:
    """Tune `path` on one half, measure it on the other: one report row."""
    log(
        f"-- {path.name}: tuning {path.knob} (+ {path.secondary}) for recall >= {args.recall_floor}"
    )
    tuned = tune(
        path,
        tune_truth,
        vectors,
        args.recall_floor,
        choice_queries=args.choice_queries,
        threads=threads,
    )
    applied = path.apply(tuned.setting)
    recall = recall_of(path.search(measure_truth.queries, measure_truth.k), measure_truth, vectors)
    latency = batch1_latency_ms(
        path, measure_truth.queries, measure_truth.k, args.latency_queries, args.warmup, threads
    )
    reached = tuned.reached and recall >= args.recall_floor - args.recall_slack
    notes = list(path.notes)
    if not tuned.reached:
        notes.insert(0, f"no setting tried reached {args.recall_floor} (best shown)")
    elif not reached:
        notes.insert(0, f"held-out recall below {args.recall_floor} - {args.recall_slack}")
    row = {
        "name": path.name,
        "group": path.group,
        "library": path.library,
        "maintained": path.maintained,
        "description": path.description,
        "status": "ok" if reached else "below floor",
        "recall": round(recall, 4),
        "recall_tune": round(tuned.recall, 4),
        "setting": tuned.setting,
        "applied": applied,
        "latency_ms": latency,
        "build_seconds": path.build_seconds,
        "build": path.build,
        "index_mib": round(path.index_bytes / 2**20, 1),
        "rss_delta_mib": path.rss_delta_mib,
        "notes": notes,
        "tuning": tuned.trials,
    }
    log(
        f"   {path.name}: recall {recall:.4f} at {setting_text(applied)}, p50 "
        f"{latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms, build {path.build_seconds:.1f} s, "
        f"{row['index_mib']:.1f} MiB"
    )
    return row


def run_candidate(
    name: str,
    ctx: BuildContext,
    tune_truth: GroundTruth,
    measure_truth: GroundTruth,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Build candidate `name` and run each of its paths; its index is freed on return."""
    paths = CANDIDATES[name].build(ctx)
    return [
        run_path(path, ctx.vectors, tune_truth, measure_truth, args, ctx.threads) for path in paths
    ]


def unavailable_reason(name: str) -> str | None:
    """Why candidate `name` cannot run here (a library missing), or None."""
    candidate = CANDIDATES[name]
    if importlib.util.find_spec(candidate.module) is None:
        return f"unavailable: python package {candidate.module!r} is not installed"
    missing = candidate.needs()
    return f"unavailable: {missing}" if missing else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    probe_start = python_loop_seconds()
    description = machine() | {"cpu_model": cpu_model(), "libraries": library_versions()}
    log(f"machine: {json.dumps(description)}; 10^7 Python additions: {probe_start} s")

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        items, queries, info = load_inputs(args, work)
        num_items, dim = items.shape
        k = min(args.k, num_items)
        nlist = args.nlist or default_nlist(num_items)
        coarse_nlist = args.coarse_nlist or coarse_hnsw_nlist(num_items)
        exact_scores, exact_seconds = exact_top_k(items, queries, k)
        truth = GroundTruth(queries, exact_scores, k, num_items)
        order = np.random.default_rng(args.seed).permutation(len(queries))
        half = len(order) // 2
        tune_truth = truth.subset(np.sort(order[:half]))
        measure_truth = truth.subset(np.sort(order[half:]))
        log(
            f"{num_items:,} items x {dim}, {len(queries)} queries; exact top-{k}: "
            f"{exact_seconds:.1f} s"
        )
        ctx = BuildContext(items, k, nlist, coarse_nlist, threads, args.seed, work, args.quick)
        rows: list[dict[str, Any]] = []
        unavailable: list[dict[str, str]] = []
        for name in args.candidates:
            reason = unavailable_reason(name)
            if reason is None:
                log(f"== {name}: building")
                try:
                    rows += run_candidate(name, ctx, tune_truth, measure_truth, args)
                except (RuntimeError, ValueError, MemoryError) as exc:
                    traceback.print_exc(file=sys.stderr)
                    reason = f"failed: {type(exc).__name__}: {str(exc).strip()[-300:]}"
            if reason is not None:
                log(f"== {name}: {reason}")
                unavailable.append({"name": name, "reason": reason})
            gc.collect()  # the candidate's index is gone before the next is built
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    recommendation = recommend(rows, scanner_margin=0.15)
    report: dict[str, Any] = {
        "benchmark": "bench_ann",
        "machine": description,
        "speed_probe_seconds": {"start": probe_start, "end": python_loop_seconds()},
        "config": {
            "quick": args.quick,
            "recall_floor": args.recall_floor,
            "recall_slack": args.recall_slack,
            "threads": threads,
            "latency_queries": args.latency_queries,
            "warmup": args.warmup,
            "choice_queries": args.choice_queries,
            "nlist": nlist,
            "coarse_nlist": coarse_nlist,
            "graph_m": GRAPH_M,
            "graph_ef_construction": GRAPH_EF_CONSTRUCTION,
            "seed": args.seed,
            "candidates": args.candidates,
            "out": str(args.out),
        },
        "data": {
            **info,
            "items": num_items,
            "dim": dim,
            "k": k,
            "queries": len(queries),
            "tune_queries": len(tune_truth.queries),
            "measure_queries": len(measure_truth.queries),
            "exact_seconds": round(exact_seconds, 2),
        },
        "candidates": rows,
        "unavailable": unavailable,
        "recommendation": recommendation,
        "coarse": coarse_summary(rows, nlist, coarse_nlist),
    }
    page = markdown(report)
    write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
    write_text(args.md, page)
    emit(report, page)
    log(f"default CPU search: {recommendation['default']}: {recommendation['reason']}")
    log(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
