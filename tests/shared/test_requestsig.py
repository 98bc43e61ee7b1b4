"""The agent request signature: what it covers and how a header is parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.requestsig import PURPOSE, canonical, parse_header, sign_request
from shared.signing import SignatureError, SigningKey

KEY = SigningKey.generate()


def test_a_signature_covers_method_path_time_nonce_and_body() -> None:
    header = sign_request(KEY, "pump-7", "POST", "/api/v1/agents/pump-7/sync", b"{}", 1_767_225_600.5)
    agent, ts, nonce, sig = parse_header(header)
    assert (agent, ts) == ("pump-7", 1_767_225_600)
    KEY.public.verify(PURPOSE, canonical("POST", "/api/v1/agents/pump-7/sync", ts, nonce, b"{}"), sig)
    for changed in (("GET", "/api/v1/agents/pump-7/sync", ts, nonce, b"{}"), ("POST", "/api/v1/agents/pump-8/sync", ts, nonce, b"{}"),
                    ("POST", "/api/v1/agents/pump-7/sync", ts + 1, nonce, b"{}"), ("POST", "/api/v1/agents/pump-7/sync", ts, "0" * 16, b"{}"),
                    ("POST", "/api/v1/agents/pump-7/sync", ts, nonce, b"{ }")):
        with pytest.raises(SignatureError):
            KEY.public.verify(PURPOSE, canonical(*changed), sig)


def test_two_identical_requests_get_different_signatures() -> None:
    first = sign_request(KEY, "a", "GET", "/p", b"", 100.0)
    assert first != sign_request(KEY, "a", "GET", "/p", b"", 100.0)


@given(st.text(max_size=300))
def test_any_header_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        parse_header(text)
    except SignatureError as exc:
        assert exc.code == "malformed_signature"


@pytest.mark.parametrize("header", [
    "agent=a,ts=\u00b2,nonce=00000000,sig=AA",  # a Unicode digit int() refuses
    "agent=a,ts=1,nonce=XYZXYZXYZ,sig=AA",
    "agent=a,ts=1,nonce=00000000,sig=not base64!",
    "agent=a,ts=1,sig=AA",
    "agent=a,ts=1,nonce=00000000,sig=AA,extra=1",
])
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_header(header)
    assert info.value.code == "malformed_signature"
