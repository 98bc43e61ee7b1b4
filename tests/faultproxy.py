"""A TCP fault proxy for tests: put it between clients and a server on
loopback and switch what the "network" does while they talk.

One selector thread moves bytes for every connection. Modes (``set_mode`` or
the named methods, switchable at any time from any thread):

* ``pass``      forward everything;
* ``blackhole`` every connection, existing and new, forwards nothing either
  way: bytes are read and dropped, new clients are accepted but never
  connected upstream (a partition: SYNs get through to nothing);
* ``latency``   forward each chunk ``delay`` seconds after it arrived;
* ``slicing``   forward in ``chunk``-byte pieces, each its own ``send`` a
  little apart, so the peer reads packets split at arbitrary byte offsets;
* ``reset``     every connection is closed with a TCP RST (``SO_LINGER`` 0),
  and so is each new one while the mode holds;
* ``half_open`` connections open now go silent (nothing forwarded, nothing
  closed: like a NAT entry or a peer that vanished); new ones pass.

A connection that dropped bytes never forwards again (its byte stream has a
hole in it); it stays open, silent, until one of its peers closes it. Going
back to ``pass`` therefore heals the network for new connections only, as
after a real partition long enough for the endpoints to give up.

Loopback only; for tests, not for production traffic.
"""

from __future__ import annotations

import collections
import itertools
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "blackhole", "latency", "slicing", "reset", "half_open")
_READ = 65536
#: Seconds between two slices of one chunk in ``slicing`` mode.
SLICE_GAP = 0.001


@dataclass
class _Leg:
    """One direction: bytes read from ``src`` waiting to be written to ``dst``."""

    src: socket.socket
    dst: socket.socket | None
    pending: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    eof: bool = False


@dataclass
class _Conn:
    cid: int
    client: socket.socket
    upstream: socket.socket | None
    dead: bool = False  # dropped bytes: never forwards again
    legs: list[_Leg] = field(default_factory=list)
    closed: bool = False


@dataclass(frozen=True)
class ConnEvent:
    """Something that happened to a connection, at ``time.monotonic()``."""

    at: float
    cid: int
    what: str  # accepted, refused, reset, closed


class FaultProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode = "pass"
        self._delay = 0.0
        self._chunk = 1
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self.events: list[ConnEvent] = []
        self._sel = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._waker_r, selectors.EVENT_READ, "wake")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"faultproxy-{self.port}", daemon=True)

    # --- control (any thread) ---------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self._thread.join(5)
        for conn in list(self._conns.values()):
            self._close(conn, "closed")
        self._sel.close()
        self._listener.close()
        self._waker_r.close()
        self._waker_w.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, *, delay: float = 0.0, chunk: int = 1) -> None:
        """Switch modes; ``delay`` is for ``latency``, ``chunk`` for ``slicing``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if chunk < 1 or delay < 0:
            raise ValueError("chunk must be >= 1 and delay >= 0")
        with self._lock:
            self._mode, self._delay, self._chunk = mode, delay, chunk
            if mode == "half_open":
                # Only the connections open now; the mode itself forwards new ones.
                for conn in self._conns.values():
                    conn.dead = True
        self._wake()

    def pass_through(self) -> None:
        self.set_mode("pass")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def latency(self, delay: float) -> None:
        self.set_mode("latency", delay=delay)

    def slicing(self, chunk: int = 1) -> None:
        self.set_mode("slicing", chunk=chunk)

    def reset(self) -> None:
        self.set_mode("reset")

    def half_open(self) -> None:
        self.set_mode("half_open")

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns.values() if not c.closed)

    def accepted(self) -> list[ConnEvent]:
        with self._lock:
            return [e for e in self.events if e.what == "accepted"]

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"x")
        except OSError:
            pass

    # --- the selector thread ----------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            timeout = self._next_due()
            for key, _ in self._sel.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    try:
                        self._waker_r.recv(4096)
                    except BlockingIOError:
                        pass
                else:
                    conn, leg = key.data
                    self._read(conn, leg)
            with self._lock:
                mode = self._mode
                conns = list(self._conns.values())
            for conn in conns:
                if conn.closed:
                    continue
                if mode == "reset":
                    self._close(conn, "reset", rst=True)
                    continue
                if mode == "blackhole" and not conn.dead:
                    conn.dead = True
                self._flush(conn)

    def _next_due(self) -> float:
        with self._lock:
            dues = [leg.pending[0][0] for c in self._conns.values() if not c.closed for leg in c.legs if leg.pending]
        if not dues:
            return 0.5
        # At least 2 ms: a due chunk whose peer is not reading must not spin the loop.
        return max(0.002, min(dues) - time.monotonic())

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        cid = next(self._ids)
        with self._lock:
            mode = self._mode
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "reset":
            self._record(cid, "accepted")
            _rst(client)
            self._record(cid, "reset")
            return
        upstream: socket.socket | None = None
        if mode != "blackhole":
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                self._record(cid, "refused")
                _rst(client)
                return
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
        client.setblocking(False)
        conn = _Conn(cid, client, upstream, dead=upstream is None)
        conn.legs = [_Leg(client, upstream)]
        if upstream is not None:
            conn.legs.append(_Leg(upstream, client))
        with self._lock:
            self._conns[cid] = conn
        for leg in conn.legs:
            self._sel.register(leg.src, selectors.EVENT_READ, (conn, leg))
        self._record(cid, "accepted")

    def _read(self, conn: _Conn, leg: _Leg) -> None:
        if conn.closed:
            return
        try:
            data = leg.src.recv(_READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            leg.eof = True
            try:
                self._sel.unregister(leg.src)
            except (KeyError, ValueError):
                pass
            # A dead connection has nothing worth delivering: close it now.
            if conn.dead or not any(l.pending for l in conn.legs):
                self._close(conn, "closed")
            return
        with self._lock:
            mode, delay, chunk = self._mode, self._delay, self._chunk
        if conn.dead or mode == "blackhole" or leg.dst is None:
            conn.dead = True
            return
        now = time.monotonic()
        if mode == "latency":
            leg.pending.append((now + delay, data))
        elif mode == "slicing":
            for i, start in enumerate(range(0, len(data), chunk)):
                leg.pending.append((now + i * SLICE_GAP, data[start:start + chunk]))
        else:
            leg.pending.append((now, data))

    def _flush(self, conn: _Conn) -> None:
        if conn.dead:
            for leg in conn.legs:
                leg.pending.clear()
            return
        now = time.monotonic()
        for leg in conn.legs:
            while leg.pending and leg.pending[0][0] <= now and leg.dst is not None:
                due, data = leg.pending[0]
                try:
                    sent = leg.dst.send(data)
                except BlockingIOError:
                    break
                except OSError:
                    self._close(conn, "closed")
                    return
                if sent < len(data):
                    leg.pending[0] = (due, data[sent:])
                    break
                leg.pending.popleft()
        if any(leg.eof for leg in conn.legs) and not any(leg.pending for leg in conn.legs):
            self._close(conn, "closed")

    def _close(self, conn: _Conn, why: str, rst: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if rst:
                _rst(sock)
            else:
                sock.close()
        with self._lock:
            self._conns.pop(conn.cid, None)
        self._record(conn.cid, why)

    def _record(self, cid: int, what: str) -> None:
        with self._lock:
            self.events.append(ConnEvent(time.monotonic(), cid, what))


def _rst(sock: socket.socket) -> None:
    """Close so the peer gets a RST, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
