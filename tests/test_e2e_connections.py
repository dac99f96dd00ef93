"""Client connections are bounded: in time to send a request, and in number."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support import Gateway, wait_until, write_config

WAIT = 30.0  # a bound for the test, far above any timeout it configures


def config(tmp_path: Path, tiny_model: Path, **gateway: object) -> Path:
    settings = json.dumps({"watch_config": False, **gateway})
    return write_config(tmp_path, f"gateway: {settings}\nmodels:\n  a: {{source: {tiny_model}}}\n")


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT)


def closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes; what it sent first (b"" for a silent close)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


@contextlib.contextmanager
def idle_sockets(gw: Gateway, count: int) -> Iterator[list[socket.socket]]:
    sockets = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(count)]
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))  # pragma: no cover (nothing is sent)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_health_answers_while_300_idle_connections_are_open_under_a_256_descriptor_limit(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A header timeout that never fires here: only the bound on connections is at work.
    path = config(tmp_path, tiny_model, header_timeout_s=600)
    with Gateway(path, preexec_fn=low_descriptor_limit) as gw, idle_sockets(gw, 300) as idle:
        with httpx.Client(base_url=gw.url, timeout=WAIT) as fresh:
            assert fresh.get("/health").status_code == 200
            reply = fresh.post("/a", json={"prompt": "hi", "max_length": 3})
            assert reply.status_code == 200
        assert wait_until(lambda: sum(not still_open(s) for s in idle) >= 300 - 256)


def test_beyond_max_connections_the_oldest_idle_connections_are_closed(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = config(tmp_path, tiny_model, header_timeout_s=600, max_connections=20)
    with Gateway(path) as gw, idle_sockets(gw, 40) as idle:
        with httpx.Client(base_url=gw.url, timeout=WAIT) as fresh:
            assert fresh.get("/health").status_code == 200
        assert wait_until(lambda: sum(still_open(s) for s in idle) <= 20)
        assert wait_until(lambda: not any(still_open(s) for s in idle[:20]))  # oldest first


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    tiny_model: Path, tmp_path: Path
) -> None:
    with Gateway(config(tmp_path, tiny_model, header_timeout_s=1)) as gw, connect(gw) as silent:
        assert closed_by_server(silent) == b""


def test_a_header_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout(
    tiny_model: Path, tmp_path: Path
) -> None:
    with Gateway(config(tmp_path, tiny_model, header_timeout_s=1)) as gw, connect(gw) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n")
        deadline = time.monotonic() + WAIT
        cut = False
        while not cut and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                slow.sendall(b"X")  # a header line that never ends
            except OSError:
                cut = True
            cut = cut or not still_open(slow)
        assert cut
        assert closed_by_server(slow) == b""  # no response: the header never completed


def test_a_request_body_that_stalls_is_cut_off(tiny_model: Path, tmp_path: Path) -> None:
    with Gateway(config(tmp_path, tiny_model, header_timeout_s=1)) as gw, connect(gw) as stall:
        head = b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        stall.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
        closed_by_server(stall)  # returns: the server closed it
        assert gw.client.get("/health").status_code == 200


def test_a_request_body_sent_a_byte_at_a_time_is_cut_off(tiny_model: Path, tmp_path: Path) -> None:
    # Each byte comes well within the header timeout: only a deadline for the whole body
    # (BODY_TIMEOUT_FACTOR header timeouts) ends it.
    with Gateway(config(tmp_path, tiny_model, header_timeout_s=1)) as gw, connect(gw) as drip:
        head = b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        drip.sendall(head + b"Content-Length: 100\r\n\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < WAIT:
                drip.sendall(b" ")
                readable, _, _ = select.select([drip], [], [], 0.5)
                if readable and not drip.recv(4096):
                    break  # closed by the server
        assert time.monotonic() - started < WAIT
        assert gw.client.get("/health").status_code == 200


def test_a_request_in_progress_outlives_the_header_timeout(
    tiny_model: Path, tmp_path: Path
) -> None:
    events: list[dict[str, object]] = []

    def listen(gw: Gateway) -> None:
        with httpx.stream("GET", f"{gw.url}/admin/events", timeout=WAIT) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1].get("state") == "ready":
                        return

    path = config(tmp_path, tiny_model, header_timeout_s=1)
    with Gateway(path) as gw, ThreadPoolExecutor(1) as pool:
        listening = pool.submit(listen, gw)
        assert wait_until(lambda: bool(events))  # subscribed
        time.sleep(2.5)  # the stream stays open past the header timeout
        assert gw.client.post("/admin/models/a/load").status_code == 200
        listening.result(timeout=WAIT)
        assert {"type": "state", "model": "a", "state": "ready"}.items() <= events[-1].items()


def test_a_reload_changes_the_header_timeout_for_new_connections(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = config(tmp_path, tiny_model, header_timeout_s=600)
    with Gateway(path) as gw:
        config(tmp_path, tiny_model, header_timeout_s=1)
        assert gw.client.post("/admin/reload").json()["applied"] is True
        with connect(gw) as silent:
            assert closed_by_server(silent) == b""
