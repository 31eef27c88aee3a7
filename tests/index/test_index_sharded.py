"""Sharded embedding: a real 2-process gloo group running `python -m index`'s entry point
builds the same index as the single-process job; asked for `--shards 2`, rank 0 publishes
it as two index files searched as one faiss.IndexShards, with the same rows and results."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from index_fixtures import WORLD_SIZE, sharded_rank_main

from index.build import BuildOptions, build_index
from retrieval.index_store import (
    list_versions,
    load_index_version,
    read_current,
    reconstruct_all,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_two_shard_build_equals_single_process_build(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    common = ["--model", str(index_bundle), "--data", str(index_data), "--no-progress"]
    options = BuildOptions(progress=False, batch_size=100, recall_queries=40)
    single = build_index(index_bundle, index_data, tmp_path / "single", options)

    sharded_root = tmp_path / "sharded"
    args = [*common, "--out", str(sharded_root), "--batch-size", "100", "--recall-queries", "40"]
    args += ["--threads", "1", "--shards", "2"]
    mp.spawn(
        sharded_rank_main, args=(_free_port(), args, str(tmp_path)), nprocs=WORLD_SIZE, join=True
    )
    assert [Path(tmp_path, f"rank{r}.rc").read_text() for r in range(WORLD_SIZE)] == ["0", "0"]

    a = load_index_version(tmp_path / "single")
    b = load_index_version(sharded_root)
    assert read_current(sharded_root) == b.version
    assert b.manifest["build"]["world_size"] == WORLD_SIZE
    assert a.manifest["build"]["world_size"] == 1
    assert b.item_ids.equals(a.item_ids)
    assert (b.num_items, b.dim, b.factory) == (a.num_items, a.dim, a.factory)
    assert (a.num_shards, b.num_shards) == (1, 2)
    assert [s["num_items"] for s in b.manifest["index"]["shards"]] == [300, 300]
    listed = {info.name: info.shards for info in list_versions(sharded_root)}
    assert listed[b.version] == 2
    assert [info.shards for info in list_versions(tmp_path / "single")] == [1]
    vectors_a = reconstruct_all(a.index)
    vectors_b = reconstruct_all(b.index)  # shard 0's rows, then shard 1's
    # same rows in the same order; batch shapes differ, so allow float rounding only
    np.testing.assert_allclose(vectors_b, vectors_a, rtol=0, atol=1e-6)
    queries = vectors_a[::37]
    np.testing.assert_array_equal(b.search(queries, 25)[1], a.search(queries, 25)[1])
    assert b.manifest["recall"]["recall"] == pytest.approx(single.manifest["recall"]["recall"])
