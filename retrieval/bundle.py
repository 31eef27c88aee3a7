"""The model bundle: the hand-off from training to the index job and the service.

A bundle is a directory::

    manifest.json          format version, creation time, versions, sha256 of every file
    model_config.json      `ModelConfig`: rebuilds both towers without code defaults
    train_config.json      the training configuration that produced the weights
    metrics.json           validation (and test) metrics recorded at the end of training
    training_curves.csv    per-epoch loss, learning rate and valid recall (and .png; optional)
    weights.safetensors    the parameters (safetensors: loading never unpickles)
    encoders/              the fitted `FeatureEncoder` (JSON and Arrow files only)

It is written to a temporary directory and renamed into place, so a reader never sees a
half-written bundle; `load_bundle` verifies every checksum before anything is parsed.
The bundle's identity, `ModelBundle.checksum` (the sha256 of manifest.json), is taken
from the very manifest bytes that were verified, once, at load: a directory overwritten
or removed later changes nothing about what a loaded bundle says it is.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from retrieval.atomic import atomic_directory, check_listed_files, sha256_file
from retrieval.encoders import FeatureEncoder
from retrieval.towers import ModelConfig, TwoTowerModel

BUNDLE_FORMAT = "two-tower-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "weights.safetensors"
ENCODERS_DIR = "encoders"


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with or of an unknown format."""


def _bundle_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE
    )


@dataclass
class ModelBundle:
    """A loaded bundle: the model (eval mode), its encoders and recorded metadata.

    `checksum` is the sha256 of the manifest bytes verified at load (it identifies this
    exact bundle; index versions record it). It is never read from disk again: the
    directory may since have been overwritten by another bundle, or removed.
    """

    path: Path
    model: TwoTowerModel
    encoder: FeatureEncoder
    config: ModelConfig
    train_config: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    checksum: str

    @property
    def version(self) -> str:
        return str(self.manifest.get("model_version", self.checksum[:12]))


def save_bundle(
    out_dir: str | Path,
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    *,
    train_config: dict[str, Any],
    metrics: dict[str, Any],
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a bundle atomically; returns its path.

    `extra_files` maps plain file names (no directory part, not a standard file's name) to
    their bytes, e.g. the training curves; they are checksummed in the manifest like the rest.
    """
    extra = dict(extra_files or {})
    standard = (MANIFEST_FILE, MODEL_CONFIG_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE)
    for name in extra:
        if name in (*standard, ENCODERS_DIR) or Path(name).name != name or name.startswith("."):
            raise ValueError(
                "`extra_files` names must be plain, non-hidden file names other than "
                f"{[*standard, ENCODERS_DIR]}; got {name!r}"
            )
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2, default=str) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS_FILE))
        encoder.save(tmp / ENCODERS_DIR)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in _bundle_files(tmp)}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_version": f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{content_hash[:8]}",
            "created": created,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "retrieval": _package_version(),
            },
            "files": files,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("two-tower-retrieval")
    except PackageNotFoundError:
        return "unknown"


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and format-check the bundle's manifest (no file checksums: `verify_bundle`)."""
    return _read_manifest_and_checksum(Path(bundle_dir))[0]


def _read_manifest_and_checksum(root: Path) -> tuple[dict[str, Any], str]:
    """The parsed manifest and the sha256 of the bytes it was parsed from (one read)."""
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"model bundle not found: {root} is not a directory")
    if not path.is_file():
        raise BundleError(f"{root}: not a model bundle ({MANIFEST_FILE} missing)")
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the manifest ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: must hold a JSON object; got {type(manifest).__name__}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: `format` must be {BUNDLE_FORMAT!r}; got {manifest.get('format')!r}"
        )
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: unsupported `format_version` {manifest.get('format_version')!r} "
            f"(this code reads {BUNDLE_FORMAT_VERSION})"
        )
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file against the manifest's sha256; return the manifest.

    Raises:
        BundleError: a file is missing, extra, or its checksum differs.
    """
    return _verify_bundle(Path(bundle_dir))[0]


def _verify_bundle(root: Path) -> tuple[dict[str, Any], str]:
    """`verify_bundle`, also returning the sha256 of the manifest bytes it verified with."""
    manifest, checksum = _read_manifest_and_checksum(root)
    expected: dict[str, str] = manifest.get("files", {})
    for required in (MODEL_CONFIG_FILE, WEIGHTS_FILE):
        if required not in expected:
            raise BundleError(f"{root}: manifest does not list {required}")
    present = [p.relative_to(root).as_posix() for p in _bundle_files(root)]
    check_listed_files(root, expected, present, BundleError)
    for rel, digest in expected.items():
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()):
            raise BundleError(f"{root}: manifest entry {rel!r} points outside the bundle")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{root / rel}: checksum mismatch (expected {digest[:12]}..., got {actual[:12]}...)"
            )
    return manifest, checksum


def load_bundle(bundle_dir: str | Path, *, map_location: str = "cpu") -> ModelBundle:
    """Verify and load a bundle. The model comes back in eval mode.

    Never unpickles: weights are safetensors, everything else JSON or Arrow.
    """
    root = Path(bundle_dir)
    manifest, checksum = _verify_bundle(root)
    try:
        config = ModelConfig.from_dict(json.loads((root / MODEL_CONFIG_FILE).read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{root / MODEL_CONFIG_FILE}: invalid model config: {exc}") from exc
    model = TwoTowerModel(config)
    try:
        missing, unexpected = load_model(
            model, str(root / WEIGHTS_FILE), strict=False, device=map_location
        )
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"{root / WEIGHTS_FILE}: cannot read weights: {exc}") from exc
    if missing or unexpected:
        raise BundleError(
            f"{root / WEIGHTS_FILE}: weights do not match the model config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.eval()
    encoder = FeatureEncoder.load(root / ENCODERS_DIR)
    train_config = (
        json.loads((root / TRAIN_CONFIG_FILE).read_text())
        if (root / TRAIN_CONFIG_FILE).exists()
        else {}
    )
    metrics = (
        json.loads((root / METRICS_FILE).read_text()) if (root / METRICS_FILE).exists() else {}
    )
    return ModelBundle(
        path=root,
        model=model,
        encoder=encoder,
        config=config,
        train_config=train_config,
        metrics=metrics,
        manifest=manifest,
        checksum=checksum,
    )
