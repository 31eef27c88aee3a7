"""Row 29 of the reliability suite: the HTTP edge against raw sockets on loopback.

Row 3 refuses oversized bodies; these rows bound what a client can hold without the API
key or without sending its body: the key is checked from the headers before any body
byte is read (401 at once, connection closed), a body slower than `body_timeout_s` gets
408 and its connection is closed (20 such clients at once, while a normal client keeps
being served), and past `max_connections` open connections a request gets 503.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr
from reliability_fixtures import SearchSpy
from service_fixtures import live_server, wait_until

from service.settings import ServiceSettings

KEY = "http-edge-key-0123456789"
WAIT_S = 10.0  # the longest any answer is waited for (a bound, not a speed check)
QUERY = {"query": {}, "k": 3}
BODY = b'{"query": {}, "k": 3}'


def request_head(
    port: int, content_length: int, key: str | None = None, *, close: bool = False
) -> bytes:
    """The request line and headers of a POST /v1/retrieve with a body still to come."""
    lines = [
        "POST /v1/retrieve HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
    ]
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def open_request(port: int, head: bytes, body_start: bytes = b"") -> socket.socket:
    """A connection that sent `head` and the first bytes of its body, then goes silent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(head + body_start)
    return sock


def read_answer(sock: socket.socket, timeout_s: float = WAIT_S) -> tuple[int, bytes]:
    """(status, whole answer) of the response on `sock`, read until the server closes
    the connection or `timeout_s` passes (status 0: no answer in time)."""
    sock.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break  # closed by the server
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    if not received.startswith(b"HTTP/1.1 "):
        return 0, received
    return int(received.split(b" ", 2)[1]), received


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset within the wait)."""
    sock.settimeout(WAIT_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_row29_a_wrong_key_gets_401_before_any_body_byte_is_sent(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """A 1 MiB body announced with a wrong (or no) key: the 401 comes from the headers
    alone, before the first body byte is sent, and the connection is closed."""
    mib = 1 << 20
    with live_server(make_settings(api_key=SecretStr(KEY), max_body_bytes=mib)) as server:
        spy = SearchSpy(server.services)
        port = server.settings.port
        for key in ("wrong-key-0123456789", None):
            sock = open_request(port, request_head(port, mib, key))  # no body byte yet
            try:
                status, answer = read_answer(sock)
                assert status == 401, answer[:200]
                assert b'"code": "unauthorized"' in answer or b'"code":"unauthorized"' in answer
                assert b"connection: close" in answer.lower()
                try:  # the rest of the body goes nowhere: the connection is gone
                    for _ in range(64):
                        sock.sendall(b"x" * (mib // 64))
                    refused = closed_by_server(sock)
                except (BrokenPipeError, ConnectionResetError):
                    refused = True
                assert refused
            finally:
                sock.close()
        # the right key with the same slow start is waited for, then served
        sock = open_request(port, request_head(port, len(BODY), KEY, close=True), BODY[:5])
        try:
            time.sleep(0.2)
            sock.sendall(BODY[5:])
            status, answer = read_answer(sock)
            assert status == 200, answer[:200]
        finally:
            sock.close()
        assert spy.calls == 1  # only the request with the key reached the index
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'requests_total{method="POST",route="/v1/retrieve",status="401"} 2.0' in metrics


def test_row29_twenty_slow_bodies_get_408_while_a_normal_client_is_served(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """20 clients send their headers and a few body bytes, then nothing: each gets 408 once
    `body_timeout_s` has passed (not before) and its connection is closed; meanwhile a
    normal client gets 200s."""
    timeout_s = 0.5
    with live_server(make_settings(body_timeout_s=timeout_s)) as server:
        port = server.settings.port
        started = time.monotonic()
        slow = [open_request(port, request_head(port, 100), b'{"query"') for _ in range(20)]
        try:
            normal = []
            with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
                while time.monotonic() - started < timeout_s * 1.5:
                    normal.append(client.post("/v1/retrieve", json=QUERY).status_code)
            answers = [read_answer(sock) for sock in slow]
            elapsed = time.monotonic() - started
        finally:
            for sock in slow:
                sock.close()
        assert normal and normal == [200] * len(normal)
        statuses = [status for status, _ in answers]
        assert statuses == [408] * 20, [a[:120] for _, a in answers]
        for _, answer in answers:
            assert b'"body_timeout"' in answer and b"connection: close" in answer.lower()
        assert elapsed >= timeout_s  # nobody was cut off before the timeout
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'requests_total{method="POST",route="other",status="408"} 20.0' in metrics
        assert httpx.post(f"{server.url}/v1/retrieve", json=QUERY).status_code == 200


def test_row29_past_max_connections_a_request_gets_503(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """With `max_connections` = 4 held open (headers sent, body pending), the 5th
    connection's request gets 503 at once; once one is released, requests are served."""
    limit = 4
    with live_server(make_settings(max_connections=limit, body_timeout_s=60)) as server:
        port = server.settings.port
        held = [open_request(port, request_head(port, 100), b"{") for _ in range(limit)]
        try:
            extra = open_request(port, request_head(port, len(BODY), close=True), BODY)
            try:
                status, answer = read_answer(extra)
            finally:
                extra.close()
            assert status == 503, answer[:200]
            for sock in held:  # the held ones are still waited for: no answer, not closed
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            held.pop().close()

            def served() -> bool:
                return httpx.post(f"{server.url}/v1/retrieve", json=QUERY).status_code == 200

            assert wait_until(served, WAIT_S, interval_s=0.05)
        finally:
            for sock in held:
                sock.close()
