"""Signed frames and the key announcement chain: pure functions, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.verify import open_message
from shared.envelope import Envelope, decode
from shared.frames import AGENT_TO_HUB, HUB_TO_AGENT, open_frame, seal, sign_envelope, split, unsigned_part, verify_frame
from shared.hlc import HLC
from shared.keychain import make_add, make_retire, walk
from shared.messages import Assign, Result
from shared.signing import SignatureError, SigningKey

HUB = SigningKey.generate()
DEVICE = SigningKey.generate()
NOW = 1_767_225_600.0
STAMP = HLC(int(NOW * 1000), 0, "hub")


def assign_frame(**envelope: object) -> bytes:
    body = Assign("a-1", "d", "r", "t", 1, "command.run", {"argv": ["uptime"]})
    fields = {"recipient": "dev-1", "seq": 7, "issued_at": NOW, "expires_at": NOW + 3600, **envelope}
    return sign_envelope(Envelope(body, sender="hub", hlc=STAMP, id="m-1", **fields), HUB, HUB_TO_AGENT)  # type: ignore[arg-type]


FRAME = assign_frame()
TRUSTED = {HUB.kid: HUB.public}


def test_a_frame_is_the_compact_json_a_newline_and_kid_dot_signature() -> None:
    data, kid, signature = split(FRAME)
    assert b"\n" not in data and kid == HUB.kid and len(signature) == 64
    envelope = decode(data)
    assert (envelope.recipient, envelope.seq, envelope.issued_at, envelope.expires_at) == ("dev-1", 7, NOW, NOW + 3600)
    assert open_frame(FRAME, HUB_TO_AGENT, TRUSTED.get) == envelope
    assert unsigned_part(FRAME) == data


def test_newlines_inside_strings_stay_escaped() -> None:
    body = Result("a-1", 1, "success", output={"text": "two\nlines"})
    frame = sign_envelope(Envelope(body, sender="dev-1", hlc=STAMP), DEVICE, AGENT_TO_HUB)
    assert frame.count(b"\n") == 1
    assert open_frame(frame, AGENT_TO_HUB, {DEVICE.kid: DEVICE.public}.get).body == body


@pytest.mark.parametrize("frame, code", [
    (unsigned_part(FRAME), "bad_signature"),  # no signature line
    (unsigned_part(FRAME) + b"\nnot-a-signature", "bad_signature"),
    (unsigned_part(FRAME) + b"\n" + HUB.kid.encode() + b".!!!", "bad_signature"),
    (seal(unsigned_part(FRAME), DEVICE, HUB_TO_AGENT), "unknown_key"),
    (seal(unsigned_part(FRAME), HUB, AGENT_TO_HUB), "bad_signature"),  # the other direction's purpose
])
def test_refusals_carry_their_code(frame: bytes, code: str) -> None:
    with pytest.raises(SignatureError) as caught:
        verify_frame(frame, HUB_TO_AGENT, TRUSTED.get)
    assert caught.value.code == code


def test_the_agent_refuses_foreign_expired_and_unsigned_messages() -> None:
    assert isinstance(open_message(FRAME, TRUSTED, "dev-1", 262144, NOW), Envelope)
    assert open_message(FRAME, TRUSTED, "dev-2", 262144, NOW).code == "security.wrong_device"  # type: ignore[union-attr]
    assert open_message(assign_frame(recipient=None), TRUSTED, "dev-1", 262144, NOW).code == "security.wrong_device"  # type: ignore[union-attr]
    assert open_message(FRAME, TRUSTED, "dev-1", 262144, NOW + 3601).code == "security.expired"  # type: ignore[union-attr]
    assert open_message(unsigned_part(FRAME), TRUSTED, "dev-1", 262144, NOW).code == "security.bad_signature"  # type: ignore[union-attr]
    assert open_message(FRAME, {}, "dev-1", 262144, NOW).code == "security.unknown_key"  # type: ignore[union-attr]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_flipping_any_byte_of_a_signed_frame_gets_it_refused(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(FRAME) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != FRAME[position]), label="new byte")
    flipped = FRAME[:position] + bytes([value]) + FRAME[position + 1:]
    opened = open_message(flipped, TRUSTED, "dev-1", 262144, NOW)
    assert not isinstance(opened, Envelope), f"byte {position} set to {value} was accepted"
    assert opened.code.startswith("security.")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(FRAME) * 8 - 1))
def test_flipping_any_bit_of_a_signed_frame_gets_it_refused(bit: int) -> None:
    flipped = bytearray(FRAME)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not isinstance(open_message(bytes(flipped), TRUSTED, "dev-1", 262144, NOW), Envelope)


def test_every_single_bit_flip_is_refused_exhaustively() -> None:
    """Hypothesis samples; this walks them all (a frame is a few hundred bytes)."""
    for bit in range(len(FRAME) * 8):
        flipped = bytearray(FRAME)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not isinstance(open_message(bytes(flipped), TRUSTED, "dev-1", 262144, NOW), Envelope), bit


# --- the key chain ---------------------------------------------------------------


def test_a_device_offline_across_two_rotations_walks_the_chain() -> None:
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    chain = [make_add(b.public, a, NOW), make_add(c.public, b, NOW + 1), make_retire(a.kid, c, NOW + 2)]
    result = walk(chain, {a.kid: a.public})
    assert set(result.trusted) == {b.kid, c.kid} and result.added == [b.kid, c.kid] and result.dropped == [a.kid]
    # Links in any order: the walk goes round until nothing more applies.
    assert set(walk(list(reversed(chain)), {a.kid: a.public}).trusted) == {b.kid, c.kid}


def test_links_from_untrusted_or_forged_signers_change_nothing() -> None:
    a, b, mallory = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    assert walk([make_add(mallory.public, mallory, NOW)], {a.kid: a.public}).trusted == {a.kid: a.public}
    forged = make_add(mallory.public, a, NOW)
    tampered = type(forged)(forged.action, forged.kid, forged.signer, forged.at, forged.sig, b.public.to_text())
    result = walk([tampered], {a.kid: a.public})
    assert result.trusted == {a.kid: a.public} and result.problems
    # A retired key never comes back, even from a genuine old link replayed.
    assert walk([make_add(b.public, a, NOW)], {a.kid: a.public}, retired={b.kid}).trusted == {a.kid: a.public}
    with pytest.raises(ValueError):
        make_retire(a.kid, a, NOW)
