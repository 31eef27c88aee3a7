"""The index version format: the files `retrieval build-index` writes and readers check.

An index root holds published versions and a pointer to the one in use::

    INDEX_ROOT/
        CURRENT                      the name of the version in use (one line)
        versions/<version>/
            index.faiss              a FAISS index (inner product over L2-normalised item
                                     embeddings); label r = row r of the id table
            (or shard-000.faiss ...  a sharded version: shard s holds the contiguous rows
                                     [first_row_s, first_row_s + num_items_s), local label
                                     l = row first_row_s + l; searched as one
                                     `faiss.IndexShards` with successive ids)
            ids.parquet              one column `item_id` (string): the catalog's own ids
            manifest.json            format, version, model bundle checksum and version,
                                     catalog size, dim, factory, metric, search params,
                                     build time, the recall check, sha256 of every file

Versions are written to a temporary directory, fsynced and renamed into place, and only
then does `CURRENT` change (replaced atomically, by the `index` job's publisher), so a
reader sees the old version or the new one, never half of one. This module owns the
layout, the manifest and its checks, the id table and index-file checks, and both
directions of the format (`write_index_version`, `read_index_file`); loading a version
for search is `retrieval.index_store.load_index_version`. `verify_index_version` checks
every checksum and refuses manifest paths that leave the version directory.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> emb = np.eye(3, 4, dtype=np.float32)           # three unit vectors, D = 4
    >>> path = write_index_version(root, "v1", faiss.IndexFlatIP(4), emb, pa.array(["a", "b"]))
    Traceback (most recent call last):
    ...
    ValueError: `item_ids` has 2 ids for an index of 3 vectors
    >>> path = write_index_version(root, "v1", faiss.IndexFlatIP(4), emb, pa.array(["a", "b", "c"]))
    >>> manifest = verify_index_version(path)
    >>> manifest["catalog"], manifest["index"]["layout"], sorted(manifest["files"])
    ({'num_items': 3}, 'single', ['ids.parquet', 'index.faiss'])
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.atomic import TMP_PREFIX, atomic_directory, check_listed_files, sha256_file

INDEX_FORMAT = "two-tower-index"
INDEX_FORMAT_VERSION = 1  # one index file; what a single-index version is written as
SHARDED_FORMAT_VERSION = 2  # `index.layout` = "shards": readers of version 1 refuse it clearly
READABLE_FORMAT_VERSIONS = (INDEX_FORMAT_VERSION, SHARDED_FORMAT_VERSION)
VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SHARD_FILE = "shard-{:03d}.faiss"  # shard s of a sharded version
LAYOUT_SINGLE = "single"
LAYOUT_SHARDS = "shards"
IDS_FILE = "ids.parquet"
ID_COLUMN = "item_id"
METRIC = "inner_product"

# Redis channel on which the index job announces a newly published version name.
PUBLISH_CHANNEL = "retrieval:index:published"

# Search-time parameters understood by `faiss.ParameterSpace` that a manifest may carry.
# k_factor: IndexIVFPQR; k_factor_rf: the refine factor of an `...,RFlat` (IndexRefine) index.
SEARCH_PARAM_NAMES = ("nprobe", "efSearch", "k_factor", "k_factor_rf", "quantizer_efSearch", "ht")

_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

FloatArray = npt.NDArray[np.float32]


class IndexStoreError(ValueError):
    """An index root or version is missing, incomplete, of an unknown format or unsafe."""


class ChecksumMismatchError(IndexStoreError):
    """A file of an index version differs from the sha256 its manifest records."""


# --------------------------------------------------------------------------- names, CURRENT


def check_version_name(name: str) -> str:
    """Return `name` if it is a safe version directory name, else raise.

    >>> check_version_name("20250101T000000.000000Z-1a2b3c4d")
    '20250101T000000.000000Z-1a2b3c4d'
    >>> check_version_name("../etc")
    Traceback (most recent call last):
    ...
    retrieval.index_format.IndexStoreError: version name must match [A-Za-z0-9][A-Za-z0-9._-]* and hold no '..'; got '../etc'
    """
    if not isinstance(name, str) or not _VERSION_NAME.match(name) or ".." in name:
        raise IndexStoreError(
            f"version name must match [A-Za-z0-9][A-Za-z0-9._-]* and hold no '..'; got {name!r}"
        )
    return name


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 with microseconds (sorts like time)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def versions_dir(root: str | Path) -> Path:
    return Path(root) / VERSIONS_DIR


def read_current(root: str | Path) -> str:
    """The version name in `root/CURRENT`.

    Raises:
        FileNotFoundError: `root` has no CURRENT file (nothing was published yet).
        IndexStoreError: CURRENT does not hold a valid version name.
    """
    path = Path(root) / CURRENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CURRENT file (no index version published yet)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexStoreError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}: {raw[:40]!r}); "
            "CURRENT must hold one version name"
        ) from exc
    return check_version_name(text.strip())


def version_path(root: str | Path, version: str) -> Path:
    """`root/versions/<version>`, refused when it is a symlink or resolves outside the root."""
    parent = versions_dir(root)
    path = parent / check_version_name(version)
    if path.is_symlink():
        raise IndexStoreError(f"{path}: a version directory must not be a symbolic link")
    if not path.resolve().is_relative_to(parent.resolve()):
        raise IndexStoreError(f"{path}: resolves outside {parent}")
    return path


# --------------------------------------------------------------------------- manifest, checks


def read_index_manifest(path: str | Path) -> dict[str, Any]:
    """Read and format-check `path/manifest.json` (no file checksums: see `verify_index_version`)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise IndexStoreError(f"index version not found: {path} is not a directory")
    if not manifest_path.is_file():
        raise IndexStoreError(f"{path}: not an index version ({MANIFEST_FILE} missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexStoreError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexStoreError(f"{manifest_path}: `format` must be {INDEX_FORMAT!r}; got {found!r}")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise IndexStoreError(
            f"{manifest_path}: unsupported `format_version` {manifest.get('format_version')!r} "
            f"(this code reads {list(READABLE_FORMAT_VERSIONS)})"
        )
    index_files(manifest, path)  # the layout is well formed
    return manifest


@dataclass(frozen=True)
class ShardEntry:
    """One index file of a version: its rows of the id table are [first_row, first_row + num_items)."""

    file: str
    first_row: int
    num_items: int


def index_files(manifest: Mapping[str, Any], where: Path | str = "") -> list[ShardEntry]:
    """The index files a manifest names, in label order (one entry unless sharded).

    Raises:
        IndexStoreError: unknown layout, or shards that do not tile [0, num_items).
    """
    section = manifest.get("index")
    catalog = manifest.get("catalog")
    if not isinstance(section, Mapping) or not isinstance(catalog, Mapping):
        raise IndexStoreError(f"{where}: manifest lacks its `index` or `catalog` section")
    layout = section.get("layout", LAYOUT_SINGLE)
    try:
        num_items = int(catalog["num_items"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexStoreError(f"{where}: manifest `catalog.num_items` missing or bad") from exc
    if layout == LAYOUT_SINGLE:
        if "shards" in section:
            raise IndexStoreError(f"{where}: manifest has `index.shards` but layout 'single'")
        return [ShardEntry(str(section.get("index_file")), 0, num_items)]
    if layout != LAYOUT_SHARDS:
        raise IndexStoreError(
            f"{where}: unknown `index.layout` {layout!r}; known: {[LAYOUT_SINGLE, LAYOUT_SHARDS]}"
        )
    if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise IndexStoreError(
            f"{where}: a sharded layout needs `format_version` {SHARDED_FORMAT_VERSION}; "
            f"got {manifest.get('format_version')!r}"
        )
    raw = section.get("shards")
    if not isinstance(raw, list) or not raw:
        raise IndexStoreError(f"{where}: sharded layout without an `index.shards` list")
    entries, row = [], 0
    for number, item in enumerate(raw):
        try:
            entry = ShardEntry(str(item["file"]), int(item["first_row"]), int(item["num_items"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexStoreError(
                f"{where}: `index.shards[{number}]` needs file, first_row, num_items; got {item!r}"
            ) from exc
        if entry.first_row != row or entry.num_items < 0:
            raise IndexStoreError(
                f"{where}: `index.shards[{number}]` covers rows from {entry.first_row} "
                f"({entry.num_items} items); expected rows from {row}: shards must tile the id "
                f"table in order"
            )
        row += entry.num_items
        entries.append(entry)
    if row != num_items:
        raise IndexStoreError(f"{where}: the shards hold {row} items; the catalog has {num_items}")
    if len({entry.file for entry in entries}) != len(entries):
        raise IndexStoreError(f"{where}: `index.shards` names a file twice")
    return entries


def safe_member(root: Path, rel: Any) -> Path:
    """`root / rel` for a manifest entry, refused when it could leave `root`."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel:
        raise IndexStoreError(f"{root}: manifest file entry {rel!r} is not a relative path")
    parts = Path(rel).parts
    if any(part in ("..", ".") for part in parts):
        raise IndexStoreError(f"{root}: manifest file entry {rel!r} escapes the version")
    path = root / rel
    walk = root
    for part in parts:  # no symlink anywhere below the version directory
        walk = walk / part
        if walk.is_symlink():
            raise IndexStoreError(f"{root}: manifest file entry {rel!r} is a symbolic link")
    if not path.resolve().is_relative_to(root.resolve()):
        raise IndexStoreError(f"{root}: manifest file entry {rel!r} points outside the version")
    return path


def _version_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() != MANIFEST_FILE
    }


def verify_index_version(path: str | Path) -> dict[str, Any]:
    """Check every file of the version directory `path` against its manifest; return it.

    Raises:
        IndexStoreError: the manifest is missing or malformed, a file is missing or not
            listed, or an entry is absolute, holds '..' or is a symbolic link.
        ChecksumMismatchError: a file's sha256 differs from the manifest's.
    """
    root = Path(path)
    manifest = read_index_manifest(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IndexStoreError(f"{root}: manifest has no `files` table")
    required: dict[str, Any] = {
        f"index file #{i}": entry.file for i, entry in enumerate(index_files(manifest, root))
    }
    required["id table"] = (manifest.get("ids") or {}).get("file")
    for what, name in required.items():
        if name not in files:
            raise IndexStoreError(f"{root}: manifest `files` does not list its {what} {name!r}")
    resolved = {rel: safe_member(root, rel) for rel in files}
    check_listed_files(root, files, _version_files(root), IndexStoreError)
    for rel, digest in files.items():
        actual = sha256_file(resolved[rel])
        if actual != digest:
            raise ChecksumMismatchError(
                f"{root / rel}: checksum mismatch (manifest {str(digest)[:12]}..., "
                f"file {actual[:12]}...); the version is corrupt or was modified"
            )
    return manifest


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class VersionInfo:
    """One entry of `list_versions`: name, directory and the manifest's summary.

    Args:
        name: version name (directory name under `versions/`).
        path: the version directory.
        current: whether CURRENT names it.
        manifest: its manifest, or None when it cannot be read (`error` says why).
        error: why the manifest could not be read.
    """

    name: str
    path: Path
    current: bool
    manifest: dict[str, Any] | None = None
    error: str | None = None

    @property
    def created(self) -> str:
        return str((self.manifest or {}).get("created", ""))

    @property
    def num_items(self) -> int | None:
        value = (self.manifest or {}).get("catalog", {}).get("num_items")
        return int(value) if value is not None else None

    @property
    def factory(self) -> str | None:
        return (self.manifest or {}).get("index", {}).get("factory")

    @property
    def recall(self) -> float | None:
        value = (self.manifest or {}).get("recall", {}).get("recall")
        return float(value) if value is not None else None

    @property
    def shards(self) -> int:
        """Index files of the version (1 unless it was built with ``--shards``)."""
        listed = (self.manifest or {}).get("index", {}).get("shards")
        return len(listed) if isinstance(listed, list) and listed else 1


def list_versions(root: str | Path) -> list[VersionInfo]:
    """Every version directory under `root/versions`, oldest first (by build time, then name).

    Temporaries of interrupted writes (names starting with `.tmp-`) are not versions.
    Manifests are format-checked but checksums are not computed (see `verify_index_version`).
    """
    parent = versions_dir(root)
    if not parent.is_dir():
        return []
    try:
        current: str | None = read_current(root)
    except (FileNotFoundError, IndexStoreError):
        current = None
    infos = []
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX) or not _VERSION_NAME.match(entry.name):
            continue
        manifest: dict[str, Any] | None = None
        error = None
        try:
            path = version_path(root, entry.name)
            manifest = read_index_manifest(path)
        except IndexStoreError as exc:
            error = str(exc)
        infos.append(
            VersionInfo(entry.name, entry, entry.name == current, manifest=manifest, error=error)
        )
    return sorted(infos, key=lambda info: (info.created, info.name))


# --------------------------------------------------------------------------- search params


def format_search_params(params: Mapping[str, Any]) -> str:
    """`{"nprobe": 64}` -> `"nprobe=64"` (the `faiss.ParameterSpace` syntax).

    >>> format_search_params({"nprobe": 64, "efSearch": 128})
    'nprobe=64,efSearch=128'
    """
    unknown = sorted(set(params) - set(SEARCH_PARAM_NAMES))
    if unknown:
        raise ValueError(f"unknown search params {unknown}; known: {list(SEARCH_PARAM_NAMES)}")
    return ",".join(f"{name}={value}" for name, value in params.items())


def parse_search_params(text: str) -> dict[str, int | float]:
    """`"nprobe=64,efSearch=128"` -> `{"nprobe": 64, "efSearch": 128}`.

    >>> parse_search_params("nprobe=64, k_factor=1.5")
    {'nprobe': 64, 'k_factor': 1.5}
    """
    params: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in SEARCH_PARAM_NAMES:
            raise ValueError(
                f"search params must be NAME=VALUE with NAME in {list(SEARCH_PARAM_NAMES)}; "
                f"got {item!r}"
            )
        number = float(value)
        params[name.strip()] = int(number) if number.is_integer() and "." not in value else number
    return params


def apply_search_params(index: Any, params: Mapping[str, Any]) -> None:
    """Set search-time parameters (nprobe, efSearch, ...) on a CPU or GPU index."""
    format_search_params(params)  # refuses unknown names
    gpu = hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as exc:
            raise ValueError(
                f"search param {name}={value} does not apply to this index: {exc}"
            ) from exc


# --------------------------------------------------------------------------- shards


def shard_indexes(index: faiss.Index) -> list[faiss.Index] | None:
    """The sub-indexes of a `faiss.IndexShards` (downcast, in label order), else None."""
    concrete: Any = faiss.downcast_index(index)
    if not isinstance(concrete, faiss.IndexShards):
        return None
    shards: Any = concrete  # the SWIG-derived types lack at() / count()
    return [faiss.downcast_index(shards.at(i)) for i in range(shards.count())]


def assemble_shards(parts: Sequence[faiss.Index]) -> faiss.IndexShards:
    """One `faiss.IndexShards` over `parts`: label of part s's local row l = l + rows before s.

    Searches run the parts on one thread each and merge their top-k, so results equal
    one index holding all rows in order (exactly for Flat; for IVF when every part shares
    the trained coarse quantizer). The Python wrapper keeps `parts` alive.

    >>> a, b = faiss.IndexFlatIP(2), faiss.IndexFlatIP(2)
    >>> a.add(np.array([[1, 0]], np.float32)); b.add(np.array([[0, 1], [0.6, 0.8]], np.float32))
    >>> assemble_shards([a, b]).search(np.array([[0, 1]], np.float32), 3)[1].tolist()
    [[1, 2, 0]]
    """
    if not parts:
        raise ValueError("`parts` must hold at least one index")
    dim = int(parts[0].d)
    # (dim, threaded, successive_ids); mypy sees only the first SWIG overload
    shards: Any = faiss.IndexShards(dim, True, True)  # type: ignore[call-arg]
    for part in parts:
        if int(part.d) != dim or part.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(
                f"every shard must be an inner-product index of dim {dim}; got dim {part.d}, "
                f"metric {part.metric_type}"
            )
        shards.add_shard(part)
    return shards


# --------------------------------------------------------------------------- ids, index files


def check_item_ids(ids: pa.Array, where: Path | str) -> None:
    """Refuse an id table the service cannot map rows through: ids must be strings
    (`string` or `large_string`), none null, none repeated (a repeated id would make
    `row_of` and the exclusion of seen items pick one of its rows only).

    >>> check_item_ids(pa.array(["a", "b"]), "ids")
    >>> check_item_ids(pa.array(["a", "b", "a"]), "ids")
    Traceback (most recent call last):
    ...
    retrieval.index_format.IndexStoreError: ids: 1 item ids occur more than once, e.g. ['a']; ids must be unique
    """
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise IndexStoreError(
            f"{where}: `{ID_COLUMN}` must be strings (string or large_string); got type {ids.type}"
        )
    if ids.null_count:
        rows = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))
        raise IndexStoreError(
            f"{where}: {ids.null_count} `{ID_COLUMN}` values are null, e.g. at rows "
            f"{rows[:5].tolist()}; every row needs an id"
        )
    if len(pc.unique(ids)) != len(ids):
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        raise IndexStoreError(
            f"{where}: {len(repeated)} item ids occur more than once, e.g. "
            f"{repeated[:5].to_pylist()}; ids must be unique"
        )


def read_item_ids(path: Path, expected: int) -> pa.Array:
    """The id table of a version as one string array, checked against the manifest's count
    and by `check_item_ids` (strings, none null, none repeated)."""
    try:
        table = pq.read_table(path, columns=[ID_COLUMN])
    except (pa.ArrowException, OSError) as exc:
        raise IndexStoreError(f"{path}: not a readable id table ({exc})") from exc
    ids = table[ID_COLUMN].combine_chunks()
    if len(ids) != expected:
        raise IndexStoreError(f"{path}: expected {expected} ids; found {len(ids)}")
    check_item_ids(ids, path)
    return ids


def check_row_labels(index: faiss.Index, where: Path | str) -> None:
    """Refuse an index whose search labels are not row positions of the id table.

    `IndexIDMap` / `IndexIDMap2` (also under a pre-transform or a refine stage) return
    labels of the caller's choosing; the service maps label r to row r of ``ids.parquet``
    and would answer with wrong ids, or fail, on such an index.
    """
    seen: Any = faiss.downcast_index(index)
    while seen is not None:
        if isinstance(seen, faiss.IndexIDMap | faiss.IndexIDMap2):
            raise IndexStoreError(
                f"{where}: the index is an id map ({type(seen).__name__}): its labels are "
                "ids of its own, not row positions of the id table; build the index without "
                "an id map"
            )
        inner = None
        if isinstance(seen, faiss.IndexPreTransform):
            inner = seen.index
        elif isinstance(seen, faiss.IndexRefine):
            inner = seen.base_index
        seen = faiss.downcast_index(inner) if inner is not None else None


def read_index_file(path: Path, num_items: int, dim: int, *, mmap: bool = False) -> faiss.Index:
    """Read one index file and check it against the manifest (count, dim, metric) and
    its labels (`check_row_labels`).

    With `mmap`, the inverted lists of an IVF index (also behind a pre-transform or a
    refine stage) are not read but mapped read-only from the file
    (``faiss.IO_FLAG_MMAP``, giving `faiss.OnDiskInvertedLists`): their codes and ids stay
    in the page cache, one copy shared by every process that serves the same version,
    loaded as searches touch them. This is safe because version files are immutable:
    written once, then published by an atomic rename, never rewritten in place (a deleted
    version stays readable to processes that still map it). The rest of the index (the
    coarse quantizer, a refine stage's vectors) and indexes without such lists (Flat,
    HNSW, fast-scan IVF) FAISS reads into memory as it does without `mmap`.
    """
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as exc:
        raise IndexStoreError(f"{path}: not a readable FAISS index ({exc})") from exc
    if mmap:
        _stop_list_prefetch(index)
    if index.ntotal != num_items or index.d != dim:
        raise IndexStoreError(
            f"{path}: holds {index.ntotal} vectors of dim {index.d}; the manifest says "
            f"{num_items} of dim {dim}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexStoreError(f"{path}: metric must be inner product")
    check_row_labels(index, path)
    return index


def _stop_list_prefetch(index: faiss.Index) -> None:
    """Turn off the prefetch threads of mapped inverted lists: by default each FAISS search
    joins the previous search's prefetch threads (under one lock shared by all searches)
    and starts up to 32 new ones to touch the probed lists' pages ahead of the scan. The
    service searches from threads of its own, and pages in the page cache need no prefetch."""
    try:
        ivf: Any = faiss.extract_index_ivf(index)
    except RuntimeError:  # no IVF inside: nothing was mapped
        return
    invlists: Any = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(invlists, faiss.OnDiskInvertedLists):
        invlists.prefetch_nthread = 0


# --------------------------------------------------------------------------- writing one version


def write_index_version(
    root: str | Path,
    version: str,
    index: faiss.Index,
    add_vectors: FloatArray | None,
    item_ids: pa.Array | pa.ChunkedArray,
    *,
    factory: str = "Flat",
    search_params: Mapping[str, Any] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `root/versions/<version>` atomically (temp dir, fsync, rename); returns its path.

    This writes the version only; making it current is the publisher's job (the `index`
    job package). `add_vectors`, when given, are added to an empty `index` first
    (small indexes, tests); otherwise `index` must already hold one vector per id.

    Args:
        root: the index root.
        version: the new version's name.
        index: a CPU FAISS index with inner-product metric, or a `faiss.IndexShards` of
            them with successive ids (`assemble_shards`): then each part is written to its
            own file (`shard-000.faiss`, ...), the manifest records the layout and the
            version is readable only by code that knows it (`format_version` 2).
        add_vectors: optional `[N, D]` float32 vectors to add to `index`.
        item_ids: the N catalog ids (label r = ids[r]); strings, distinct, no nulls
            (`check_item_ids`).
        factory: the index factory string recorded in the manifest.
        search_params: search-time parameters recorded in the manifest (nprobe, efSearch).
        manifest_extra: further manifest sections (model, recall, timings, build...).
    """
    check_version_name(version)
    if add_vectors is not None:
        index.add(np.ascontiguousarray(add_vectors, dtype=np.float32))
    ids = item_ids.combine_chunks() if isinstance(item_ids, pa.ChunkedArray) else item_ids
    check_item_ids(ids, "`item_ids`")  # what a reader would refuse is not written
    if len(ids) != index.ntotal:
        raise ValueError(f"`item_ids` has {len(ids)} ids for an index of {index.ntotal} vectors")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("`index` must use the inner-product metric")
    parts = shard_indexes(index)
    for part in parts if parts is not None else [index]:
        check_row_labels(part, "`index`")
    if parts is not None:
        concrete: Any = faiss.downcast_index(index)
        if not concrete.successive_ids:
            raise ValueError("`index` is an IndexShards without successive ids")
        if any(part.metric_type != faiss.METRIC_INNER_PRODUCT for part in parts):
            raise ValueError("every shard of `index` must use the inner-product metric")
    layout: dict[str, Any]
    if parts is None:
        layout = {"layout": LAYOUT_SINGLE, "index_file": INDEX_FILE}
        written = [(INDEX_FILE, index)]
    else:
        written = [(SHARD_FILE.format(s), part) for s, part in enumerate(parts)]
        firsts = np.cumsum([0] + [int(part.ntotal) for part in parts])
        layout = {
            "layout": LAYOUT_SHARDS,
            "shards": [
                {"file": name, "first_row": int(firsts[s]), "num_items": int(part.ntotal)}
                for s, (name, part) in enumerate(written)
            ],
        }
    final = version_path(root, version)
    with atomic_directory(final) as tmp:
        for name, part in written:
            faiss.write_index(part, str(tmp / name))
        pq.write_table(pa.table({ID_COLUMN: ids}), tmp / IDS_FILE)
        files = {name: sha256_file(tmp / name) for name in [n for n, _ in written] + [IDS_FILE]}
        manifest: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION if parts is None else SHARDED_FORMAT_VERSION,
            "version": version,
            "created": utc_timestamp(),
            "catalog": {"num_items": int(index.ntotal)},
            "index": {
                **layout,
                "factory": factory,
                "metric": METRIC,
                "dim": int(index.d),
                "normalized": True,
                "search_params": dict(search_params or {}),
            },
            "ids": {"file": IDS_FILE, "column": ID_COLUMN},
        }
        for key, value in (manifest_extra or {}).items():
            if isinstance(value, Mapping) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        manifest["files"] = files
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        (tmp / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return final
