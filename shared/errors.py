"""The root of every Outpost error, and the protocol errors both sides raise.

Every error has a stable machine ``code`` (logged, counted, stored in
rejection records) and a message that names the thing, the value and what to
do about it.
"""

from __future__ import annotations


class OutpostError(Exception):
    """Base of all Outpost errors. ``code`` is stable across releases."""

    code = "outpost_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip().splitlines()[0])

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(OutpostError):
    """A message on the wire could not be accepted."""

    code = "protocol_error"


class DecodeError(ProtocolError):
    """The bytes are not a valid Outpost envelope."""

    code = "decode_error"

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        #: The first bytes of what arrived, kept for the rejection record.
        self.raw = raw[:512]


class PayloadTooLarge(ProtocolError):
    """The envelope is larger than the configured limit."""

    code = "payload_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"envelope is {size} bytes, over the {limit}-byte limit; send large data by reference")
        self.size = size
        self.limit = limit


class UnsupportedVersion(ProtocolError):
    """The envelope's protocol version is not one this build speaks."""

    code = "unsupported_version"


class UnknownMessageType(ProtocolError):
    """The envelope names a message type this build does not know."""

    code = "unknown_type"


class InvalidMessage(ProtocolError):
    """The envelope decoded, but its body does not match its type."""

    code = "invalid_message"


class ClockSkew(ProtocolError):
    """A peer's clock stamp is further ahead of ours than the allowed skew."""

    code = "clock_skew"


class UnknownJobType(OutpostError):
    """An assignment names a job type that is not installed on this agent."""

    code = "unknown_job_type"


class InvalidParams(OutpostError):
    """Job parameters do not match the job type's parameter schema."""

    code = "invalid_params"
