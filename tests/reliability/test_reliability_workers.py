"""The reliability rows that a client can see, against `retrieval serve --workers 2`.

The other reliability files run each row against one process (threads only), with faults
injected inside it; here the same promises are checked over HTTP alone against two worker
processes behind one port (service/workers.py), with index versions memory-mapped:

* rows 1-3: bad keys (401), bad values (422 naming the field) and oversized bodies (413),
  sent at the same time as good requests, never fail a good request and never reach the
  index (the summed batch metrics count the good queries only);
* rows 9-10: versions swapped every 300 ms under load (IVF-SQ8 through the list scanner
  over the mapped lists, and Flat) lose nothing, each answer is exactly its version's; a
  corrupt version is refused by every worker and the old one serves;
* row 15: SIGTERM under load fails no admitted request, and every worker stops.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from pathlib import Path
from typing import Any

import faiss
import httpx
from reliability_fixtures import run_load
from service_fixtures import (
    corrupt_copy,
    ids_by_version,
    set_current,
    wait_until,
    write_subset_version,
)
from test_reliability_index import QUERIES
from test_reliability_input import BAD_BODIES, RAW, send_oversized
from workers_fixtures import Supervised, metric

from retrieval.bundle import load_bundle
from retrieval.index_format import write_index_version
from retrieval.index_store import load_index_version, read_current
from retrieval.searchers import reconstruct_all

KEY = "s3cret-key-0123456789"


def serve_args(bundle: Path, index: Path, data: Path) -> list[str]:
    return ["--model", str(bundle), "--index", str(index), "--data", str(data), "--workers", "2"]


def write_ivf_sq8_version(root: Path, name: str, model_dir: Path, source: str) -> str:
    """The `source` version's vectors in an inner-product IVF2,SQ8 index probing every list
    (so its answers are exact up to the 8-bit codes): the list scanner's kind of index."""
    loaded = load_index_version(root, source)
    vectors = reconstruct_all(loaded.index)
    quantizer = faiss.IndexFlatIP(loaded.dim)
    ivf = faiss.IndexIVFScalarQuantizer(
        quantizer, loaded.dim, 2, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    ivf.train(vectors)
    bundle = load_bundle(model_dir)
    write_index_version(
        root,
        name,
        ivf,
        vectors,
        loaded.item_ids,
        factory="IVF2,SQ8",
        search_params={"nprobe": 2},
        manifest_extra={"model": {"checksum": bundle.checksum, "model_version": bundle.version}},
    )
    return name


def test_rows1_3_bad_requests_beside_good_ones_over_two_workers(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    server = Supervised(
        serve_args(tiny_bundle, tiny_index, tiny_dataset),
        tmp_path / "serve.log",
        env={"RETRIEVAL_API_KEY": KEY, "RETRIEVAL_MAX_BODY_BYTES": "65536"},
    )
    try:
        server.wait_ready(2)
        ok_headers = {"X-API-Key": KEY}

        async def scenario() -> tuple[list[int], list[tuple[int, Any]]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

                async def good(i: int) -> int:
                    body = {"query": QUERIES[i % 3], "k": 10}
                    response = await client.post("/v1/retrieve", json=body, headers=ok_headers)
                    return response.status_code

                async def bad(i: int) -> tuple[int, Any]:
                    if i % 3 == 0:  # a wrong key
                        response = await client.post(
                            "/v1/retrieve", json={"query": {}}, headers={"X-API-Key": "x" * 21}
                        )
                        return response.status_code, response.json()["error"]["code"]
                    body, field = BAD_BODIES[i % len(BAD_BODIES)]
                    path = (
                        "/v1/retrieve/batch" if body.startswith(b'{"queries"') else "/v1/retrieve"
                    )
                    response = await client.post(path, content=body, headers={**RAW, **ok_headers})
                    return response.status_code, (field, response.json()["error"].get("field"))

                goods = [good(i) for i in range(60)]
                bads = [bad(i) for i in range(60)]
                mixed: list[Any] = [x for pair in zip(goods, bads, strict=True) for x in pair]
                results = await asyncio.gather(*mixed)
            return list(results[0::2]), list(results[1::2])

        good_statuses, bad_answers = asyncio.run(scenario())
        assert set(good_statuses) == {200}
        for i, (status, detail) in enumerate(bad_answers):
            if i % 3 == 0:
                assert (status, detail) == (401, "unauthorized")
            else:
                assert status == 422 and detail[0] == detail[1], (i, status, detail)
        status, _ = send_oversized(
            server.port, _oversized_head(KEY), iter([b"x" * 8192] * 64), 1 << 20
        )
        assert status == 413
        assert (
            httpx.post(
                f"{server.url}/v1/retrieve", json={"query": {}, "k": 3}, headers=ok_headers
            ).status_code
            == 200
        )
        # the bad requests reached no worker's batcher: 61 queries in all, over both
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert metric(text, "retrieval_batch_size_sum") == 61
    finally:
        assert server.stop() == 0


def _oversized_head(key: str) -> bytes:
    return (
        b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-API-Key: " + key.encode() + b"\r\nContent-Length: 524288\r\n\r\n"
    )


def test_rows9_10_swaps_under_load_and_a_corrupt_version_over_two_workers(
    tiny_bundle: Path, index_copy: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    first = read_current(index_copy)
    versions = [
        first,
        write_ivf_sq8_version(index_copy, "v-ivf", tiny_bundle, first),
        write_subset_version(index_copy, "v-half", tiny_bundle, keep_every=2, source=first),
    ]
    expected = ids_by_version(tiny_bundle, index_copy, versions, 10, QUERIES)
    server = Supervised(
        serve_args(tiny_bundle, index_copy, tiny_dataset),
        tmp_path / "serve.log",
        env={"RETRIEVAL_INDEX_POLL_S": "0.05"},
    )
    try:
        server.wait_ready(2)

        def serving(version: str) -> bool:
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            infos = {
                v: metric(text, "retrieval_index_version_info", f'{{version="{v}"}}')
                for v in versions
            }  # 1 where any live worker serves the version
            return infos[version] == 1 and sum(infos.values()) == 1

        async def scenario() -> list[Any]:
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(
                    server.url,
                    lambda i: (str(i % 3), {"query": QUERIES[i % 3], "k": 10}),
                    clients=4,
                    stop=stop,
                    keepalive=False,  # connections spread over both workers
                )
            )
            for swap in range(1, 10):
                target = versions[swap % 3]
                set_current(index_copy, target)
                picked = await asyncio.to_thread(wait_until, functools.partial(serving, target), 20)
                assert picked, f"the workers did not all swap to {target}"
                await asyncio.sleep(0.3)
            stop.set()
            return await load

        outcomes = asyncio.run(scenario())
        assert len(outcomes) > 100
        assert all(o.status == 200 for o in outcomes), {(o.status, o.error) for o in outcomes}
        seen = set()
        for outcome in outcomes:  # one version per answer, and exactly that version's answer
            version = outcome.body["index_version"]
            seen.add(version)
            assert outcome.body["ids"] == expected[version][int(outcome.kind)], version
        assert seen == set(versions)

        # row 10: a corrupt version is refused by both workers; the one serving stays
        serving_now = versions[9 % 3]
        failed_before = metric(
            httpx.get(f"{server.url}/metrics").text,
            "retrieval_index_swaps_total",
            '{result="failed"}',
        )
        set_current(index_copy, corrupt_copy(index_copy, first, "v-corrupt"))

        def both_refused() -> bool:
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            return (
                metric(text, "retrieval_index_swaps_total", '{result="failed"}')
                == failed_before + 2
            )

        assert wait_until(both_refused, 20)
        time.sleep(0.3)  # no retry of the same failure
        assert both_refused() and serving(serving_now)
        for query in QUERIES:
            body = httpx.post(f"{server.url}/v1/retrieve", json={"query": query, "k": 10}).json()
            assert body["index_version"] == serving_now
    finally:
        assert server.stop() == 0


def test_row15_sigterm_under_load_fails_no_admitted_request_over_two_workers(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    drain_s, grace_s = 0.5, 5
    server = Supervised(
        serve_args(tiny_bundle, tiny_index, tiny_dataset),
        tmp_path / "serve.log",
        env={
            "RETRIEVAL_SHUTDOWN_DRAIN_S": str(drain_s),
            "RETRIEVAL_GRACEFUL_TIMEOUT_S": str(grace_s),
        },
    )
    try:
        workers = server.wait_ready(2)

        async def scenario() -> tuple[list[Any], float]:
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(
                    server.url,
                    lambda i: ("inline", {"query": QUERIES[i % 3], "k": 20}),
                    clients=6,
                    stop=stop,
                    keepalive=False,
                )
            )
            await asyncio.sleep(1.0)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            while server.process.poll() is None and time.monotonic() - signalled < grace_s + 15:
                await asyncio.sleep(0.02)
            stop.set()
            return await load, signalled

        outcomes, signalled = asyncio.run(scenario())
        status = server.process.wait(timeout=30)
    finally:
        server.kill()
    log = server.log.read_text()
    assert status == 0, log[-3000:]
    assert log.count("service stopped") == 2
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    answered = [o for o in outcomes if o.status]
    assert len(answered) > 50 and all(o.status == 200 for o in answered), {
        o.status for o in answered
    }
    unanswered = [o for o in outcomes if not o.status]
    assert all(o.sent >= signalled + drain_s - 0.05 for o in unanswered)
    assert any(o.sent > signalled for o in answered)  # served while draining
