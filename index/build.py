"""The index build job: model bundle + catalog in, a published index version out.

Usage::

    retrieval build-index --model artifacts/model --data data/synth-1m --out artifacts/index
    retrieval build-index --model M --data D --out R --factory "HNSW32,Flat" --recall-floor 0.9
    retrieval build-index --model M --data D --out R --shards 4     # one faiss.IndexShards
    torchrun --nproc-per-node 2 -m index --model M --data D --out R     # sharded embedding

Stages (each timed and logged, options logged first):

1. load and verify the model bundle; check the catalog (items.parquet) against the
   bundle's item features, and its ids (none null, none repeated, at least one); embed
   the real queries of the recall check (the data's test users, history at the end of
   their context), so that whatever can fail cheaply fails before the long stage;
2. embed the catalog: parquet record batches (`ParquetFile.iter_batches`) are read and
   encoded on a helper thread while the item tower (`torch.inference_mode`) embeds the
   previous batch; rows are checked finite, L2-normalised and written into a staging
   `.npy` memmap (preallocated, so a full disk fails here with ENOSPC, not later with a
   SIGBUS). Under torchrun each rank embeds its contiguous slice of rows into the same
   file; rank 0 does everything after this point. Memory: one batch per stage besides
   the index itself (the memmap is page cache, not heap);
3. train the FAISS index (inner product, `index/factory.py` picks the factory by catalog
   size unless `--factory` says) on a sample of rows and add all rows in chunks, on the
   GPU when asked and faiss-gpu can. With `--shards S` the trained index is copied S
   times and copy s filled with the s-th contiguous slice of rows: the version holds S
   index files searched as one `faiss.IndexShards` (labels and, for Flat and IVF,
   results equal the single index; tuning and the recall gate run on the assembled one);
4. exact top-k of the real queries by brute force, then ANN search params tuned on one
   half of the queries and the recall gate measured on the other half (k = min(1000, N));
5. below `--recall-floor` the build stops here, nothing published, unless `--force`
   (recorded as `recall.forced`);
6. write `versions/<version>/` (temp dir, fsync, rename), replace CURRENT atomically,
   prune to the newest `--keep` (never CURRENT), announce on Redis (`--redis-url`).

A failure at any stage leaves CURRENT and every published version untouched; the staging
directory is removed (or, after a crash, by the next build: it is a `.tmp-` name).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from index.factory import (
    GroundTruth,
    candidate_search_params,
    choose_factory,
    create_index,
    exact_search,
    measure_recall,
    shard_bounds,
    train_and_fill,
    train_sample_size,
    tune_search_params,
)
from index.publish import (
    IndexBuildError,
    announce_version,
    current_or_none,
    prune_versions,
    publish_current,
    root_lock,
)
from retrieval.atomic import TMP_PREFIX, remove_stale_temporaries
from retrieval.bundle import ModelBundle, load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.encoders import FeatureEncoder
from retrieval.evaluation import (
    build_eval_queries,
    embed_in_batches,
    encode_users_in_encoder_order,
    history_feature_name,
)
from retrieval.features import ITEM_ID, ITEMS_FILE, DatasetSchema
from retrieval.index_format import (
    METRIC,
    IndexStoreError,
    check_item_ids,
    check_version_name,
    versions_dir,
    write_index_version,
)
from retrieval.process_group import local_rank
from retrieval.process_group import rank as _rank
from retrieval.process_group import world_size as _world
from retrieval.searchers import faiss_has_gpu
from retrieval.stages import stage as timed_stage
from retrieval.urls import redact_url

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
EMBEDDINGS_FILE = "embeddings.npy"
TUNE_MARGIN = 0.01  # tune for floor + margin, so the held-out gate half clears the floor
Batch = dict[str, torch.Tensor]
FloatArray = npt.NDArray[np.float32]


class RecallGateError(IndexBuildError):
    """ANN recall against exact search is below the floor; nothing was published."""


@dataclass(frozen=True)
class BuildOptions:
    """What `retrieval build-index` takes besides the three paths (recorded in the manifest)."""

    factory: str | None = None  # FAISS index_factory string; None = by catalog size
    device: str = "auto"  # auto | cpu | cuda: embedding, FAISS train/add, exact search
    batch_size: int = 8192  # catalog rows read, encoded and embedded per step
    keep: int = 3  # versions kept after publishing (CURRENT always kept)
    recall_floor: float = 0.95  # refuse to publish below this ANN recall@k vs exact
    recall_k: int = 1000  # k of the recall check (min(k, N) is used)
    recall_queries: int = 500  # real queries sampled: half tune the params, half gate
    force: bool = False  # publish below the floor (the manifest records forced=true)
    # announce the new version on this Redis (a secret: never in a repr, a log or a manifest)
    redis_url: str | None = field(default=None, repr=False)
    search_params: dict[str, Any] = field(default_factory=dict)  # fixed; {} = tune
    train_size: int = 0  # training sample; 0 = 40 per IVF list (>= 20,000)
    seed: int = 0  # query sample, training sample, k-means
    threads: int = 0  # torch / faiss threads per process; 0 = all cores / local ranks
    shards: int = 1  # index files of the version (> 1: searched as one faiss.IndexShards)
    progress: bool = True  # progress bar while embedding

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"`device` must be one of {list(DEVICES)}; got {self.device!r}")
        for name in ("batch_size", "keep", "recall_k", "recall_queries", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.recall_floor <= 1.0:
            raise ValueError(f"`recall_floor` must be in [0, 1]; got {self.recall_floor}")
        if self.train_size < 0 or self.threads < 0:
            raise ValueError(
                f"`train_size` and `threads` must be >= 0; got {self.train_size}, {self.threads}"
            )
        if self.factory is not None and not self.factory.strip():
            raise ValueError("`factory` must be a FAISS index_factory string; got ''")


def loggable_options(options: BuildOptions) -> dict[str, Any]:
    """`options` as a dict fit for a log line: the Redis URL with its password redacted."""
    values = asdict(options)
    if options.redis_url:
        values["redis_url"] = redact_url(options.redis_url)
    return values


@dataclass
class BuildResult:
    """What a build did: the version written, whether it is now CURRENT, and its manifest."""

    version: str
    path: Path
    manifest: dict[str, Any]
    previous: str | None
    pruned: list[str]
    seconds: float


# --------------------------------------------------------------------------- process group


def _agree(error: Exception | None) -> None:
    """Every rank learns whether any rank failed; all raise together (no rank hangs)."""
    if _world() == 1:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * _world()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise IndexBuildError(f"rank {rank} failed: {message}")


def _broadcast(value: Any) -> Any:
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- stages


# Each stage records wall and CPU seconds (`key` and its "_cpu_seconds" twin), to the ms.
stage = functools.partial(timed_stage, cpu=True, ndigits=3)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is refused."""
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {list(DEVICES)}; got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("`device` is 'cuda' but no CUDA device is available")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank()}"
    return device


def new_version_name() -> str:
    """UTC time to the microsecond plus 8 random hex digits: unique, sorts by build time."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"


@dataclass
class Catalog:
    """The catalog file the job embeds: items.parquet, opened lazily for streaming."""

    path: Path
    num_items: int
    columns: list[str]  # columns the item tower reads (the id column included)
    row_group_offsets: list[int]  # first row of each row group, plus the total

    def open(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.path)


def open_catalog(data_dir: str | Path, encoder: FeatureEncoder) -> Catalog:
    """Check items.parquet against the bundle's item features; return a streaming handle.

    Raises:
        FileNotFoundError: no items.parquet.
        IndexBuildError: unreadable, empty, or lacking columns the item tower reads.
    """
    path = Path(data_dir) / ITEMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"catalog not found: {path}")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise IndexBuildError(f"{path}: not a readable parquet file ({exc})") from exc
    needed = list(
        dict.fromkeys([ITEM_ID, *(s.source_column for s in encoder.schema.item_features)])
    )
    present = parquet.schema_arrow.names
    missing = [column for column in needed if column not in present]
    if missing:
        raise IndexBuildError(
            f"{path}: lacks columns {missing} that the model bundle's item tower reads "
            f"(needs {needed}; the file has {present}): the catalog does not match the model"
        )
    schema_path = Path(data_dir) / "schema.json"
    if schema_path.is_file():
        try:
            data_specs = {s.name: s.kind for s in DatasetSchema.load(schema_path).item_features}
        except ValueError as exc:
            logger.warning("%s: unreadable (%s); checking columns only", schema_path, exc)
        else:
            model_specs = {s.name: s.kind for s in encoder.schema.item_features}
            if data_specs != model_specs:
                logger.warning(
                    "the data's item features %s differ from the model bundle's %s; "
                    "encoding with the bundle's",
                    data_specs,
                    model_specs,
                )
    num_items = parquet.metadata.num_rows
    if num_items == 0:
        raise IndexBuildError(f"{path}: the catalog is empty (0 items); nothing to index")
    offsets = [0]
    for group in range(parquet.num_row_groups):
        offsets.append(offsets[-1] + parquet.metadata.row_group(group).num_rows)
    return Catalog(path=path, num_items=num_items, columns=needed, row_group_offsets=offsets)


def read_catalog_ids(catalog: Catalog) -> pa.Array:
    """The catalog's item ids as strings (row order), refused when null or repeated."""
    column = pq.read_table(catalog.path, columns=[ITEM_ID])[ITEM_ID]
    kind = column.type
    if pa.types.is_integer(kind):
        column = pc.cast(column, pa.string())
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise IndexBuildError(f"{catalog.path}: `{ITEM_ID}` must be strings; got type {kind}")
    ids = column.combine_chunks()
    try:
        check_item_ids(ids, catalog.path)  # what the service would refuse to load
    except IndexStoreError as exc:
        raise IndexBuildError(str(exc)) from exc
    return ids


def iter_catalog_rows(
    catalog: Catalog, start: int, end: int, batch_size: int
) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table) batches of rows [start, end), reading only the row groups needed."""
    offsets = catalog.row_group_offsets
    groups = [g for g in range(len(offsets) - 1) if offsets[g] < end and offsets[g + 1] > start]
    if not groups:
        return
    row = offsets[groups[0]]
    parquet = catalog.open()
    for batch in parquet.iter_batches(
        batch_size=batch_size, row_groups=groups, columns=catalog.columns
    ):
        first, last = row, row + batch.num_rows
        row = last
        lo, hi = max(first, start), min(last, end)
        if lo < hi:
            yield lo, pa.Table.from_batches([batch.slice(lo - first, hi - lo)])
        if row >= end:
            break


def create_embedding_file(path: Path, num_items: int, dim: int) -> None:
    """A `.npy` of `[num_items, dim]` float32 whose blocks are allocated now (ENOSPC here)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, dim))
    header = array.offset
    del array
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, header + num_items * dim * 4)
    except OSError as exc:
        raise IndexBuildError(
            f"{path}: cannot reserve {num_items * dim * 4 / 2**20:.0f} MiB for the embeddings "
            f"({exc.strerror}); free disk space under the index root"
        ) from exc
    finally:
        os.close(fd)


@torch.inference_mode()
def embed_catalog_slice(
    bundle: ModelBundle,
    catalog: Catalog,
    out: np.memmap,
    start: int,
    end: int,
    *,
    batch_size: int,
    device: str,
    progress: bool,
) -> int:
    """Embed rows [start, end) into `out[start:end]` (normalised, checked finite)."""
    model = bundle.model.to(device)
    encoder = bundle.encoder

    def encoded() -> Iterator[tuple[int, Batch, pa.ChunkedArray]]:
        for first, table in iter_catalog_rows(catalog, start, end, batch_size):
            try:
                features = encoder.encode_items(table)
            except ValueError as exc:
                raise IndexBuildError(
                    f"{catalog.path}: rows {first}-{first + table.num_rows - 1} do not fit the "
                    f"model bundle's item features: {exc}"
                ) from exc
            yield first, features, table[ITEM_ID]

    batches = encoded()
    done = 0
    bar = tqdm(total=end - start, unit="item", unit_scale=True, desc="embed", disable=not progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = pool.submit(next, batches, None)  # encode batch i+1 while embedding batch i
        while (item := pending.result()) is not None:
            pending = pool.submit(next, batches, None)
            first, features, ids = item
            batch = {name: t.to(device, non_blocking=True) for name, t in features.items()}
            emb = model.embed_items(batch).float().cpu().numpy()  # (b, D)
            finite = np.isfinite(emb).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise IndexBuildError(
                    f"the item tower produced non-finite embeddings for {len(bad)} of rows "
                    f"{first}-{first + len(emb) - 1}, e.g. item ids "
                    f"{ids.take(pa.array(bad[:5])).to_pylist()}; the model bundle is broken"
                )
            norms = np.linalg.norm(emb, axis=1, keepdims=True)  # (b, 1)
            out[first : first + len(emb)] = emb / np.maximum(norms, 1e-12)
            done += len(emb)
            bar.update(len(emb))
    bar.close()
    out.flush()
    if done != end - start:
        raise IndexBuildError(
            f"{catalog.path}: read {done} rows for slice [{start}, {end}); the file changed?"
        )
    return done


# --------------------------------------------------------------------------- queries


def gate_query_embeddings(
    bundle: ModelBundle, data_dir: str | Path, max_queries: int, seed: int, device: str
) -> tuple[FloatArray, str]:
    """Real query embeddings: test-split users (history at the end of their context).

    Falls back to the valid split, then to all users with their history at the end of
    all interactions (a dataset without held-out splits).
    """
    dataset = load_dataset(data_dir, validate=False)
    encoder = bundle.encoder
    model = bundle.model.to(device)
    batch: Batch | None = None
    source = ""
    for split in ("test", "valid"):
        try:
            queries = build_eval_queries(encoder, dataset, split, max_users=max_queries, seed=seed)
        except ValueError as exc:
            logger.info("no %s queries (%s)", split, exc)
            continue
        batch, source = queries.query_batch, f"{split} split users, history at end of context"
        break
    if batch is None:
        try:
            batch = encode_users_in_encoder_order(encoder, dataset)
            history = history_feature_name(encoder)
            if history is not None:
                batch[history] = torch.from_numpy(encoder.histories_at_end(dataset.interactions))
        except ValueError as exc:
            raise IndexBuildError(
                f"cannot build real queries from {data_dir} for the recall check: {exc}"
            ) from exc
        rows = np.random.default_rng(seed).permutation(encoder.num_users)[:max_queries]
        batch = {name: t[torch.from_numpy(np.sort(rows))] for name, t in batch.items()}
        source = "all users, history at end of all interactions"
    with torch.inference_mode():
        on_device = {name: t.to(device) for name, t in batch.items()}
        emb = embed_in_batches(model.embed_queries, on_device).float().cpu().numpy()
    if len(emb) == 0:
        raise IndexBuildError(f"{data_dir}: no users to build recall-check queries from")
    if not np.isfinite(emb).all():
        raise IndexBuildError("the query tower produced non-finite query embeddings")
    return np.ascontiguousarray(emb, dtype=np.float32), source


# --------------------------------------------------------------------------- the job


def build_index(
    model_dir: str | Path,
    data_dir: str | Path,
    root: str | Path,
    options: BuildOptions | None = None,
) -> BuildResult:
    """Build, check and publish one index version (see the module docstring).

    Every rank of a torchrun group calls this; all return the same result or raise.

    Raises:
        IndexBuildError: bad input (schema mismatch, empty catalog, repeated ids,
            non-finite embeddings), disk full, or another build holding the root's lock.
        RecallGateError: ANN recall below `options.recall_floor` without `force`.
    """
    options = options or BuildOptions()
    started = time.perf_counter()
    rank, world = _rank(), _world()
    root = Path(root)
    device = resolve_device(options.device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    threads = options.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    if rank == 0:
        logger.info(
            "build-index: model=%s data=%s root=%s world=%d device=%s threads=%d options=%s",
            model_dir,
            data_dir,
            root,
            world,
            device,
            threads,
            json.dumps(loggable_options(options), default=str),
        )
    timings: dict[str, float] = {}
    staging: Path | None = None
    with contextlib.ExitStack() as stack:
        # thread counts are process-wide: put them back for whoever called us in-process
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        stack.callback(faiss.omp_set_num_threads, faiss.omp_get_max_threads())
        torch.set_num_threads(threads)
        error: Exception | None = None
        item_ids: pa.Array | None = None
        queries: tuple[FloatArray, str] | None = None
        try:
            if rank == 0:
                stack.enter_context(root_lock(root))
                for stale in remove_stale_temporaries(root) + remove_stale_temporaries(
                    versions_dir(root)
                ):
                    logger.info("removed leftover of an interrupted build: %s", stale)
                staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}build-", dir=root))
                stack.callback(shutil.rmtree, staging, True)
            with stage("load bundle and check catalog", timings, "check_seconds"):
                bundle = load_bundle(model_dir)
                catalog = open_catalog(data_dir, bundle.encoder)
                dim = bundle.model.output_dim
                if rank == 0:  # everything that can fail cheaply fails before embedding
                    if options.shards > catalog.num_items:
                        raise IndexBuildError(
                            f"`shards` ({options.shards}) exceeds the catalog's "
                            f"{catalog.num_items} items; every shard needs at least one"
                        )
                    if options.factory:
                        train_sample_size(create_index(options.factory, dim), catalog.num_items)
                    item_ids = read_catalog_ids(catalog)
                    queries = gate_query_embeddings(
                        bundle, data_dir, options.recall_queries, options.seed, device
                    )
                    assert staging is not None
                    create_embedding_file(staging / EMBEDDINGS_FILE, catalog.num_items, dim)
        except Exception as exc:
            error = exc
        _agree(error)
        staging = Path(_broadcast(str(staging)))
        if rank == 0:
            logger.info(
                "model %s (dim %d), catalog %s: %d items in %d row groups",
                bundle.version,
                dim,
                catalog.path,
                catalog.num_items,
                len(catalog.row_group_offsets) - 1,
            )

        error = None
        start, end = shard_bounds(catalog.num_items, rank, world)
        try:
            with stage(f"embed items [{start}, {end})", timings, "embed_seconds"):
                out = np.load(staging / EMBEDDINGS_FILE, mmap_mode="r+")
                embed_catalog_slice(
                    bundle,
                    catalog,
                    out,
                    start,
                    end,
                    batch_size=options.batch_size,
                    device=device,
                    progress=options.progress and rank == 0,
                )
                del out
        except Exception as exc:
            error = exc
        _agree(error)
        timings["items_per_second"] = round((end - start) / max(timings["embed_seconds"], 1e-9), 1)

        outcome: BuildResult | str
        if rank == 0:
            try:
                assert item_ids is not None and queries is not None
                faiss.omp_set_num_threads(options.threads or (os.cpu_count() or 1))
                outcome = _index_and_publish(
                    bundle,
                    catalog,
                    item_ids,
                    queries,
                    staging,
                    data_dir,
                    root,
                    options,
                    device,
                    timings,
                )
                outcome.seconds = round(time.perf_counter() - started, 3)
            except Exception as exc:
                _broadcast(f"{type(exc).__name__}: {exc}")
                raise
            _broadcast(outcome)
        else:
            outcome = _broadcast(None)
            if isinstance(outcome, str):
                raise IndexBuildError(f"rank 0 failed: {outcome}")
        assert isinstance(outcome, BuildResult)
        return outcome
    raise AssertionError("unreachable")  # pragma: no cover


def _index_and_publish(
    bundle: ModelBundle,
    catalog: Catalog,
    item_ids: pa.Array,
    queries_and_source: tuple[FloatArray, str],
    staging: Path,
    data_dir: str | Path,
    root: Path,
    options: BuildOptions,
    device: str,
    timings: dict[str, Any],
) -> BuildResult:
    """Rank 0's part: index, tune, gate, write, publish, prune, announce."""
    vectors = np.load(staging / EMBEDDINGS_FILE, mmap_mode="r")  # (N, D) float32
    num_items, dim = vectors.shape
    factory = options.factory or choose_factory(num_items, dim)
    use_gpu = device.startswith("cuda")
    if use_gpu and not faiss_has_gpu():
        logger.info(
            "faiss has no GPU support here: FAISS on CPU, exact search with torch on %s", device
        )

    shards = f" x {options.shards} shards" if options.shards > 1 else ""
    with stage(f"train and fill {factory}{shards}", timings, "index_seconds"):
        bar = tqdm(
            total=num_items, unit="item", unit_scale=True, desc="add", disable=not options.progress
        )
        index, index_info = train_and_fill(
            factory,
            vectors,
            use_gpu=use_gpu,
            seed=options.seed,
            train_size=options.train_size,
            num_shards=options.shards,
            progress=bar.update,  # type: ignore[arg-type]  # tqdm's update returns a flag
        )
        bar.close()
    timings["train_seconds"] = index_info["train_seconds"]
    timings["add_seconds"] = index_info["add_seconds"]

    k = min(options.recall_k, num_items)
    queries, query_source = queries_and_source
    with stage(f"exact top-{k} of {len(queries)} real queries", timings, "exact_seconds"):
        exact_scores, _ = exact_search(queries, vectors, k, device=device)
        truth = GroundTruth(queries, exact_scores, k, num_items)

    tunable = not options.search_params and candidate_search_params(index, k) != [{}]
    order = np.random.default_rng(options.seed).permutation(len(queries))
    if tunable and len(queries) >= 2:
        tune_rows, gate_rows = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    else:
        tune_rows, gate_rows = order[:0], np.sort(order)
    with stage("tune search params and recall gate", timings, "gate_seconds"):
        target = min(1.0, options.recall_floor + TUNE_MARGIN)
        if tunable and len(tune_rows):
            params, trials = tune_search_params(index, vectors, truth.subset(tune_rows), target)
        else:
            params, trials = dict(options.search_params), []
        recall, search_seconds = measure_recall(index, vectors, truth.subset(gate_rows), params)
    passed = recall >= options.recall_floor
    logger.info(
        "recall gate: ANN recall@%d = %.4f on %d held-out queries (floor %.3f): %s",
        k,
        recall,
        len(gate_rows),
        options.recall_floor,
        "pass" if passed else ("FAIL, published anyway (--force)" if options.force else "FAIL"),
    )
    if not passed and not options.force:
        raise RecallGateError(
            f"ANN recall@{k} vs exact = {recall:.4f} on {len(gate_rows)} queries is below the "
            f"floor {options.recall_floor} (factory {factory!r}, search params {params}); "
            f"nothing was published, CURRENT is unchanged (pass --force to publish anyway)"
        )

    version = check_version_name(new_version_name())
    previous = current_or_none(root)
    model_config = bundle.config
    manifest_extra: dict[str, Any] = {
        "model": {
            "path": str(Path(bundle.path).resolve()),
            "checksum": bundle.checksum,
            "model_version": bundle.version,
            "output_dim": int(model_config.item.output_dim),
        },
        "catalog": {
            "data_dir": str(Path(data_dir).resolve()),
            "items_file": ITEMS_FILE,
            "item_id_column": ITEM_ID,
            "num_items": int(num_items),
        },
        "index": {
            "factory": factory,
            "factory_source": "given" if options.factory else "auto (by catalog size)",
            "metric": METRIC,
            "dim": int(dim),
            **index_info,
        },
        "recall": {
            "k": int(k),
            "recall": round(float(recall), 5),
            "floor": options.recall_floor,
            "passed": bool(passed),
            "forced": bool(options.force and not passed),
            "num_queries": len(gate_rows),
            "tune_queries": len(tune_rows),
            "query_source": query_source,
            "search_seconds": round(search_seconds, 4),
            "tuning": trials,
            "method": "hit = ANN item whose exact score >= exact k-th score (ties count)",
        },
        "build": {
            "world_size": _world(),
            "device": device,
            "host": socket.gethostname(),
            "previous_current": previous,
            "options": asdict(options) | {"redis_url": bool(options.redis_url)},
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "faiss": faiss.__version__,
                "numpy": np.__version__,
                "pyarrow": pa.__version__,
            },
        },
    }
    with stage(f"write version {version}", timings, "write_seconds"):
        manifest_extra["timings"] = dict(timings)
        try:
            path = write_index_version(
                root,
                version,
                index,
                None,
                item_ids,
                factory=factory,
                search_params=params,
                manifest_extra=manifest_extra,
            )
        except (OSError, RuntimeError) as exc:
            raise IndexBuildError(
                f"writing index version {version} under {root} failed ({exc}); nothing was "
                f"published, CURRENT is unchanged (disk full?)"
            ) from exc
    publish_current(root, version)
    pruned = prune_versions(root, options.keep)
    if options.redis_url:
        announce_version(options.redis_url, version)
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    return BuildResult(
        version=version, path=path, manifest=manifest, previous=previous, pruned=pruned, seconds=0.0
    )
