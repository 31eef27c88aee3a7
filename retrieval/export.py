"""`retrieval export`: both towers of a model bundle as ONNX models, for runtimes without torch.

Usage::

    retrieval export --model artifacts/model --out artifacts/model-onnx --format onnx
    retrieval export --model artifacts/model --out artifacts/model-onnx --overwrite --opset 18

The output directory, written atomically (a temporary name, then a rename: a failed or
interrupted export leaves no half-written directory, and an existing one is replaced only
with ``--overwrite``)::

    query_tower.onnx     the query tower: an encoded query batch -> embeddings
    item_tower.onnx      the item tower: an encoded item batch -> embeddings
    encoders/            a copy of the bundle's fitted `FeatureEncoder` (encoder.json and
                         the id tables), which turns raw rows into the input tensors
    export.json          the manifest: per model its inputs (names, dtypes, shapes with named
                         dimensions), output, check result; the opset, the bundle checksum,
                         the versions used and the sha256 of every file

A tower whose weights pass protobuf's 2 GiB limit is saved with them beside it
(``<tower>.onnx.data``, listed in the manifest like every file).

Inputs of each model: one per feature of its tower, named as the feature, in the tower's
feature order (export.json lists them; `retrieval.towers.tower_inputs` makes the list):

=========================  ========  ===================================================
feature kind               dtype     shape
=========================  ========  ===================================================
categorical, hashed        int64     ``[batch]``: the feature's code (0 PAD, 1 OOV)
bag, hashed_bag            int64     ``[batch, <name>_length]``: codes, right-padded
                                     with 0; pooled as the mean over the non-0 entries
history (query tower)      int64     ``[batch, <name>_length]``: item codes of the user's
                                     latest items, most recent first, padded with 0
dense                      float32   ``[batch, width]``: standardised values (+ a 0/1
                                     missing indicator column when the feature has one)
=========================  ========  ===================================================

``batch`` is one dimension shared by every input; each list feature has its own length
dimension (any length; at most ``history_max_length`` for a history under position
pooling). The output is ``embeddings``, float32 ``[batch, D]``, every row of unit L2 norm:
the score of a (query, item) pair is the dot product of their embeddings.

Before the directory is published, each saved model is run with onnxruntime on random
batches (batch 1 and 7, lists of several lengths) and compared with the PyTorch tower;
more than `CHECK_TOLERANCE` apart refuses the export. The largest difference is recorded.
See docs/export.md for the encoding of raw values and an onnxruntime example.

Handlers import torch, onnx and onnxruntime only when they run, so `retrieval --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.cli import Subparsers
    from retrieval.towers import Tower

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "two-tower-onnx-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_MANIFEST = "export.json"
ENCODERS_DIR = "encoders"  # the same name as in the bundle
TOWER_FILES = {"query": "query_tower.onnx", "item": "item_tower.onnx"}
FORMATS = ("onnx",)
# Largest |onnxruntime - torch| accepted on the check batches (float32 towers: ~1e-7 seen).
CHECK_TOLERANCE = 1e-5
CHECK_BATCHES = ((1, 3), (7, 5))  # (batch size, list length) of the check batches
MIN_OPSET = 18  # the dynamo exporter's lowest


class ExportError(ValueError):
    """An export directory is missing, incomplete, tampered with or of an unknown format."""


# --------------------------------------------------------------------------- export


def export_onnx(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export both towers of a bundle as ONNX models, with its encoders and a manifest.

    Args:
        bundle_dir: the model bundle (verified and loaded with `load_bundle`).
        out_dir: the directory to write (see the module docstring for its content).
        opset: the ONNX opset (default `retrieval.towers.ONNX_OPSET`; at least 18).
        overwrite: replace an existing `out_dir`.

    Returns:
        The manifest written to ``out_dir/export.json``.

    Raises:
        BundleError: the bundle is missing, incomplete or tampered with.
        FileExistsError: `out_dir` exists and `overwrite` is false.
        ValueError: a bad `opset`, or `out_dir` overlapping the bundle.
        RuntimeError: an exported model disagrees with its PyTorch tower.
    """
    from retrieval.atomic import (
        atomic_directory,
        recover_interrupted_replace,
        remove_stale_temporaries,
    )
    from retrieval.bundle import load_bundle
    from retrieval.towers import ONNX_OPSET

    opset = ONNX_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"`opset` must be an integer >= {MIN_OPSET}; got {opset!r}")
    bundle_dir, out = Path(bundle_dir), Path(out_dir)
    resolved_bundle, resolved_out = bundle_dir.resolve(), out.resolve()
    if resolved_out.is_relative_to(resolved_bundle) or resolved_bundle.is_relative_to(resolved_out):
        raise ValueError(
            f"--out {out} must lie outside the model bundle {bundle_dir} (and not contain it)"
        )
    # Checked before the slow part; an old directory an interrupted run moved aside is
    # put back first, so it counts as existing.
    if recover_interrupted_replace(out):
        logger.info("restored %s, moved aside by an interrupted export", out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    for stale in remove_stale_temporaries(out.parent, out.name):
        logger.info("removed leftover of an interrupted export: %s", stale)

    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    logger.info("bundle %s (%s) loaded", bundle_dir, bundle.version)
    towers = {"query": bundle.model.query_tower, "item": bundle.model.item_tower}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        models = {
            side: _export_tower(tower, tmp / TOWER_FILES[side], opset)
            for side, tower in towers.items()
        }
        _copy_encoders(bundle.path, bundle.manifest, tmp)
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "opset": opset,
            "bundle": {
                "checksum": bundle.checksum,
                "model_version": bundle.version,
                "path": str(resolved_bundle),
            },
            "models": models,
            "encoders": ENCODERS_DIR,
            "versions": _versions(),
            "files": _file_checksums(tmp),
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("exported to %s in %.1fs", out, time.perf_counter() - started)
    return manifest


def _export_tower(tower: Tower, path: Path, opset: int) -> dict[str, Any]:
    """Write `tower` as ONNX at `path`, check it with onnxruntime, return its manifest entry."""
    import torch

    from retrieval.towers import (
        BATCH_DIM,
        ONNX_OUTPUT_NAME,
        POOLED_KINDS,
        export_tower_onnx,
        onnxruntime_session,
        random_batch,
        tower_inputs,
    )

    started = time.perf_counter()
    export_tower_onnx(tower, opset).save(path)
    session = onnxruntime_session(path)  # the file as written, not the program in memory
    names = tower.feature_names
    generator = torch.Generator().manual_seed(0)
    max_lengths = {n: int(w.shape[0]) for n, w in tower.embedding.position_logits.items()}
    worst = 0.0
    for batch_size, length in CHECK_BATCHES:
        lengths = {
            f.name: min(length, max_lengths.get(f.name, length))
            for f in tower.embedding.features
            if f.kind in POOLED_KINDS
        }
        batch = random_batch(tower.embedding.features, batch_size, lengths, generator=generator)
        (got,) = session.run([ONNX_OUTPUT_NAME], {n: batch[n].numpy() for n in names})
        with torch.inference_mode():
            expected = tower(batch)
        if tuple(got.shape) != tuple(expected.shape):
            raise RuntimeError(
                f"{path.name}: onnxruntime gives shape {list(got.shape)}; the tower "
                f"{list(expected.shape)}"
            )
        worst = max(worst, float((torch.from_numpy(got) - expected).abs().max()))
    if worst > CHECK_TOLERANCE:
        raise RuntimeError(
            f"{path.name}: onnxruntime and the PyTorch tower differ by {worst:.2e} "
            f"(more than {CHECK_TOLERANCE:.0e})"
        )
    logger.info(
        "%s: exported and checked in %.1fs (max |diff| %.1e)",
        path.name,
        time.perf_counter() - started,
        worst,
    )
    return {
        "file": path.name,
        "inputs": [spec.to_dict() for spec in tower_inputs(tower)],
        "output": {
            "name": ONNX_OUTPUT_NAME,
            "dtype": "float32",
            "shape": [BATCH_DIM, tower.output_dim],
        },
        "check": {
            "max_abs_diff": worst,
            "tolerance": CHECK_TOLERANCE,
            "batches": [list(b) for b in CHECK_BATCHES],
        },
    }


def _copy_encoders(bundle_path: Path, bundle_manifest: dict[str, Any], tmp: Path) -> None:
    """Copy the bundle's encoder files, each checked against the bundle manifest's sha256
    (the directory may have changed since `load_bundle` verified it)."""
    from retrieval.atomic import sha256_file
    from retrieval.bundle import BundleError

    prefix = f"{ENCODERS_DIR}/"
    listed = {
        rel: digest
        for rel, digest in bundle_manifest.get("files", {}).items()
        if rel.startswith(prefix)
    }
    if not listed:
        raise BundleError(f"{bundle_path}: the manifest lists no {prefix} files")
    for rel, digest in sorted(listed.items()):
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle_path / rel, target)
        if sha256_file(target) != digest:
            raise BundleError(
                f"{bundle_path / rel}: changed since the bundle was verified (checksum mismatch)"
            )


def _listed_paths(root: Path) -> list[str]:
    """Every file under `root` but the manifest, as relative POSIX paths."""
    return sorted(
        rel
        for p in root.rglob("*")
        if p.is_file() and (rel := p.relative_to(root).as_posix()) != EXPORT_MANIFEST
    )


def _file_checksums(root: Path) -> dict[str, str]:
    from retrieval.atomic import sha256_file

    return {rel: sha256_file(root / rel) for rel in _listed_paths(root)}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "two-tower-retrieval"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def verify_export(out_dir: str | Path) -> dict[str, Any]:
    """Check an export directory against its manifest (format, file list, every sha256).

    Returns:
        The manifest.

    Raises:
        ExportError: the directory or manifest is missing or unreadable, of another
            format, or a file is missing, extra or changed.
    """
    from retrieval.atomic import check_listed_files, sha256_file

    root = Path(out_dir)
    path = root / EXPORT_MANIFEST
    if not path.is_file():
        raise ExportError(f"{root}: not an export directory ({EXPORT_MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: `format` must be {EXPORT_FORMAT!r}")
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{path}: unsupported `format_version` {manifest.get('format_version')!r} "
            f"(this code reads {EXPORT_FORMAT_VERSION})"
        )
    files: dict[str, str] = manifest.get("files", {})
    check_listed_files(root, files, _listed_paths(root), ExportError)
    for rel, digest in files.items():
        if sha256_file(root / rel) != digest:
            raise ExportError(f"{root / rel}: checksum mismatch")
    return manifest


# --------------------------------------------------------------------------- command line


def register_export(subparsers: Subparsers) -> None:
    """Add the `export` command (the `retrieval.commands` entry point)."""
    parser = subparsers.add_parser(
        "export",
        help="export both towers of a model bundle as ONNX models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model bundle directory")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="only onnx for now")
    parser.add_argument(
        "--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET}; default 18)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """`retrieval export --model DIR --out DIR [--format onnx] [--opset N] [--overwrite]`."""
    started = time.perf_counter()
    manifest = export_onnx(args.model, args.out, opset=args.opset, overwrite=args.overwrite)
    for side, model in manifest["models"].items():
        inputs = ", ".join(
            f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]" for i in model["inputs"]
        )
        print(
            f"{side:5s} {model['file']}: {inputs} -> {model['output']['name']} float32 "
            f"[{', '.join(map(str, model['output']['shape']))}] "
            f"(max |diff| vs torch {model['check']['max_abs_diff']:.1e})"
        )
    size = sum(os.path.getsize(Path(args.out) / rel) for rel in manifest["files"])
    print(
        f"exported {args.model} (bundle {manifest['bundle']['checksum'][:12]}) to {args.out}: "
        f"{len(manifest['files']) + 1} files, {size / 2**20:.1f} MiB, opset {manifest['opset']}, "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0
