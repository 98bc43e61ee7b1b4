"""The envelope codec: round trips, limits, and refusing bad input with
``ProtocolError`` subclasses only."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.envelope import MAX_ENVELOPE_BYTES, PROTOCOL_VERSION, Envelope, decode, encode
from shared.errors import DecodeError, InvalidMessage, PayloadTooLarge, ProtocolError, UnknownMessageType, UnsupportedVersion
from shared.hlc import HLC
from shared.messages import (
    MESSAGE_TYPES,
    Accepted,
    Ack,
    AgentEvent,
    Assign,
    Cancel,
    Heartbeat,
    JobError,
    JobTypeInfo,
    KeyAnnouncement,
    KeyLink,
    LogChunk,
    Message,
    Progress,
    Rejected,
    Result,
    Started,
    Status,
)

STAMP = HLC(1_767_225_600_000, 3, "hub-1")

EXAMPLES: list[Message] = [
    Assign("as-1", "dag", "run-1", "task", 2, "command.run", {"argv": ["uptime"], "nested": {"x": [1, 2.5, None]}}, 4, 1.5, 2.5, 30.0),
    Assign("as-2", "dag", "run-1", "task", 1, "noop"),
    Cancel("as-1", "operator asked"),
    Ack(("as-1", "as-2")),
    KeyAnnouncement("0123456789abcdef", (KeyLink("add", "fedcba9876543210", "0123456789abcdef", 1_767_225_600.0, "c2ln", "ed25519:AAAA"),
                                         KeyLink("retire", "0123456789abcdef", "fedcba9876543210", 1_767_225_601.0, "c2ln"))),
    Accepted("as-1", duplicate=True),
    Started("as-1", 1_767_225_601.25),
    Result("as-1", 2, "success", {"exit_code": 0, "stdout": "ok\n"}, None, 1.0, 2.0),
    Result("as-1", 3, "failed", None, JobError("command_failed", "exited 3", retryable=False)),
    Rejected("decode_error", "not JSON", message_id="m-1", assignment_id=None),
    Heartbeat("0.1.0", 3, 4, ("as-1",), False, {"rejected.decode_error": 2}),
    Status("online", "0.1.0", "gw-1", {"site": "a"}, (JobTypeInfo("noop", "1.0"), JobTypeInfo("command.run", "1.0"))),
    Status("offline"),
    AgentEvent("ev-1", "battery_low", {"level": 0.08, "cells": [3.1, 3.0]}, 1_767_225_602.5),
    Ack(("as-3",), event_ids=("ev-1",)),
    Ack((), log_ids=("as-3/0", "as-3/1")),
    Progress("as-1", 0.5, "flashing", 1_767_225_603.0),
    LogChunk("as-1", 0, "line one\nline two\n", final=True),
]


def envelope(body: Message, **fields: Any) -> Envelope:
    return Envelope(body=body, sender="agent-1", hlc=STAMP, **fields)


def document(**changes: Any) -> dict[str, Any]:
    """A valid encoded envelope as a dict, with ``changes`` applied
    (a value of ``...`` deletes the key)."""
    doc = json.loads(encode(envelope(Started("as-1", 5.0))))
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_signing_fields_round_trip_and_are_type_checked() -> None:
    original = Envelope(Cancel("as-1"), sender="hub", hlc=STAMP, recipient="dev-1", seq=42, issued_at=1_767_225_600.5, expires_at=1_767_229_200.0)
    data = encode(original)
    assert decode(data) == original and b'"to":"dev-1"' in data and b'"seq":42' in data
    doc = json.loads(data)
    for field, bad in (("to", ""), ("to", 5), ("seq", -1), ("seq", 1.5), ("seq", True), ("iat", "now"), ("iat", True)):
        with pytest.raises(InvalidMessage):
            decode(json.dumps({**doc, field: bad}).encode())
    # Unsigned layouts are unchanged: the keys appear only when set.
    assert b'"to"' not in encode(Envelope(Cancel("as-1"), sender="hub", hlc=STAMP))


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("body", EXAMPLES, ids=lambda m: f"{m.TYPE}")
def test_every_message_type_round_trips(body: Message) -> None:
    original = envelope(body, expires_at=1_767_229_200.0)
    data = encode(original)
    assert decode(data) == original
    assert json.loads(data)["type"] == body.TYPE
    assert encode(decode(data)) == data


def test_encoding_is_compact_readable_json() -> None:
    data = encode(envelope(Accepted("as-1")))
    assert b" " not in data and data.startswith(b'{"v":1,"type":"accepted"')


def test_size_limit_is_checked_before_parsing() -> None:
    # Not even JSON: a parse would raise DecodeError, the limit says too large.
    with pytest.raises(PayloadTooLarge) as info:
        decode(b"{" * (MAX_ENVELOPE_BYTES + 1))
    assert (info.value.size, info.value.limit) == (MAX_ENVELOPE_BYTES + 1, MAX_ENVELOPE_BYTES)
    data = encode(envelope(Accepted("as-1")))
    with pytest.raises(PayloadTooLarge):
        decode(data, limit=len(data) - 1)
    assert decode(data, limit=len(data)).body == Accepted("as-1")


def test_encode_refuses_oversized_envelopes() -> None:
    big = Result("as-1", 1, "success", "x" * MAX_ENVELOPE_BYTES)
    with pytest.raises(PayloadTooLarge, match="send large data by reference"):
        encode(envelope(big))


@pytest.mark.parametrize("data", [b"", b"not json", b"\xff\xfe\x00garbage", b'{"v": 1,', b"[" * 100_000])
def test_non_json_is_a_decode_error_keeping_the_raw_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.raw == data[:512] and info.value.code == "decode_error"


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_non_object_json_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="must be a JSON object"):
        decode(data)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused(text: str) -> None:
    # Python's json accepts them (1e400 parses as infinity); a NaN or
    # infinite deadline would never pass, and re-encoding would fail.
    data = encode(envelope(Started("as-1", 5.0))).replace(b'"exp":null', b'"exp":' + text.encode())
    with pytest.raises(DecodeError):
        decode(data)


def test_huge_integers_are_a_decode_error() -> None:
    # Python refuses to parse integers over 4300 digits with a plain ValueError.
    data = encode(envelope(Started("as-1", 5.0))).replace(b'"started_at":5.0', b'"started_at":' + b"9" * 5000)
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("version", [0, 2, None, "1", True, 1.0, ...])
def test_other_protocol_versions_are_refused(version: Any) -> None:
    with pytest.raises(UnsupportedVersion, match="not supported"):
        decode(raw(document(v=version)))


@pytest.mark.parametrize("kind", ["bogus", None, 7, ...])
def test_unknown_message_types_are_refused_listing_the_known_ones(kind: Any) -> None:
    with pytest.raises(UnknownMessageType) as info:
        decode(raw(document(type=kind)))
    assert "assign" in str(info.value) and info.value.code == "unknown_type"


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"id": ...}, "'id'"),
        ({"id": ""}, "'id'"),
        ({"from": 3}, "'from'"),
        ({"hlc": ...}, "'hlc'"),
        ({"hlc": "yesterday"}, "not an HLC stamp"),
        ({"hlc": "0000000000001.100000@x"}, "not an HLC stamp"),
        ({"exp": "soon"}, "'exp'"),
        ({"exp": True}, "'exp'"),
        ({"body": ...}, "body must be a JSON object"),
        ({"body": [1]}, "body must be a JSON object"),
        ({"body": {}}, "lacks required field 'assignment_id'"),
        ({"body": {"assignment_id": "a"}}, "lacks required field 'started_at'"),
        ({"body": {"assignment_id": 1, "started_at": 5.0}}, "started.assignment_id"),
        ({"body": {"assignment_id": "a", "started_at": "5"}}, "started.started_at"),
        ({"body": {"assignment_id": "a", "started_at": False}}, "started.started_at"),
    ],
)
def test_missing_or_mistyped_fields_are_invalid_messages(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InvalidMessage, match=complaint.replace("(", r"\(")):
        decode(raw(document(**changes)))


@pytest.mark.parametrize(
    ("kind", "body", "complaint"),
    [
        ("assign", {"assignment_id": "a", "dag_id": "d", "run_id": "r", "task_id": "t", "try_number": True, "job_type": "j"}, "try_number"),
        ("assign", {"assignment_id": "a", "dag_id": "d", "run_id": "r", "task_id": "t", "try_number": 1, "job_type": "j", "params": []}, "params"),
        ("ack", {"assignment_ids": "as-1"}, "assignment_ids"),
        ("ack", {"assignment_ids": ["as-1", 2]}, "assignment_ids"),
        ("result", {"assignment_id": "a", "try_number": 1, "status": "maybe"}, "status"),
        ("result", {"assignment_id": "a", "try_number": 1, "status": "failed", "error": {"code": "x"}}, "error"),
        ("heartbeat", {"agent_version": "1", "counters": {"x": 1.5}}, "counters"),
        ("status", {"state": "online", "job_types": [{"name": "noop"}]}, "job_type body lacks required field 'version'"),
    ],
)
def test_nested_and_typed_body_fields_are_checked(kind: str, body: dict[str, Any], complaint: str) -> None:
    with pytest.raises(InvalidMessage, match=complaint):
        decode(raw(document(type=kind, body=body)))


def test_unknown_extra_fields_are_ignored() -> None:
    doc = document(future_field={"a": 1})
    doc["body"]["added_in_v1_1"] = [1, 2]
    decoded = decode(raw(doc))
    assert decoded.body == Started("as-1", 5.0)
    assert decoded.id == doc["id"] and decoded.sender == "agent-1"


def test_integer_floats_decode_as_floats() -> None:
    decoded = decode(raw(document(exp=100, body={"assignment_id": "a", "started_at": 7})))
    assert decoded.expires_at == 100.0 and isinstance(decoded.body, Started) and decoded.body.started_at == 7.0


# --- properties ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ids = st.text(min_size=1, max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
stamps = st.builds(HLC, st.integers(0, 10**13 - 1), st.integers(0, 99_999), st.text(min_size=1, max_size=20))


@given(st.binary(max_size=2048))
def test_decode_of_arbitrary_bytes_raises_only_protocol_errors(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


envelope_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 2]) | json_values,
        "type": st.sampled_from(sorted(MESSAGE_TYPES)) | json_values,
        "id": ids | json_values,
        "from": ids | json_values,
        "hlc": stamps.map(str) | json_values,
        "exp": st.none() | finite | json_values,
        "body": st.dictionaries(
            st.sampled_from(["assignment_id", "try_number", "status", "params", "error", "job_types", "counters", "state", "assignment_ids", "agent_version", "started_at"]),
            json_values,
        )
        | json_values,
    }
)


@given(envelope_like)
@settings(max_examples=300)
def test_decode_of_envelope_shaped_json_raises_only_protocol_errors(doc: dict[str, Any]) -> None:
    try:
        decoded = decode(json.dumps(doc).encode())
    except ProtocolError:
        return
    assert encode(decoded)  # whatever decodes, encodes again


assigns = st.builds(
    Assign,
    assignment_id=ids,
    dag_id=ids,
    run_id=ids,
    task_id=ids,
    try_number=st.integers(1, 100),
    job_type=ids,
    params=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    map_index=st.integers(-1, 10_000),
    not_before=st.none() | finite,
    deadline=st.none() | finite,
    timeout=st.none() | finite,
)
results = st.builds(
    Result,
    assignment_id=ids,
    try_number=st.integers(1, 100),
    status=st.sampled_from(["success", "failed"]),
    output=json_values,
    error=st.none() | st.builds(JobError, code=ids, message=st.text(max_size=200), retryable=st.booleans()),
    started_at=st.none() | finite,
    finished_at=st.none() | finite,
)


@given(body=assigns | results, sender=ids, stamp=stamps, expires=st.none() | finite)
def test_encode_then_decode_is_identity(body: Message, sender: str, stamp: HLC, expires: float | None) -> None:
    original = Envelope(body=body, sender=sender, hlc=stamp, expires_at=expires)
    decoded = decode(encode(original))
    assert decoded == original
    assert not any(isinstance(v, float) and math.isnan(v) for v in (decoded.expires_at,))
