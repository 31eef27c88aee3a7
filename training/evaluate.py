"""`retrieval evaluate`: full-catalog recall of a model bundle, exact and through a published
ANN index, next to the popularity, EASE and ALS baselines, under the fixed split protocol.

Usage::

    retrieval evaluate --model artifacts/demo/model --data artifacts/demo/data
    retrieval evaluate --model M --data D --index artifacts/demo/index --json eval.json
    retrieval evaluate --model M --data D --split valid --k 10,50 --max-users 5000 \\
        --baselines popularity
    retrieval evaluate --model M --data data/ml-100k-cold-items --cold items

Protocol (`retrieval.evaluation`): for the target split S, a user with interactions in S is
queried with their features and the history at the end of their context (train for valid;
train + valid for test); the whole catalog minus the context items is ranked; the held-out
set is their S items. Metrics: recall@K, hit-rate@K and NDCG@K (`retrieval.evaluation.metrics`).

Stages (timed, with progress bars): load bundle and dataset -> build queries -> embed the
catalog in slices -> exact top-K in query chunks (memory: one ``[chunk, item_chunk]`` score
block plus the ``[Q, K]`` ranking, so 1M-item catalogs fit) -> optionally the same queries
through the ANN index, over-fetching ``K + (most context items of a query in the chunk)``,
dropping context items and keeping K, reported as the ANN/exact recall ratio and the
overlap with the exact top-K -> baselines -> table on stdout, JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.cli import UsageError
from retrieval.features import SPLITS
from retrieval.kinds import BASELINES
from retrieval.stages import stage

if TYPE_CHECKING:  # the job's heavy modules are imported when it runs, not at `--help`
    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from retrieval.bundle import ModelBundle
    from retrieval.cli import Subparsers
    from retrieval.encoders import FeatureEncoder
    from retrieval.evaluation import EvalQueries
    from retrieval.evaluation.baselines import BaselineGrids
    from retrieval.index_store import IndexVersion
    from retrieval.ranking import ItemSets
    from retrieval.towers import TwoTowerModel

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50, 100, 1000)
DEFAULT_BASELINES = ("popularity", "ease", "als")
METRIC_NAMES = ("recall", "hit_rate", "ndcg")
QUERY_SPLITS = SPLITS[1:]  # the splits with held-out queries: valid, test


# --------------------------------------------------------------------------- small helpers


def parse_ks(text: str) -> tuple[int, ...]:
    """``"10,20,50"`` -> ``(10, 20, 50)`` (sorted, distinct, each >= 1).

    >>> parse_ks("50, 10,10")
    (10, 50)
    """
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"`--k` must be comma-separated integers; got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"`--k` must name cut-offs >= 1; got {text!r}")
    return tuple(ks)


def parse_names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``, each in `allowed` (an empty string gives ``()``).

    >>> parse_names("als,popularity", ("popularity", "als"), "--baselines")
    ('als', 'popularity')
    """
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"`{what}` entries must be in {list(allowed)}; got {unknown}")
    return names


def describe_machine() -> dict[str, Any]:
    """CPU model, core count, memory and accelerator of this machine (for reports)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count()
    summary = f"{cores}-core CPU ({cpu}), {memory_gib} GiB RAM, " + (
        f"GPU {gpu}" if gpu else "no GPU"
    )
    return {
        "summary": summary,
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _progress(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


# --------------------------------------------------------------------------- embeddings


def embed_catalog(
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    items: pa.Table,
    *,
    batch_size: int = 8192,
    progress: bool = True,
) -> torch.Tensor:
    """`[num_items, D]` item embeddings, encoding and embedding the catalog slice by slice
    (so the encoded features of the whole catalog never sit in memory at once).

    Args:
        model: a `TwoTowerModel` in eval mode.
        encoder: its `FeatureEncoder`.
        items: the items table (row = item row).
        batch_size: items encoded and embedded per slice.
        progress: show a progress bar.
    """
    import torch

    parts = []
    bar = _progress(items.num_rows, "embed catalog", progress)
    with torch.inference_mode():
        for start in range(0, items.num_rows, batch_size):
            chunk = items.slice(start, batch_size)
            parts.append(model.embed_items(encoder.encode_items(chunk)))
            bar.update(chunk.num_rows)
    bar.close()
    return torch.cat(parts)


def embed_queries(
    model: TwoTowerModel, queries: EvalQueries, *, batch_size: int = 4096, progress: bool = True
) -> torch.Tensor:
    """`[Q, D]` query embeddings of prepared evaluation queries, in slices."""
    import torch

    from retrieval.evaluation import slice_batch

    parts = []
    bar = _progress(len(queries), "embed queries", progress)
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            batch = slice_batch(queries.query_batch, slice(start, start + batch_size))
            parts.append(model.embed_queries(batch))
            bar.update(len(next(iter(batch.values()))))
    bar.close()
    return torch.cat(parts) if parts else torch.zeros(0, model.output_dim)


# --------------------------------------------------------------------------- rankings


def rank_in_chunks(
    top_k: Callable[[int, int, ItemSets], torch.Tensor],
    exclude: ItemSets,
    k: int,
    *,
    query_chunk_size: int = 1024,
    desc: str = "rank",
    progress: bool = True,
) -> torch.Tensor:
    """`[Q, k]` ranking assembled from `top_k(start, stop, exclude_rows) -> [stop-start, k]`
    over query chunks, with a progress bar; `exclude_rows` is the chunk's `ItemSets`."""
    import torch

    from retrieval.ranking import slice_item_sets

    num_queries = exclude.num_queries
    parts = []
    bar = _progress(num_queries, desc, progress)
    for start in range(0, num_queries, query_chunk_size):
        stop = min(start + query_chunk_size, num_queries)
        parts.append(top_k(start, stop, slice_item_sets(exclude, start, stop)))
        bar.update(stop - start)
    bar.close()
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.int64)


def exact_ranking(
    query_emb: torch.Tensor,
    item_emb: torch.Tensor,
    exclude: ItemSets,
    k: int,
    *,
    query_chunk_size: int = 512,
    item_chunk_size: int = 65536,
    progress: bool = True,
) -> torch.Tensor:
    """Exact (brute-force) `[Q, k]` ranking by inner product, context items excluded.

    A score block is ``query_chunk_size x item_chunk_size`` float32 (128 MiB by default);
    wide item chunks mean fewer running top-k merges, which dominate at K = 1000."""
    from retrieval.ranking import exact_top_k

    def top_k(start: int, stop: int, exclude_rows: ItemSets) -> torch.Tensor:
        _, ranking = exact_top_k(
            query_emb[start:stop],
            item_emb,
            k,
            exclude_rows,
            query_chunk_size=query_chunk_size,
            item_chunk_size=item_chunk_size,
        )
        return ranking

    return rank_in_chunks(
        top_k, exclude, k, query_chunk_size=query_chunk_size, desc="exact top-k", progress=progress
    )


def ann_ranking(
    index: IndexVersion,
    query_emb: torch.Tensor,
    exclude: ItemSets,
    k: int,
    *,
    row_map: torch.Tensor | None = None,
    query_chunk_size: int = 1024,
    progress: bool = True,
) -> torch.Tensor:
    """`[Q, k]` ranking through an ANN index: per chunk, search ``k + max excluded`` rows,
    drop the excluded ones, keep k (the service's `exclude_seen` does the same).

    `row_map` (`index_row_map`) translates index labels to item rows when they differ."""
    import numpy as np
    import torch

    from retrieval.ranking import drop_excluded

    def top_k(start: int, stop: int, exclude_rows: ItemSets) -> torch.Tensor:
        sizes = exclude_rows.sizes()
        fetch = k + (int(sizes.max()) if len(sizes) else 0)
        fetch = min(fetch, max(k, int(index.num_items)))
        queries = np.ascontiguousarray(query_emb[start:stop].numpy(), dtype=np.float32)
        _, labels = index.search(queries, fetch)
        rows = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (q, fetch)
        if row_map is not None:
            rows = torch.where(rows >= 0, row_map[rows.clamp(min=0)], rows)
        return drop_excluded(rows, exclude_rows, k)

    return rank_in_chunks(
        top_k, exclude, k, query_chunk_size=query_chunk_size, desc="ANN search", progress=progress
    )


# --------------------------------------------------------------------------- the job


def resolve_ks(ks: Sequence[int], num_items: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split cut-offs into those evaluated (K < catalog size) and those dropped: with
    K >= the catalog every ranker returns every candidate, so recall@K says nothing.

    >>> resolve_ks([10, 50, 1000], 200)
    ((10, 50), (1000,))
    """
    kept = tuple(k for k in ks if k < num_items)
    dropped = tuple(k for k in ks if k >= num_items)
    if not kept:
        raise ValueError(
            f"`--k` {list(ks)}: every cut-off is >= the catalog size ({num_items} items)"
        )
    return kept, dropped


def _check_index_matches(index: IndexVersion, bundle: ModelBundle) -> None:
    """Refuse an index built from another model (when its manifest records the model)."""
    manifest = dict(getattr(index, "manifest", {}) or {})
    model_section = manifest.get("model")
    model_info: dict[str, Any] = model_section if isinstance(model_section, dict) else {}
    recorded_checksum = manifest.get("model_checksum") or model_info.get("checksum")
    recorded_version = (
        manifest.get("model_version")
        or model_info.get("model_version")
        or model_info.get("version")
    )
    if recorded_checksum and recorded_checksum != bundle.checksum:
        raise ValueError(
            f"index version {index.version!r} was built from model checksum "
            f"{str(recorded_checksum)[:12]}...; --model has {bundle.checksum[:12]}..."
        )
    if recorded_version and recorded_version != bundle.version:
        raise ValueError(
            f"index version {index.version!r} was built from model {recorded_version!r}; "
            f"--model is {bundle.version!r}"
        )


def index_row_map(index: IndexVersion, encoder: FeatureEncoder) -> torch.Tensor | None:
    """`[index.num_items]` int64: the encoder's item row of each index label, or None when
    the index labels are already the encoder's rows (the usual case)."""
    import numpy as np
    import torch

    try:
        rows = np.asarray(encoder.item_index(index.item_ids), dtype=np.int64)
    except ValueError as exc:
        raise ValueError(
            f"index version {index.version!r} holds items the model's catalog lacks: {exc}"
        ) from exc
    if len(rows) < encoder.num_items:
        logger.warning(
            "index version %s holds %d of the catalog's %d items; the others are never returned",
            index.version,
            len(rows),
            encoder.num_items,
        )
    if len(rows) == encoder.num_items and bool((rows == np.arange(len(rows))).all()):
        return None
    return torch.from_numpy(rows)


def evaluate_bundle(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    index_root: str | Path | None = None,
    index_version: str | None = None,
    max_users: int = 0,
    seed: int = 0,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    grids: BaselineGrids | None = None,
    tuning_max_users: int = 0,
    cold: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model bundle on `split` (exact, optionally ANN) and the baselines.

    Args:
        model_dir: model bundle directory.
        data_dir: the dataset the model was trained on.
        split: 'valid' or 'test'.
        ks: cut-offs; those >= the catalog size are dropped (and listed in the result).
        index_root: a published index root (`retrieval build-index --out`), or None.
        index_version: the version under `index_root` (None = the current one).
        max_users: evaluate a fixed random sample of this many users (0 = all).
        seed: seed of that sample and of the ALS initialisation.
        baselines: any of 'popularity', 'ease', 'als'.
        grids: `retrieval.evaluation.baselines.BaselineGrids` (None = the default grids).
        tuning_max_users: valid users sampled for baseline tuning (0 = `max_users`).
        cold: "items" or "users": the cold-start evaluation of a dataset written by
            `retrieval data cold` (`retrieval.evaluation.protocol.cold_queries`); EASE and
            ALS are then reported as not applicable and "random" may be named.
        progress: progress bars on stderr.

    Returns:
        The JSON-ready report: setup, per-ranker metrics, ANN comparison, timings.
    """
    from retrieval.bundle import load_bundle
    from retrieval.data.cold import cold_spec
    from retrieval.data.dataset import load_dataset
    from retrieval.evaluation import baselines as bl
    from retrieval.evaluation import (
        build_eval_queries,
        encode_users_in_encoder_order,
        top_k_overlap,
    )
    from retrieval.evaluation.protocol import cold_queries

    allowed = bl.COLD_BASELINES if cold else BASELINES
    for name in baselines:
        if name not in allowed:
            raise ValueError(f"`baselines` entries must be in {list(allowed)}; got {name!r}")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with stage("load", timings):
        bundle = load_bundle(model_dir)
        dataset = load_dataset(data_dir)
        encoder = bundle.encoder
        num_items = encoder.num_items
        if dataset.items.num_rows != num_items:
            raise ValueError(
                f"{data_dir} has {dataset.items.num_rows} items; the model was trained on "
                f"{num_items}: evaluate on the dataset the model was trained on"
            )
    ks, dropped = resolve_ks(ks, num_items)
    if dropped:
        logger.info("dropping K %s: not below the catalog size (%d items)", dropped, num_items)
    k_max = max(ks)
    with stage("queries", timings):
        user_features = encode_users_in_encoder_order(encoder, dataset)
        queries = build_eval_queries(
            encoder, dataset, split, max_users=max_users, seed=seed, user_features=user_features
        )
        cold_record = None
        if cold is not None:
            cold_record = cold_spec(dataset)
            if cold_record is None or cold_record.get("mode") != cold:
                found = (
                    "a regular dataset" if cold_record is None else f"cold {cold_record['mode']}"
                )
                raise ValueError(
                    f"`--cold {cold}` needs a dataset written by `retrieval data cold {cold}`; "
                    f"{data_dir} is {found}"
                )
            queries = cold_queries(queries, encoder, cold_record)
    model = bundle.model.eval()
    with stage("embed", timings):
        item_emb = embed_catalog(model, encoder, dataset.items, progress=progress)
        query_emb = embed_queries(model, queries, progress=progress)
    with stage("exact", timings):
        exact = exact_ranking(query_emb, item_emb, queries.exclude, k_max, progress=progress)
        model_metrics: dict[str, Any] = dict(ranking_metrics_of(exact, queries, ks))
    model_metrics["search_seconds"] = timings["exact"]
    results: dict[str, Any] = {"model": model_metrics}

    ann_report: dict[str, Any] | None = None
    if index_root is not None:
        from retrieval.index_store import load_index_version

        with stage("ann", timings):
            index = load_index_version(index_root, index_version)
            _check_index_matches(index, bundle)
            row_map = index_row_map(index, encoder)
            search_start = time.perf_counter()
            ann = ann_ranking(
                index, query_emb, queries.exclude, k_max, row_map=row_map, progress=progress
            )
            search_seconds = time.perf_counter() - search_start
            ann_metrics: dict[str, Any] = dict(ranking_metrics_of(ann, queries, ks))
        ann_metrics["search_seconds"] = search_seconds
        results["model_ann"] = ann_metrics
        ratios = {
            f"recall_ratio@{k}": (
                ann_metrics[f"recall@{k}"] / model_metrics[f"recall@{k}"]
                if model_metrics[f"recall@{k}"] > 0
                else None  # undefined: exact recall is 0
            )
            for k in ks
        }
        ann_report = {
            "index_root": str(Path(index_root).resolve()),
            "index_version": str(index.version),
            "index_num_items": int(index.num_items),
            "index_manifest": _jsonable(getattr(index, "manifest", {})),
            **ratios,
            **top_k_overlap(ann, exact, ks),
            "queries_per_second": len(queries) / max(search_seconds, 1e-9),
        }
        del ann
    del exact

    if baselines:
        with stage("baselines", timings):
            valid_queries = (
                queries
                if split == "valid" and not tuning_max_users
                else build_eval_queries(
                    encoder,
                    dataset,
                    "valid",
                    max_users=tuning_max_users or max_users,
                    seed=seed,
                    user_features=user_features,
                )
            )
            results.update(
                bl.evaluate_baselines(
                    baselines,
                    encoder,
                    dataset,
                    queries,
                    ks,
                    valid_queries=valid_queries,
                    grids=grids or bl.BaselineGrids(),
                    seed=seed,
                    cold=cold,
                )
            )

    timings["total"] = time.perf_counter() - started
    return {
        "split": split,
        "ks": list(ks),
        "dropped_ks": list(dropped),
        "num_users": len(queries),
        "max_users": max_users,
        "num_items": num_items,
        "model": {
            "path": str(Path(model_dir).resolve()),
            "version": bundle.version,
            "checksum": bundle.checksum,
            "arrangement": bundle.config.query.arrangement,
            "cross_kind": bundle.config.query.cross_kind,
        },
        "data": str(Path(data_dir).resolve()),
        "cold": None
        if cold_record is None
        else {
            "mode": cold_record["mode"],
            "cutoff_timestamp": cold_record["cutoff_timestamp"],
            "num_cold": len(cold_record["ids"]),
            "scored_users": len(queries),
        },
        "results": results,
        "ann": ann_report,
        "timings": timings,
        "machine": describe_machine(),
    }


def ranking_metrics_of(
    ranking: torch.Tensor, queries: EvalQueries, ks: Sequence[int], *, chunk_size: int = 8192
) -> dict[str, float | int]:
    """`ranking_metrics` over query chunks, combined by user counts (each chunk's per-user
    float64 work arrays are ``[chunk, K]``, not ``[Q, K]``, which at 100k users and
    K = 1000 would be gigabytes)."""
    from retrieval.evaluation.metrics import chunked_ranking_metrics

    return chunked_ranking_metrics(ranking, queries.held_out, ks, chunk_size=chunk_size)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _ranker_label(name: str, result: dict[str, Any], report: dict[str, Any]) -> str:
    if name == "model":
        return "model (exact)"
    if name == "model_ann":
        return "model (ANN)"
    if name == "als" and "params" in result:
        p = result["params"]
        return f"als (f={p['factors']}, reg={p['regularization']:g}, a={p['alpha']:g})"
    if name == "ease" and "params" in result:
        return f"ease (lambda={result['params']['l2']:g})"
    if name == "popularity":
        return f"popularity ({result.get('context', 'train')})"
    return name


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one table per metric, rankers as rows, K as columns."""
    ks = report["ks"]
    results = report["results"]
    labels = {name: _ranker_label(name, r, report) for name, r in results.items()}
    width = max(24, *(len(label) + 2 for label in labels.values()))
    lines = [
        f"split {report['split']}: {report['num_users']} users, {report['num_items']} items "
        "(full catalog, context items excluded)"
    ]
    if report.get("cold"):
        cold = report["cold"]
        held = "cold items only" if cold["mode"] == "items" else "cold users only"
        lines.append(
            f"cold start ({cold['mode']}): {cold['num_cold']} {cold['mode']} first seen after "
            f"{cold['cutoff_timestamp']}; scored: {held}"
        )
    if report.get("ann"):
        ann = report["ann"]
        index = (ann.get("index_manifest") or {}).get("index", {})
        lines.append(
            f"ANN: index version {ann['index_version']} ({index.get('factory', '?')}, "
            f"search params {index.get('search_params', {})}, {ann['index_num_items']} items), "
            f"{ann['queries_per_second']:,.0f} queries/s incl. over-fetch and filtering"
        )
    if report["dropped_ks"]:
        lines.append(f"K {report['dropped_ks']} dropped: not below the catalog size")
    for metric in METRIC_NAMES:
        lines.append("")
        column = max(12, *(len(f"{metric}@{k}") for k in ks)) + 2
        lines.append(f"{'':<{width}}" + "".join(f"{f'{metric}@{k}':>{column}}" for k in ks))
        for name, result in results.items():
            if "skipped" in result:
                if metric == METRIC_NAMES[0]:
                    lines.append(f"{name:<{width}}skipped: {result['skipped']}")
                continue
            lines.append(
                f"{labels[name]:<{width}}"
                + "".join(f"{result[f'{metric}@{k}']:>{column}.4f}" for k in ks)
            )
        if metric == "recall" and report.get("ann"):
            ann = report["ann"]
            lines.append(
                f"{'  ANN/exact recall':<{width}}"
                + "".join(
                    f"{ratio:>{column}.4f}"
                    if (ratio := ann[f"recall_ratio@{k}"]) is not None
                    else f"{'-':>{column}}"
                    for k in ks
                )
            )
            lines.append(
                f"{'  ANN ∩ exact top-K':<{width}}"
                + "".join(f"{ann[f'overlap@{k}']:>{column}.4f}" for k in ks)
            )
    timings = report["timings"]
    lines.append("")
    lines.append(
        "timings: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
    )
    lines.append(f"machine: {report['machine']['summary']}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    from retrieval.atomic import atomic_write_text
    from retrieval.evaluation.baselines import ALSGrid, BaselineGrids

    ks = parse_ks(args.k)
    from retrieval.evaluation.baselines import COLD_BASELINES

    if args.baselines is None:
        args.baselines = ",".join(COLD_BASELINES if args.cold else DEFAULT_BASELINES)
    allowed = COLD_BASELINES if args.cold else DEFAULT_BASELINES
    baselines = parse_names(args.baselines, allowed, "--baselines")
    if args.max_users < 0:
        raise ValueError(f"`--max-users` must be >= 0; got {args.max_users}")
    grids = BaselineGrids(
        als=ALSGrid(
            factors=tuple(int(v) for v in args.als_factors.split(",")),
            regularization=tuple(float(v) for v in args.als_regularization.split(",")),
            alpha=tuple(float(v) for v in args.als_alpha.split(",")),
            iterations=args.als_iterations,
        ),
        ease_l2=tuple(float(v) for v in args.ease_l2.split(",")),
    )
    if args.index_version and not args.index:
        raise ValueError("`--index-version` needs `--index`")
    report = evaluate_bundle(
        args.model,
        args.data,
        split=args.split,
        ks=ks,
        index_root=args.index,
        index_version=args.index_version,
        max_users=args.max_users,
        seed=args.seed,
        baselines=baselines,
        grids=grids,
        tuning_max_users=args.tuning_max_users,
        cold=args.cold,
        progress=not args.no_progress,
    )
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def register_evaluate(subparsers: Subparsers) -> None:
    """Add `retrieval evaluate` (the `retrieval.commands` entry point)."""
    parser = subparsers.add_parser(
        "evaluate",
        help="full-catalog recall of a model (exact and ANN) next to baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="model bundle directory")
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument("--index", type=Path, help="published index root: also evaluate ANN")
    parser.add_argument("--index-version", help="index version under --index (default current)")
    parser.add_argument(
        "--split", choices=QUERY_SPLITS, default=QUERY_SPLITS[-1], help="target split"
    )
    parser.add_argument(
        "--k", default=",".join(map(str, DEFAULT_KS)), help="cut-offs (default %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument(
        "--max-users", type=int, default=0, help="evaluate a random sample of N users (0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="user sample and ALS seed")
    parser.add_argument(
        "--baselines",
        default=None,
        help="comma-separated: popularity, ease, als, and random with --cold ('' for none; "
        "default all of them)",
    )
    parser.add_argument(
        "--cold",
        choices=("items", "users"),
        help="cold-start evaluation of a dataset written by `retrieval data cold MODE`",
    )
    parser.add_argument("--als-factors", default="16,32,64,128", help="ALS grid: factors")
    parser.add_argument("--als-regularization", default="0.1,1,10", help="ALS grid: lambda")
    parser.add_argument("--als-alpha", default="1,10", help="ALS grid: confidence alpha")
    parser.add_argument("--als-iterations", type=int, default=15, help="ALS sweeps per fit")
    parser.add_argument(
        "--ease-l2", default="50,100,200,400,800,1600", help="EASE grid: lambda values"
    )
    parser.add_argument(
        "--tuning-max-users",
        type=int,
        default=0,
        help="valid users sampled for ALS tuning (0 = same as --max-users); every grid "
        "point ranks the full catalog for them, so use a few thousand on 1M-item catalogs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_evaluate)
