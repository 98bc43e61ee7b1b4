"""Ed25519 keys and signatures (shared/signing.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.signing import BadKey, PublicKey, SignatureError, SigningKey, decode_signature, encode_signature


def test_sign_and_verify_round_trip() -> None:
    key = SigningKey.generate()
    signature = key.sign("assign", b"payload")
    key.public.verify("assign", b"payload", signature)
    assert PublicKey.from_text(key.public.to_text()).kid == key.kid
    assert len(key.kid) == 16


def test_signature_is_bound_to_its_purpose_and_key() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    signature = key.sign("assign", b"payload")
    with pytest.raises(SignatureError) as exc:
        key.public.verify("http", b"payload", signature)
    assert exc.value.code == "bad_signature"
    with pytest.raises(SignatureError):
        other.public.verify("assign", b"payload", signature)
    with pytest.raises(SignatureError) as exc:
        key.public.verify("assign", b"payload", signature[:10])
    assert exc.value.code == "malformed_signature"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=200), position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_fails(data: bytes, position: int, bit: int) -> None:
    key = _KEY
    signature = key.sign("assign", data)
    i = position % len(data)
    tampered = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
    with pytest.raises(SignatureError):
        key.public.verify("assign", tampered, signature)
    j = position % len(signature)
    bad_sig = signature[:j] + bytes([signature[j] ^ (1 << bit)]) + signature[j + 1 :]
    with pytest.raises(SignatureError):
        key.public.verify("assign", data, bad_sig)


_KEY = SigningKey.generate()


def test_key_file_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "identity" / "device.key"
    key = SigningKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert SigningKey.load_or_create(path).kid == key.kid
    assert "PRIVATE" in path.read_text() and key.kid in repr(key) and "PRIVATE" not in repr(key)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    SigningKey.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(BadKey, match="chmod 600"):
        SigningKey.load(path)


@pytest.mark.parametrize(
    "text",
    ["", "ed25519:", "rsa:AAAA", "ed25519:!!!", "ed25519:" + "A" * 10, 42],
)
def test_bad_public_key_text_is_refused(text: object) -> None:
    with pytest.raises(BadKey):
        PublicKey.from_text(text)  # type: ignore[arg-type]


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(BadKey, match="not a PEM"):
        SigningKey.load(path)


def test_signature_text_round_trip() -> None:
    signature = SigningKey.generate().sign("x", b"y")
    assert decode_signature(encode_signature(signature)) == signature
    with pytest.raises(SignatureError):
        decode_signature("***")
