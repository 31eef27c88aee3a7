"""A loaded index version: what the service and the evaluator search.

`load_index_version` reads a version in the format of `retrieval.index_format`
(checksums first, then the files), checks what the serving path relies on, and returns
an `IndexVersion`: the FAISS index, the id table, the manifest and the one
`retrieval.searchers.Searcher` that answers its queries (FAISS on the CPU until
`use_list_scanner` or `to_gpu` replaces it). Writing versions is
`retrieval.index_format.write_index_version`; publishing them is the `index` job's.

The format's names that readers use (`read_current`, `list_versions`, the errors, ...)
are importable from here too, so a reader needs one import.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> emb = np.eye(3, 4, dtype=np.float32)           # three unit vectors, D = 4
    >>> _ = write_index_version(root, "v1", faiss.IndexFlatIP(4), emb, pa.array(["a", "b", "c"]))
    >>> _ = (root / CURRENT_FILE).write_text("v1\\n")
    >>> version = load_index_version(root)
    >>> version.version, version.num_items, version.dim, version.device
    ('v1', 3, 4, 'cpu')
    >>> scores, rows = version.search(np.array([[0, 1, 0.5, 0]], dtype=np.float32), k=4)
    >>> rows.tolist(), version.ids_of(rows), float(scores[0, 3])
    ([[1, 2, 0, -1]], [['b', 'c', 'a']], -inf)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch

from retrieval.index_format import (
    CURRENT_FILE,
    IDS_FILE,
    INDEX_FILE,
    LAYOUT_SHARDS,
    LAYOUT_SINGLE,
    METRIC,
    PUBLISH_CHANNEL,
    ChecksumMismatchError,
    IndexStoreError,
    VersionInfo,
    apply_search_params,
    assemble_shards,
    check_item_ids,
    check_version_name,
    format_search_params,
    index_files,
    list_versions,
    parse_search_params,
    read_current,
    read_index_file,
    read_index_manifest,
    read_item_ids,
    safe_member,
    shard_indexes,
    verify_index_version,
    version_path,
    versions_dir,
    write_index_version,
)
from retrieval.searchers import (
    GPU_MAX_K,
    FaissCpuSearcher,
    FaissGpuSearcher,
    ListScanSearcher,
    Searcher,
    TorchExactSearcher,
    faiss_has_gpu,
    reconstruct_all,
    torch_exact_search,
)

# Names of the format and the searchers that readers import from here.
__all__ = [
    "CURRENT_FILE",
    "GPU_MAX_K",
    "IDS_FILE",
    "INDEX_FILE",
    "METRIC",
    "PUBLISH_CHANNEL",
    "ChecksumMismatchError",
    "IndexStoreError",
    "IndexVersion",
    "VersionInfo",
    "apply_search_params",
    "as_query_array",
    "assemble_shards",
    "check_item_ids",
    "check_k",
    "check_version_name",
    "faiss_has_gpu",
    "list_versions",
    "load_index_version",
    "parse_search_params",
    "probe_search",
    "read_current",
    "reconstruct_all",
    "shard_indexes",
    "torch_exact_search",
    "verify_index_version",
    "version_path",
    "versions_dir",
    "write_index_version",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- query checks


def as_query_array(query_emb: npt.ArrayLike | torch.Tensor, dim: int) -> FloatArray:
    """Queries as a C-contiguous float32 `[Q, dim]` array, checked finite."""
    if isinstance(query_emb, torch.Tensor):
        query_emb = query_emb.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(np.asarray(query_emb, dtype=np.float32))
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"`query_emb` must be [Q, {dim}]; got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError("`query_emb` must be finite (found NaN or inf)")
    return array


def check_k(k: int) -> int:
    """`k` as an int, refused unless it is an int (not a bool) >= 1."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"`k` must be an int >= 1; got {k!r}")
    return int(k)


# --------------------------------------------------------------------------- serving checks

PROBE_QUERIES = 4  # random unit vectors searched by `probe_search` when a version loads
PROBE_K = 10  # k of the probe (min(PROBE_K, N))


def probe_search(index: faiss.Index, num_items: int, where: Path | str) -> None:
    """Search a few random unit vectors (seeded) the way the service will, and refuse the
    index unless every query finds at least one item, every label is a row in
    [0, num_items) (or -1, an empty slot) and every score of a found item is finite.

    An index can pass every file check and still answer with labels outside the id table
    (ids added with `add_with_ids`) or NaN scores (non-finite vectors): this is where such
    a version is refused, before it serves. At least one item, not k: an IVF index with a
    small nprobe legitimately finds fewer than k items for some queries.
    """
    k = min(PROBE_K, num_items)
    normal = np.random.default_rng(0).standard_normal((PROBE_QUERIES, index.d))
    queries: FloatArray = np.ascontiguousarray(
        normal / np.linalg.norm(normal, axis=1, keepdims=True), dtype=np.float32
    )  # (PROBE_QUERIES, D)
    try:
        scores, labels = index.search(queries, k)
    except RuntimeError as exc:
        raise IndexStoreError(f"{where}: a probe search failed ({exc})") from exc
    labels = np.asarray(labels, dtype=np.int64)
    outside = labels[(labels < -1) | (labels >= num_items)]
    if outside.size:
        raise IndexStoreError(
            f"{where}: a probe search returned labels {sorted(set(outside.tolist()))[:5]} "
            f"outside the id table's rows [0, {num_items}): labels must be row positions"
        )
    found = labels >= 0
    if not found.any(axis=1).all():
        raise IndexStoreError(
            f"{where}: a probe search of {k} items found none for "
            f"{int((~found.any(axis=1)).sum())} of {PROBE_QUERIES} queries; the index is empty "
            "or broken"
        )
    if not np.isfinite(np.asarray(scores)[found]).all():
        raise IndexStoreError(
            f"{where}: a probe search returned non-finite scores (NaN or inf vectors in the index?)"
        )


# --------------------------------------------------------------------------- the loaded version


@dataclass
class IndexVersion:
    """A loaded, verified index version: FAISS index, id table, manifest and its searcher.

    Args:
        path: the version directory.
        version: its name.
        manifest: the parsed manifest.
        index: the CPU FAISS index (label = row of `item_ids`); it keeps the search
            parameters in effect whichever searcher runs.
        item_ids: the catalog's string ids (pyarrow string array, row = label).
        search_params: the parameters in effect (from the manifest, or `set_search_params`).

    The version holds exactly one `retrieval.searchers.Searcher` (`searcher`): FAISS on
    the CPU when loaded; `use_list_scanner` and `to_gpu` replace it.

    Shapes:
        `search`: ``[Q, D]`` float32 -> ``(scores [Q, k] float32, rows [Q, k] int64)``,
        rows padded with -1 and scores with -inf where fewer than k items come back.
    """

    path: Path
    version: str
    manifest: dict[str, Any]
    index: faiss.Index
    item_ids: pa.Array
    search_params: dict[str, Any] = field(default_factory=dict)
    searcher: Searcher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.searcher = FaissCpuSearcher(self.index)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def factory(self) -> str:
        return str(self.manifest["index"]["factory"])

    @property
    def num_shards(self) -> int:
        """1 for a single index, else the number of sub-indexes of the `faiss.IndexShards`."""
        parts = shard_indexes(self.index)
        return 1 if parts is None else len(parts)

    @property
    def device(self) -> str:
        """Where `search` runs: the searcher's name ("cpu", "cpu (list scanner)",
        "cuda (faiss)" or "cuda (torch exact)")."""
        return self.searcher.name

    def use_list_scanner(self) -> bool:
        """Search on the CPU with `ListScanner` from now on, when the index is a single
        inner-product IVF-SQ8 (same answers as FAISS, 20-37 % less time at k = 1000);
        returns whether it applies. It keeps the ids (N x 8 bytes) and, unless the version
        was loaded with ``mmap=True``, a copy of the codes (N x D bytes more); with
        ``mmap=True`` it reads the codes from the mapped index file, no copy.
        A version already searching on a GPU keeps its GPU searcher (returns False)."""
        if isinstance(self.searcher, FaissCpuSearcher):
            scanner = ListScanSearcher.from_index(self.index)
            if scanner is not None:
                self.searcher = scanner
        return isinstance(self.searcher, ListScanSearcher)

    def set_search_params(self, **params: Any) -> None:
        """Override search-time parameters, e.g. ``set_search_params(nprobe=32)``."""
        self.searcher.set_search_params(params)
        self.search_params = {**self.search_params, **params}

    def to_gpu(self, device: int = 0) -> str:
        """Search on a GPU from now on; returns the backend ("faiss" or "torch").

        With faiss-gpu the index is copied to the GPU (`FaissGpuSearcher`; k is then
        capped at 2048). Without it, a CUDA exact search through torch over the stored
        vectors is used (`TorchExactSearcher`: exact, so no k cap; needs an index that can
        reconstruct its vectors, e.g. Flat or IVF-Flat).

        Raises:
            IndexStoreError: no CUDA device, or the index cannot go to the GPU either way.
        """
        if faiss_has_gpu():
            self.searcher = FaissGpuSearcher.from_index(
                self.index, self.search_params, device, what=f"index {self.factory!r}"
            )
            return "faiss"
        if not torch.cuda.is_available():
            raise IndexStoreError("no CUDA device is available for GPU search")
        self.searcher = TorchExactSearcher.from_index(self.index, f"cuda:{device}")
        return "torch"

    def search(
        self, query_emb: npt.ArrayLike | torch.Tensor, k: int
    ) -> tuple[FloatArray, IntArray]:
        """Top-k item rows by inner product; see the class docstring for shapes."""
        k = check_k(k)
        queries = as_query_array(query_emb, self.dim)
        scores, rows = self.searcher.search(queries, k)
        rows = rows.astype(np.int64, copy=False)
        scores = scores.astype(np.float32, copy=False)
        scores[rows < 0] = -np.inf
        return scores, rows

    def ids_of(self, rows: npt.ArrayLike) -> list[list[str]]:
        """Catalog ids of `rows` ([Q, k] from `search`), -1 slots dropped."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2:
            raise ValueError(f"`rows` must be [Q, k]; got shape {rows.shape}")
        out = []
        for row in rows:
            valid = row[row >= 0]
            out.append(self.item_ids.take(pa.array(valid)).to_pylist())
        return out

    def search_ids(
        self, query_emb: npt.ArrayLike | torch.Tensor, k: int
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Top-k catalog ids and their scores per query (empty slots dropped)."""
        scores, rows = self.search(query_emb, k)
        ids = self.ids_of(rows)
        return ids, [s[r >= 0].tolist() for s, r in zip(scores, rows, strict=True)]

    def row_of(self, item_ids: Sequence[str] | pa.Array) -> IntArray:
        """Row (label) of each catalog id; -1 when the id is not in this version."""
        found = pc.index_in(pa.array(item_ids, type=self.item_ids.type), value_set=self.item_ids)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def load_index_version(
    root: str | Path, version: str | None = None, *, verify: bool = True, mmap: bool = False
) -> IndexVersion:
    """Load version `version` of the index root `root` (default: the one CURRENT names).

    Every file is checked against the manifest's sha256 first (`verify=False` skips the
    hashing, not the path checks). The manifest's search params are applied. Then what
    the serving path relies on is checked, so that a version that would answer wrongly
    is refused here rather than swapped in: ids strings, none null, none repeated
    (`check_item_ids`); labels that are row positions (`check_row_labels`, no id map); a
    probe search finding rows in [0, N) with finite scores (`probe_search`).

    With `mmap`, the inverted lists of IVF index files are memory-mapped, not read (what
    is mapped and why it is safe: `retrieval.index_format.read_index_file`), and
    `IndexVersion.use_list_scanner` scans them in place.

    Raises:
        FileNotFoundError: no CURRENT (when `version` is None) or no such version.
        IndexStoreError: unsafe name or path, bad or malformed manifest (a missing key or
            a section of the wrong type included), inconsistent files, or a version that
            fails the serving checks above.
        ChecksumMismatchError: a file was modified.
    """
    try:
        return _load_index_version(root, version, verify=verify, mmap=mmap)
    except (KeyError, TypeError, AttributeError) as exc:
        where = version if version is not None else CURRENT_FILE
        raise IndexStoreError(
            f"index version {where!r} under {Path(root)}: malformed manifest "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _load_index_version(
    root: str | Path, version: str | None, *, verify: bool, mmap: bool
) -> IndexVersion:
    """`load_index_version` without the translation of malformed-manifest errors."""
    name = read_current(root) if version is None else check_version_name(version)
    path = version_path(root, name)
    if not path.is_dir():
        raise FileNotFoundError(f"index version {name!r} not found under {versions_dir(root)}")
    started = time.perf_counter()
    manifest = verify_index_version(path) if verify else read_index_manifest(path)
    if verify is False:
        for rel in manifest.get("files", {}):
            safe_member(path, rel)
    if manifest.get("version") != name:
        raise IndexStoreError(
            f"{path}: manifest names version {manifest.get('version')!r}, not {name!r}"
        )
    ids_file = safe_member(path, manifest["ids"]["file"])
    num_items = int(manifest["catalog"]["num_items"])
    dim = int(manifest["index"]["dim"])
    entries = index_files(manifest, path)
    parts = [
        read_index_file(safe_member(path, e.file), e.num_items, dim, mmap=mmap) for e in entries
    ]
    sharded = manifest["index"].get("layout", LAYOUT_SINGLE) == LAYOUT_SHARDS
    index = assemble_shards(parts) if sharded else parts[0]
    item_ids = read_item_ids(ids_file, num_items)
    params = dict(manifest["index"].get("search_params") or {})
    apply_search_params(index, params)
    probe_search(index, num_items, path)
    logger.info(
        "index version %s loaded%s: %d items, dim %d, %s%s %s in %.2fs",
        name,
        " (memory-mapped)" if mmap else "",
        num_items,
        dim,
        manifest["index"]["factory"],
        f" x {len(parts)} shards" if sharded else "",
        format_search_params(params) or "(no search params)",
        time.perf_counter() - started,
    )
    return IndexVersion(
        path=path,
        version=name,
        manifest=manifest,
        index=index,
        item_ids=item_ids,
        search_params=params,
    )
