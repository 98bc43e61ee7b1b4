"""Outpost protocol: the code the hub and every agent speak.

Modules: ``errors`` (the OutpostError tree), ``clock`` (the only wall-clock
reader), ``hlc`` (hybrid logical clock), ``messages`` (typed message bodies),
``envelope`` (the versioned wire codec), ``topics`` (MQTT topic layout),
``states`` (task-instance states), ``files`` (atomic writes) and ``mqtt``
(the one paho wrapper). Importing this package imports no network library.
"""

from shared.clock import Clock, ManualClock, SystemClock
from shared.envelope import MAX_ENVELOPE_BYTES, PROTOCOL_VERSION, Envelope, decode, encode
from shared.errors import (
    DecodeError,
    OutpostError,
    PayloadTooLarge,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)
from shared.hlc import HLC, HybridClock
from shared.messages import (
    Accepted,
    Ack,
    Assign,
    Cancel,
    Heartbeat,
    JobTypeInfo,
    Result,
    Started,
    Status,
)
from shared.states import TaskState

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "PROTOCOL_VERSION",
    "HLC",
    "Accepted",
    "Ack",
    "Assign",
    "Cancel",
    "Clock",
    "DecodeError",
    "Envelope",
    "Heartbeat",
    "HybridClock",
    "JobTypeInfo",
    "ManualClock",
    "OutpostError",
    "PayloadTooLarge",
    "ProtocolError",
    "Result",
    "Started",
    "Status",
    "SystemClock",
    "TaskState",
    "UnknownMessageType",
    "UnsupportedVersion",
    "decode",
    "encode",
]
