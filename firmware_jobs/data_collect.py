"""``data.collect``: summarise sensor samples on the device; the raw data stays there.

Samples come from exactly one source:

* ``file``: a file under the device root's ``data/`` folder (``..``,
  absolute paths and symlinks leading out are refused), read to its end;
* ``unix_socket``: a Unix stream socket under the device root, or
  ``tcp_port``: a TCP port on ``127.0.0.1`` (never another host); lines are
  read for at most ``duration`` seconds, or until the peer closes.

A line is a JSON object ``{"ts": <epoch seconds>, "sensor": "temp", "value":
21.5}`` or CSV ``ts,sensor,value`` (a ``ts,sensor,value`` header line and
blank lines are skipped; ``format`` forces one syntax, ``auto`` decides per
line). Anything else (bad JSON, missing fields, non-numeric or infinite
values, lines over 4 KiB, invalid UTF-8) is skipped and counted in
``bad_lines``.

The window is ``[since, until]``, both ends included: explicit bounds, or
``window_seconds`` back from now (``ctx.clock``; for a socket the window runs
on to the end of the reading), or everything when neither is given. Per
sensor the output gives count, min, max, mean and the requested percentiles
(linear interpolation between closest ranks, as numpy's default: rank
``p/100 * (n-1)``), keyed ``p50``, ``p99.9``...

Memory is bounded: the input is streamed in 64 KiB chunks, values are kept
as 8-byte floats only for the percentiles (sorting one sensor's values takes
about 32 bytes per value for a moment), and more than ``max_samples`` in
the window (or more than 1,000 sensors) fails with ``too_many_samples`` /
``too_many_sensors`` rather than a guess; narrow the window. With
``include_raw`` the *last* ``max_raw`` samples of the window are returned too.
Idempotent: it only reads.
"""

from __future__ import annotations

import csv
import json
import math
import socket
import time
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from firmware_jobs.base import Job, JobAborted, JobContext, JobError
from firmware_jobs.jobutil import confined, device_root
from firmware_jobs.registry import register
from shared.errors import InvalidParams

#: Longest line accepted, in bytes; longer ones count as bad lines.
MAX_LINE = 4096
#: Most distinct sensors in one summary.
MAX_SENSORS = 1000
_CHUNK = 65536
_RECV_WAIT = 0.2
_CONNECT_TIMEOUT = 5.0
_HEADER = ["ts", "sensor", "value"]
_SOURCES = ("file", "unix_socket", "tcp_port")


@register
class CollectData(Job):
    """Aggregate sensor samples from a data file or a local socket over a window."""

    name = "data.collect"
    version = "1.0"
    description = "Summarise sensor samples (count, min, max, mean, percentiles) from a data/ file or a local socket over a time window."
    params_schema = {
        "type": "object",
        "properties": {
            "file": {"type": "string", "minLength": 1, "maxLength": 512, "description": "Samples file, relative to the device root's data/ folder."},
            "unix_socket": {"type": "string", "minLength": 1, "maxLength": 100, "description": "Unix stream socket, relative to the device root."},
            "tcp_port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "TCP port on 127.0.0.1 that streams samples."},
            "format": {"type": "string", "enum": ["auto", "jsonl", "csv"], "default": "auto", "description": "Line syntax; auto: JSON if the line starts with '{', else CSV."},
            "duration": {"type": "number", "minimum": 0.05, "maximum": 3600, "default": 10, "description": "Seconds to read a socket for (at most)."},
            "window_seconds": {"type": "number", "minimum": 0.001, "maximum": 10 * 365 * 86400, "description": "Window ending now (the device clock)."},
            "since": {"type": "number", "description": "Window start, epoch seconds (included)."},
            "until": {"type": "number", "description": "Window end, epoch seconds (included)."},
            "percentiles": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}, "maxItems": 20, "default": [50, 90, 99]},
            "include_raw": {"type": "boolean", "default": False, "description": "Also return the last max_raw samples of the window."},
            "max_raw": {"type": "integer", "minimum": 1, "maximum": 2000, "default": 100, "description": "Most raw samples returned."},
            "max_samples": {"type": "integer", "minimum": 1, "maximum": 5_000_000, "default": 1_000_000, "description": "Most samples in the window (8 bytes each)."},
        },
        "additionalProperties": False,
    }

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        result = super().validate(params)
        given = [name for name in _SOURCES if name in result]
        if len(given) != 1:
            raise InvalidParams(f"params: give exactly one source of {list(_SOURCES)}, got {given}")
        if "window_seconds" in result and ("since" in result or "until" in result):
            raise InvalidParams("params: window_seconds excludes since and until")
        if "since" in result and "until" in result and result["since"] > result["until"]:
            raise InvalidParams(f"params: since ({result['since']}) is after until ({result['until']})")
        return result

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        root = device_root(ctx)
        now = ctx.clock.now()
        since, until = params.get("since"), params.get("until")
        if "window_seconds" in params:
            since = now - params["window_seconds"]
            until = now + (0 if "file" in params else params["duration"])
        summary = Summary(since, until, params)
        if "file" in params:
            path = confined(root.data_dir, params["file"], "file")
            if path.exists() and not path.is_file():  # a FIFO would block the read forever
                raise JobError(f"data/{params['file']} is not a regular file", code="invalid_path", retryable=False)
            summary.read(_file_chunks(ctx, path))
            source: dict[str, Any] = {"file": params["file"]}
        else:
            sock, source = _connect(root.path, params)
            with sock:
                summary.read(_socket_chunks(ctx, sock, params["duration"]))
        ctx.log(f"read {summary.lines} lines: {summary.in_window} samples in the window, {summary.bad_lines} bad")
        return {"source": source, **summary.result()}


class Summary:
    """Streams lines in, keeps per-sensor values, and summarises them."""

    def __init__(self, since: float | None, until: float | None, params: dict[str, Any]) -> None:
        self.since, self.until = since, until
        self.format: str = params["format"]
        self.percentiles: list[float] = params["percentiles"]
        self.max_samples: int = params["max_samples"]
        self.raw: deque[dict[str, Any]] | None = deque(maxlen=params["max_raw"]) if params["include_raw"] else None
        self.values: dict[str, array[float]] = {}
        self.lines = self.bad_lines = self.in_window = self.out_of_window = 0

    def read(self, chunks: Iterator[bytes]) -> None:
        """Feed every line of ``chunks``. An empty chunk marks the end of the
        input: only then does a last line without a newline count (a socket
        read cut at its duration may stop mid-line)."""
        buffer = bytearray()
        overlong = ended = False
        for chunk in chunks:
            ended = not chunk
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                if overlong:
                    self.lines += 1
                    self.bad_lines += 1
                    overlong = False
                else:
                    self.line(bytes(buffer[start:end]))
                start = end + 1
            del buffer[:start]
            if len(buffer) > MAX_LINE:
                buffer.clear()  # the rest of this line is dropped as it comes
                overlong = True
        if overlong:
            self.lines += 1
            self.bad_lines += 1
        elif buffer and ended:
            self.line(bytes(buffer))

    def line(self, raw: bytes) -> None:
        if not raw.strip():
            return
        self.lines += 1
        sample = parse_line(raw, self.format) if len(raw) <= MAX_LINE else None
        if sample is None:
            self.bad_lines += 1
            return
        if sample == ():
            self.lines -= 1  # the CSV header is not data
            return
        ts, sensor, value = sample
        if (self.since is not None and ts < self.since) or (self.until is not None and ts > self.until):
            self.out_of_window += 1
            return
        if self.in_window >= self.max_samples:
            raise JobError(f"more than max_samples={self.max_samples} samples in the window; narrow the window or raise max_samples",
                           code="too_many_samples", retryable=False)
        values = self.values.get(sensor)
        if values is None:
            if len(self.values) >= MAX_SENSORS:
                raise JobError(f"more than {MAX_SENSORS} distinct sensors in the window", code="too_many_sensors", retryable=False)
            values = self.values[sensor] = array("d")
        values.append(value)
        self.in_window += 1
        if self.raw is not None:
            self.raw.append({"ts": ts, "sensor": sensor, "value": value})

    def result(self) -> dict[str, Any]:
        sensors = {name: describe(self.values[name], self.percentiles) for name in sorted(self.values)}
        out: dict[str, Any] = {
            "window": {"since": self.since, "until": self.until, "samples": self.in_window, "out_of_window": self.out_of_window},
            "sensors": sensors,
            "lines": self.lines,
            "bad_lines": self.bad_lines,
        }
        if self.raw is not None:
            out["raw"] = list(self.raw)
            out["raw_truncated"] = self.in_window > len(self.raw)
        return out


def parse_line(raw: bytes, fmt: str) -> tuple[float, str, float] | tuple[()] | None:
    """``(ts, sensor, value)``, ``()`` for a CSV header, or None for a bad line."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if fmt == "jsonl" or (fmt == "auto" and text.startswith("{")):
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        ts, sensor, value = obj.get("ts"), obj.get("sensor"), obj.get("value")
        if not (_is_number(ts) and _is_number(value)):
            return None
    else:
        try:
            fields = next(csv.reader([text]))
        except (csv.Error, StopIteration):
            return None
        if [f.strip() for f in fields] == _HEADER:
            return ()
        if len(fields) != 3:
            return None
        try:
            ts, sensor, value = float(fields[0]), fields[1].strip(), float(fields[2])
        except ValueError:
            return None
    if not isinstance(sensor, str) or not sensor or len(sensor) > 128:
        return None
    try:
        ts, value = float(ts), float(value)
    except OverflowError:  # a JSON integer too large for a float
        return None
    if not (math.isfinite(ts) and math.isfinite(value)):
        return None
    return ts, sensor, value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe(values: array[float], percentiles: list[float]) -> dict[str, Any]:
    ordered = sorted(values)  # one sensor at a time, so the copy is bounded by max_samples
    out: dict[str, Any] = {"count": len(ordered), "min": ordered[0], "max": ordered[-1], "mean": math.fsum(ordered) / len(ordered)}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(ordered, p)
    return out


def percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks of sorted ``ordered``."""
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _file_chunks(ctx: JobContext, path: Path) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; a generator)
    except FileNotFoundError as exc:
        raise JobError(f"no samples file data/{path.name}", code="source_unavailable", retryable=True) from exc
    except OSError as exc:
        raise JobError(f"cannot read {path}: {exc.strerror or exc}", code="source_unavailable", retryable=True) from exc
    with handle:
        size = max(1, path.stat().st_size)
        done = reported = 0
        while chunk := handle.read(_CHUNK):
            if ctx.should_abort():
                raise JobAborted("stopped while reading samples")
            yield chunk
            done += len(chunk)
            if done - reported >= 4 * 1024 * 1024:
                reported = done
                ctx.progress(min(1.0, done / size), f"{done} bytes read")
        yield b""


def _connect(root: Path, params: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
    timeout = min(_CONNECT_TIMEOUT, params["duration"])
    if "tcp_port" in params:
        source: dict[str, Any] = {"tcp_port": params["tcp_port"]}
        try:
            return socket.create_connection(("127.0.0.1", params["tcp_port"]), timeout=timeout), source
        except OSError as exc:
            raise JobError(f"cannot connect to 127.0.0.1:{params['tcp_port']}: {exc.strerror or exc}", code="source_unavailable", retryable=True) from exc
    path = confined(root, params["unix_socket"], "unix_socket")
    source = {"unix_socket": params["unix_socket"]}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise JobError(f"cannot connect to {params['unix_socket']}: {exc.strerror or exc}", code="source_unavailable", retryable=True) from exc
    return sock, source


def _socket_chunks(ctx: JobContext, sock: socket.socket, duration: float) -> Iterator[bytes]:
    deadline = time.monotonic() + duration
    while (left := deadline - time.monotonic()) > 0:
        if ctx.should_abort():
            raise JobAborted("stopped while reading samples")
        sock.settimeout(min(left, _RECV_WAIT))
        try:
            chunk = sock.recv(_CHUNK)
        except TimeoutError:
            continue
        except OSError as exc:
            raise JobError(f"reading the samples socket failed: {exc.strerror or exc}", code="source_unavailable", retryable=True) from exc
        yield chunk
        if not chunk:
            return
