"""GPU paths: building with --device cuda, GPU search (faiss-gpu, or the torch exact
fallback), and the FAISS GPU k cap, for single and sharded versions. They need a CUDA
device and skip without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from index.build import BuildOptions, build_index, resolve_device
from retrieval.index_store import load_index_version
from retrieval.searchers import GPU_MAX_K, faiss_has_gpu, reconstruct_all

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none on this machine"
)


def test_cuda_device_without_a_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot happen here")
    with pytest.raises(ValueError, match="`device` is 'cuda' but no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shards", [1, 2])
def test_cuda_build_matches_cpu_build(
    index_bundle: Path, index_data: Path, tmp_path: Path, shards: int
) -> None:
    common: dict[str, Any] = {"progress": False, "recall_queries": 40, "shards": shards}
    cpu = build_index(
        index_bundle, index_data, tmp_path / "cpu", BuildOptions(device="cpu", **common)
    )
    gpu = build_index(
        index_bundle, index_data, tmp_path / "gpu", BuildOptions(device="cuda", **common)
    )
    assert gpu.manifest["build"]["device"].startswith("cuda")
    assert gpu.manifest["recall"]["recall"] == pytest.approx(cpu.manifest["recall"]["recall"])
    a, b = load_index_version(tmp_path / "cpu"), load_index_version(tmp_path / "gpu")
    assert b.num_shards == shards
    np.testing.assert_allclose(reconstruct_all(b.index), reconstruct_all(a.index), atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shards", [1, 2])
def test_gpu_search_equals_cpu_search_and_caps_k(
    index_bundle: Path, index_data: Path, tmp_path: Path, shards: int
) -> None:
    options = BuildOptions(progress=False, recall_queries=20, shards=shards)
    build_index(index_bundle, index_data, tmp_path, options)
    cpu = load_index_version(tmp_path)
    gpu = load_index_version(tmp_path)
    backend = gpu.to_gpu(0)
    assert backend == ("faiss" if faiss_has_gpu() else "torch")
    queries = reconstruct_all(cpu.index)[::50]
    cpu_scores, cpu_rows = cpu.search(queries, 100)
    gpu_scores, gpu_rows = gpu.search(queries, 100)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    assert (gpu_rows[:, :10] == cpu_rows[:, :10]).mean() > 0.99  # near-ties may swap
    if backend == "faiss":
        with pytest.raises(ValueError, match="must be <= 2048 for FAISS GPU search"):
            gpu.search(queries, GPU_MAX_K + 1)
    else:  # the torch exact fallback has no cap; past N it pads like the CPU index
        scores, rows = gpu.search(queries[:1], GPU_MAX_K + 1)
        assert (rows[0, cpu.num_items :] == -1).all() and np.isneginf(scores[0, -1])
