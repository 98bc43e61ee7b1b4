"""``data.collect`` on real files under a device root and real sockets.

Expected percentiles are worked by hand with linear interpolation between
closest ranks (rank = p/100 * (n-1)), e.g. for 1..10: p90 has rank 8.1, so
9 + 0.1 * (10 - 9) = 9.1.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from firmware_jobs import registry
from firmware_jobs.base import JobAborted, JobError
from firmware_jobs.data_collect import MAX_SENSORS, percentile
from shared.errors import InvalidParams

if TYPE_CHECKING:
    from tests.firmware_jobs.conftest import RecordingContext


@pytest.fixture
def root(tmp_path: Path, ctx: RecordingContext) -> Path:
    root = tmp_path / "dev"
    (root / "data").mkdir(parents=True)
    ctx.settings = {**ctx.settings, "device_root": str(root)}
    return root


def collect(ctx: RecordingContext, **params: Any) -> dict[str, Any]:
    job = registry.get("data.collect")
    return job.run(ctx, job.validate(dict(params)))


def failure(ctx: RecordingContext, **params: Any) -> JobError:
    with pytest.raises(JobError) as info:
        collect(ctx, **params)
    return info.value


def jsonl(*samples: tuple[float, str, float]) -> str:
    return "".join(json.dumps({"ts": ts, "sensor": s, "value": v}) + "\n" for ts, s, v in samples)


def test_percentiles_and_stats_match_hand_computed_values(ctx: RecordingContext, root: Path) -> None:
    now = ctx.clock.now()
    samples = [(now - i, "temp", float(v)) for i, v in enumerate([7, 3, 10, 1, 5, 9, 2, 8, 4, 6])]
    samples += [(now, "hum", 20.0), (now - 1, "hum", 10.0), (now, "co2", 400)]
    (root / "data" / "s.jsonl").write_text(jsonl(*samples))
    out = collect(ctx, file="s.jsonl")
    assert out["sensors"]["temp"] == {"count": 10, "min": 1.0, "max": 10.0, "mean": 5.5, "p50": 5.5, "p90": pytest.approx(9.1), "p99": pytest.approx(9.91)}
    assert out["sensors"]["hum"] == {"count": 2, "min": 10.0, "max": 20.0, "mean": 15.0, "p50": 15.0, "p90": pytest.approx(19.0), "p99": pytest.approx(19.9)}
    assert out["sensors"]["co2"] == {"count": 1, "min": 400.0, "max": 400.0, "mean": 400.0, "p50": 400.0, "p90": 400.0, "p99": 400.0}
    assert list(out["sensors"]) == ["co2", "hum", "temp"]
    assert out["bad_lines"] == 0 and out["lines"] == 13 and "raw" not in out
    assert out["window"] == {"since": None, "until": None, "samples": 13, "out_of_window": 0}
    assert out["source"] == {"file": "s.jsonl"} and json.loads(json.dumps(out)) == out


def test_custom_percentiles_and_the_interpolation_rule() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert [percentile(values, p) for p in (0, 25, 40, 50, 100)] == [15.0, 20.0, 29.0, 35.0, 50.0]  # 40: rank 1.6 -> 20 + 0.6*15


def test_csv_with_header_quotes_and_odd_percentile_names(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s.csv").write_text('ts,sensor,value\n100,temp,1\n101,"temp",3\n102, temp ,2\n\n')
    out = collect(ctx, file="s.csv", percentiles=[0, 99.9, 100])
    assert out["sensors"] == {"temp": {"count": 3, "min": 1.0, "max": 3.0, "mean": 2.0, "p0": 1.0, "p99.9": pytest.approx(2.998), "p100": 3.0}}
    assert out["lines"] == 3 and out["bad_lines"] == 0


def test_malformed_lines_are_skipped_and_counted(ctx: RecordingContext, root: Path) -> None:
    good = jsonl((1, "t", 1.0), (2, "t", 3.0))
    bad = [
        b'{"ts": 1, "sensor": "t"',  # cut JSON
        b'{"ts": 1, "sensor": "t"}',  # no value
        b'{"ts": 1, "sensor": "t", "value": "hot"}',
        b'{"ts": 1, "sensor": "t", "value": true}',
        b'{"ts": 1, "sensor": "t", "value": NaN}',
        b'{"ts": "x", "sensor": "t", "value": 1}',
        b'{"ts": 1, "sensor": "", "value": 1}',
        b'{"ts": 1, "sensor": 5, "value": 1}',
        b"[1, 2, 3]",
        b'{"ts": 1, "sensor": "t", "value": 1' + b"0" * 400 + b"}",  # an integer no float can hold
        b"1,t",
        b"1,t,2,3",
        b"1,t,inf",
        b"x,t,1",
        b"1,t,\xff\xfe",
        b"z" * 5000,  # longer than a line may be
        b'{"ts": 1, "sensor": "t", "value": 1' + b" " * 5000 + b"}",  # valid, but too long
    ]
    (root / "data" / "s.log").write_bytes(good.encode() + b"\n".join(bad) + b"\n\n   \n" + jsonl((3, "t", 2.0)).encode())
    out = collect(ctx, file="s.log")
    assert out["bad_lines"] == len(bad) and out["lines"] == len(bad) + 3
    assert out["sensors"]["t"]["count"] == 3 and out["sensors"]["t"]["mean"] == 2.0


def test_format_can_be_forced(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text(jsonl((1, "t", 1.0)) + "2,t,2\n")
    assert collect(ctx, file="s", format="csv")["bad_lines"] == 1
    assert collect(ctx, file="s", format="jsonl")["bad_lines"] == 1
    assert collect(ctx, file="s")["bad_lines"] == 0


def test_window_seconds_includes_both_ends_and_nothing_beyond(ctx: RecordingContext, root: Path) -> None:
    now = ctx.clock.now()
    (root / "data" / "s").write_text(jsonl((now - 60.001, "t", 100.0), (now - 60, "t", 1.0), (now - 30, "t", 2.0), (now, "t", 3.0), (now + 0.5, "t", 200.0)))
    out = collect(ctx, file="s", window_seconds=60)
    assert out["window"] == {"since": now - 60, "until": now, "samples": 3, "out_of_window": 2}
    assert out["sensors"]["t"]["max"] == 3.0 and out["sensors"]["t"]["min"] == 1.0
    ctx.clock.advance(30)  # type: ignore[attr-defined]
    assert collect(ctx, file="s", window_seconds=60)["sensors"]["t"]["count"] == 3  # now-30 .. now+0.5 .. (now+30)


def test_explicit_since_and_until(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text(jsonl((9.99, "t", 0.0), (10, "t", 1.0), (15, "t", 2.0), (20, "t", 3.0), (20.01, "t", 0.0)))
    assert collect(ctx, file="s", since=10, until=20)["sensors"]["t"]["count"] == 3
    assert collect(ctx, file="s", since=15)["sensors"]["t"]["count"] == 3
    assert collect(ctx, file="s", until=10)["sensors"]["t"]["count"] == 2
    assert collect(ctx, file="s", since=100)["sensors"] == {}


def test_raw_samples_only_when_asked_and_bounded(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text(jsonl(*[(i, "t", float(i)) for i in range(50)]))
    out = collect(ctx, file="s", include_raw=True, max_raw=5)
    assert out["raw"] == [{"ts": float(i), "sensor": "t", "value": float(i)} for i in range(45, 50)]
    assert out["raw_truncated"] is True
    assert collect(ctx, file="s", include_raw=True)["raw_truncated"] is False
    assert "raw" not in collect(ctx, file="s")


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/../../x", "./s"])
def test_paths_escaping_data_are_refused(ctx: RecordingContext, root: Path, name: str) -> None:
    error = failure(ctx, file=name)
    assert error.code == "invalid_path" and error.retryable is False


def test_symlinks_out_of_data_are_refused(ctx: RecordingContext, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("1,t,1\n")
    (root / "data" / "s").symlink_to(secret)
    assert failure(ctx, file="s").code == "invalid_path"
    (root / "data" / "inside").symlink_to(root / "data")
    (root / "data" / "real.csv").write_text("1,t,1\n")
    assert collect(ctx, file="inside/real.csv")["sensors"]["t"]["count"] == 1  # a link that stays inside is fine


def test_a_fifo_or_folder_is_refused_rather_than_waited_on(ctx: RecordingContext, root: Path) -> None:
    os.mkfifo(root / "data" / "pipe")
    (root / "data" / "dir").mkdir()
    assert failure(ctx, file="pipe").code == "invalid_path"
    assert failure(ctx, file="dir").code == "invalid_path"


def test_missing_source_and_missing_device_root(ctx: RecordingContext, root: Path) -> None:
    assert failure(ctx, file="nope").code == "source_unavailable"
    ctx.settings = {**ctx.settings, "device_root": str(root / "gone")}
    assert failure(ctx, file="s").code == "no_device_root"


def test_a_huge_line_is_streamed_not_held(ctx: RecordingContext, root: Path) -> None:
    path = root / "data" / "huge"
    with path.open("wb") as handle:
        handle.write(jsonl((1, "t", 1.0)).encode())
        for _ in range(320):  # 20 MiB without a newline
            handle.write(b"9" * 65536)
        handle.write(b"\n" + jsonl((2, "t", 3.0)).encode())
    tracemalloc.start()
    try:
        out = collect(ctx, file="huge")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["bad_lines"] == 1 and out["sensors"]["t"]["count"] == 2
    assert peak < 2 * 1024 * 1024, peak


def test_too_many_samples_fails_clearly(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text("".join(f"{i},t,{i}\n" for i in range(1001)))
    error = failure(ctx, file="s", max_samples=1000)
    assert error.code == "too_many_samples" and "narrow the window" in str(error)
    assert collect(ctx, file="s", max_samples=1000, since=1)["sensors"]["t"]["count"] == 1000  # out-of-window samples do not count


def test_too_many_sensors_fails_clearly(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text("".join(f"1,s{i},1\n" for i in range(MAX_SENSORS + 1)))
    assert failure(ctx, file="s").code == "too_many_sensors"


def _serve(server: socket.socket, payload: bytes, keep_open: threading.Event | None = None) -> threading.Thread:
    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)
            if keep_open is not None:
                keep_open.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    yield server
    server.close()


def test_unix_socket_is_read_until_the_peer_closes(ctx: RecordingContext, root: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(root / "sensors.sock"))
    server.listen(1)
    server.settimeout(10)
    with server:
        thread = _serve(server, jsonl((1, "t", 1.0), (2, "t", 2.0)).encode() + b"1,t,\n3,t,3")  # the last line ends at EOF
        out = collect(ctx, unix_socket="sensors.sock", duration=30)
        thread.join(5)
    assert out["sensors"]["t"]["count"] == 3 and out["bad_lines"] == 1 and out["source"] == {"unix_socket": "sensors.sock"}


def test_tcp_socket_is_read_for_duration_and_a_cut_line_is_dropped(ctx: RecordingContext, root: Path, tcp_server: socket.socket) -> None:
    port = tcp_server.getsockname()[1]
    outputs = []
    for window in ({"window_seconds": 10}, {}):
        stay = threading.Event()
        _serve(tcp_server, b"1,t,1\n2,t,5\n3,t,", keep_open=stay)  # the peer stays connected mid-line
        try:
            outputs.append(collect(ctx, tcp_port=port, duration=0.4, **window))
        finally:
            stay.set()
    windowed, everything = outputs
    assert windowed["sensors"] == {} and windowed["window"]["out_of_window"] == 2  # ts 1 and 2 are long before now
    assert everything["sensors"]["t"]["count"] == 2 and everything["sensors"]["t"]["mean"] == 3.0
    assert everything["bad_lines"] == 0 and everything["source"] == {"tcp_port": port}


def test_socket_samples_inside_the_reading_count_for_the_window(ctx: RecordingContext, root: Path, tcp_server: socket.socket) -> None:
    now = ctx.clock.now()
    stay = threading.Event()
    _serve(tcp_server, jsonl((now - 5, "t", 1.0), (now + 0.2, "t", 2.0), (now - 11, "t", 9.0)).encode(), keep_open=stay)
    try:
        out = collect(ctx, tcp_port=tcp_server.getsockname()[1], duration=0.3, window_seconds=10)
    finally:
        stay.set()
    assert out["sensors"]["t"]["count"] == 2 and out["window"]["until"] == pytest.approx(now + 0.3)


def test_abort_while_reading_a_socket(ctx: RecordingContext, root: Path, tcp_server: socket.socket) -> None:
    stay = threading.Event()
    _serve(tcp_server, b"1,t,1\n", keep_open=stay)
    threading.Timer(0.2, ctx.abort.set).start()
    try:
        with pytest.raises(JobAborted):
            collect(ctx, tcp_port=tcp_server.getsockname()[1], duration=30)
    finally:
        stay.set()


def test_unreachable_sockets_fail_retryably(ctx: RecordingContext, root: Path) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    error = failure(ctx, tcp_port=port, duration=1)
    assert error.code == "source_unavailable" and error.retryable is True
    assert failure(ctx, unix_socket="nope.sock", duration=1).code == "source_unavailable"
    assert failure(ctx, unix_socket="../x.sock").code == "invalid_path"


@pytest.mark.parametrize(("params", "message"), [
    ({}, "exactly one source"),
    ({"file": "a", "tcp_port": 80}, "exactly one source"),
    ({"file": "a", "window_seconds": 5, "since": 1}, "excludes"),
    ({"file": "a", "since": 5, "until": 1}, "after until"),
    ({"file": "a", "percentiles": [101]}, "above the maximum"),
    ({"file": "a", "max_raw": 100000}, "above the maximum"),
    ({"tcp_port": 0}, "below the minimum"),
])
def test_bad_params_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        registry.get("data.collect").validate(params)


def test_collecting_twice_gives_the_same_summary(ctx: RecordingContext, root: Path) -> None:
    (root / "data" / "s").write_text(jsonl((1, "a", 1.0), (2, "a", 4.0)))
    assert collect(ctx, file="s") == collect(ctx, file="s")
    assert sorted(p.name for p in (root / "data").iterdir()) == ["s"]
