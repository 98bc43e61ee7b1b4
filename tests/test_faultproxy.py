"""The fault proxy itself, against a loopback echo server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class EchoServer:
    """Echoes every read back and remembers the size of each read."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reads: list[int] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.reads.append(len(data))
                conn.sendall(data)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.sock.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def silent(sock: socket.socket, wait: float = 0.3) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(10)
    except TimeoutError:
        return True
    return False


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"hello" * 1000)
        assert recv_exactly(sock, 5000) == b"hello" * 1000


def test_latency_delays_each_chunk(proxy: FaultProxy) -> None:
    proxy.latency(0.2)
    with connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        # Twice: client to server, then server to client.
        assert 0.38 <= time.monotonic() - start < 1.5


def test_slicing_splits_writes_into_small_pieces(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.slicing(3)
    payload = bytes(range(60))
    with connect(proxy) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, 60) == payload
    assert max(echo.reads) < 60 and len(echo.reads) >= 5


def test_blackhole_forwards_nothing_and_heals_for_new_connections(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as before:
        before.sendall(b"a")
        assert recv_exactly(before, 1) == b"a"
        proxy.blackhole()
        before.sendall(b"lost")
        assert silent(before)
        with connect(proxy) as during:  # accepted, but nothing behind it
            during.sendall(b"lost too")
            assert silent(during)
        assert echo.accepted == 1
        proxy.pass_through()
        before.sendall(b"still lost")  # its stream has a hole: it stays dead
        assert silent(before)
    with connect(proxy) as after:
        after.sendall(b"back")
        assert recv_exactly(after, 4) == b"back"


def test_reset_sends_rst_to_open_and_new_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        proxy.reset()
        sock.settimeout(2)
        with pytest.raises(ConnectionResetError):
            for _ in range(50):
                if not sock.recv(10):
                    break
                time.sleep(0.02)
        with pytest.raises(ConnectionResetError):  # at connect or at the first read
            with connect(proxy) as new:
                new.settimeout(2)
                new.recv(10)
    proxy.pass_through()
    with connect(proxy) as sock:
        sock.sendall(b"z")
        assert recv_exactly(sock, 1) == b"z"


def test_half_open_silences_open_connections_without_closing_them(proxy: FaultProxy) -> None:
    with connect(proxy) as old:
        old.sendall(b"1")
        assert recv_exactly(old, 1) == b"1"
        proxy.half_open()
        old.sendall(b"2")
        assert silent(old, 0.5)  # no data, and no FIN or RST either
        assert proxy.open_connections() == 1
        with connect(proxy) as new:
            new.sendall(b"3")
            assert recv_exactly(new, 1) == b"3"
    assert [e.what for e in proxy.accepted()] == ["accepted", "accepted"]


def test_unknown_mode_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("flaky")
