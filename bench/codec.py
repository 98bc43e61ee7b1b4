"""Codec benchmark: the envelope as JSON (what Outpost sends) against
MessagePack (when the ``msgpack`` package is installed), for typical
messages: sizes in bytes and encode/decode microseconds per message.

The full decode includes validation into typed records, which is most of
the cost whichever byte format carries it.

Usage: python bench/codec.py
"""

from __future__ import annotations

import json
import timeit

from shared.envelope import Envelope, decode, encode
from shared.hlc import HLC
from shared.messages import Assign, Heartbeat, JobError, Result

STAMP = HLC(1_767_225_600_000, 3, "agent-0042")
SAMPLES = {
    "assign": Assign("9f1c2e7a4b5d4c3e8f9a0b1c2d3e4f50", "fleet_health", "manual__2026-11-25T15:00:00.000000+00:00", "collect", 1, "diagnostics.collect", {"path": "/"}, 17),
    "result ok": Result("9f1c2e7a4b5d4c3e8f9a0b1c2d3e4f50", 1, "success", {"disk": {"free_bytes": 84328075264, "total_bytes": 105089261568}, "load": [0.5, 0.4, 0.3], "uptime_s": 86400.5}, None, 1.7e9, 1.7e9 + 0.2),
    "result failed": Result("9f1c2e7a4b5d4c3e8f9a0b1c2d3e4f50", 2, "failed", None, JobError("command_failed", "command exited 3: no such file", True), 1.7e9, 1.7e9 + 0.2),
    "heartbeat": Heartbeat("0.1.0", 3, 1, ("9f1c2e7a4b5d4c3e8f9a0b1c2d3e4f50",), True, {"results.sent": 120, "rejected.decode_error": 1}),
}


def per_call_us(fn: object, number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    try:
        import msgpack  # type: ignore[import-not-found]
    except ImportError:
        msgpack = None
    print(f"{'message':<14} {'json B':>7} {'enc us':>7} {'dec+validate us':>16} {'json.loads us':>14}" + (f" {'msgpack B':>10} {'mp enc us':>10} {'mp dec us':>10}" if msgpack else ""))
    for name, body in SAMPLES.items():
        env = Envelope(body, sender="agent-0042", hlc=STAMP, id="0" * 32)
        data = encode(env)
        row = f"{name:<14} {len(data):>7} {per_call_us(lambda: encode(env)):>7.1f} {per_call_us(lambda: decode(data)):>16.1f} {per_call_us(lambda: json.loads(data)):>14.1f}"
        if msgpack:
            doc = json.loads(data)
            packed = msgpack.packb(doc)
            row += f" {len(packed):>10} {per_call_us(lambda: msgpack.packb(doc)):>10.1f} {per_call_us(lambda: msgpack.unpackb(packed)):>10.1f}"
        print(row)


if __name__ == "__main__":
    main()
