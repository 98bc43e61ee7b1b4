"""Signing benchmark: what Ed25519 signed frames cost per message.

Per typical message (bench/codec.py's samples, as the hub or a device sends
them): frame size, encode vs encode+sign, decode vs verify+decode (the
receiving side's whole check: shape, key lookup, signature, then the strict
decode), in microseconds per message. Then the hub's ingestion of a batch
of 500 signed results through the real Ingester on a SQLite file, and how
much of it the signature checks are.

End-to-end impact on dispatch (a real broker, hub and agent processes) is
measured with bench/dispatch.py on this tree and on one without signing.

Usage: python bench/signing.py
"""

from __future__ import annotations

import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.envelope import Envelope, decode, encode
from shared.frames import AGENT_TO_HUB, HUB_TO_AGENT, open_frame, sign_envelope
from shared.hlc import HLC
from shared.signing import SigningKey

from bench.codec import SAMPLES  # same messages as the codec benchmark

STAMP = HLC(1_767_225_600_000, 3, "agent-0042")


def per_call_us(fn: object, number: int = 5_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6  # type: ignore[arg-type]


def micro() -> None:
    key = SigningKey.generate()
    lookup = {key.kid: key.public}.get
    print(f"{'message':<14} {'bytes':>6} {'+sig B':>6} {'encode':>7} {'enc+sign':>9} {'decode':>7} {'verify+dec':>11}   (us per message)")
    for name, body in SAMPLES.items():
        purpose = HUB_TO_AGENT if name == "assign" else AGENT_TO_HUB
        extra = {"recipient": "agent-0042", "seq": 1234, "issued_at": 1_767_225_600.0, "expires_at": 1_767_830_400.0} if name == "assign" else {"issued_at": 1_767_225_600.0}
        env = Envelope(body, sender="hub" if name == "assign" else "agent-0042", hlc=STAMP, id="0" * 32, **extra)  # type: ignore[arg-type]
        data = encode(env)
        frame = sign_envelope(env, key, purpose)
        print(
            f"{name:<14} {len(data):>6} {len(frame) - len(data):>6} {per_call_us(lambda: encode(env)):>7.1f} "
            f"{per_call_us(lambda: sign_envelope(env, key, purpose)):>9.1f} {per_call_us(lambda: decode(data)):>7.1f} "
            f"{per_call_us(lambda: open_frame(frame, purpose, lookup)):>11.1f}"
        )
    raw = b"x" * 300
    sig = key.sign("p", raw)
    print(f"raw Ed25519 over 300 bytes: sign {per_call_us(lambda: key.sign('p', raw)):.1f} us, verify {per_call_us(lambda: key.public.verify('p', raw, sig)):.1f} us")


def ingest(batch: int = 500) -> None:
    """The hub applying ``batch`` signed results in one Ingester.process call."""
    from hub.db import make_engine, make_sessionmaker, transaction, upgrade
    from hub.events import EventBus
    from hub.hubkeys import LiveRing
    from hub.identity import register_agent
    from hub.ingest import Ingester
    from shared.clock import SystemClock, utcnow
    from shared.frames import verify_frame
    from shared.hlc import HybridClock
    from shared.messages import Heartbeat
    from shared.mqtt import Inbound
    from shared.topics import events_topic

    class Link:
        def publish(self, *args: object, **kwargs: object) -> None:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'hub.db'}"
        upgrade(url)
        engine = make_engine(url, sqlite_synchronous="NORMAL")
        sessions = make_sessionmaker(engine)
        clock = SystemClock()
        key = SigningKey.generate()
        with transaction(sessions) as session:
            register_agent(session, "agent-0042", key.public, utcnow(clock))
        hlc = HybridClock("hub", lambda: int(clock.now() * 1000))
        ingester = Ingester(sessions, Link(), clock, hlc, EventBus(), keyring=LiveRing(Path(tmp) / "keys"))  # type: ignore[arg-type]
        device = HybridClock("agent-0042", lambda: int(clock.now() * 1000))
        # Heartbeats: applied without touching task rows, so the time is the
        # pipeline's (decode, verify, one transaction), not the scheduler's.
        frames = [sign_envelope(Envelope(Heartbeat("0.1.0", i), "agent-0042", device.now()), key, AGENT_TO_HUB) for i in range(batch)]
        topic = events_topic("agent-0042")
        best = float("inf")
        for _ in range(5):
            msgs = [Inbound(topic, f, 1, False, i) for i, f in enumerate(frames)]
            start = time.perf_counter()
            ingester.process(msgs)
            best = min(best, time.perf_counter() - start)
        lookup = {key.kid: key.public}.get
        verify = min(timeit.repeat(lambda: [verify_frame(f, AGENT_TO_HUB, lookup) for f in frames], number=1, repeat=5))
        engine.dispose()
    print(f"ingest {batch} signed heartbeats: {best * 1000:.1f} ms per batch ({best / batch * 1e6:.0f} us per message); "
          f"signature checks {verify * 1000:.1f} ms of it ({verify / best:.0%})")


if __name__ == "__main__":
    micro()
    ingest()
