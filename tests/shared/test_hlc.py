"""Hybrid logical clock: monotonic whatever the wall clock does, past every
received stamp, one total order, and a wire form whose string order is the
stamp order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.hlc import HLC, HybridClock


class Wall:
    """A physical clock in milliseconds that the test sets by hand."""

    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_stamps_follow_the_wall_clock_when_it_moves_forward() -> None:
    wall = Wall(5_000)
    clock = HybridClock("n1", wall)
    assert clock.now() == HLC(5_000, 0, "n1")
    wall.ms = 6_000
    assert clock.now() == HLC(6_000, 0, "n1")


def test_stamps_never_go_backwards_when_the_wall_clock_does() -> None:
    wall = Wall(10_000)
    clock = HybridClock("n1", wall)
    first = clock.now()
    wall.ms = 2_000  # NTP stepped the clock back eight seconds
    second, third = clock.now(), clock.now()
    assert first < second < third
    assert second == HLC(10_000, 1, "n1") and third == HLC(10_000, 2, "n1")


def test_update_moves_past_a_received_stamp_from_a_clock_ahead() -> None:
    clock = HybridClock("device", Wall(1_000))
    received = HLC(9_000, 7, "hub")
    merged = clock.update(received)
    assert merged > received and merged == HLC(9_000, 8, "device")
    assert clock.now() > merged


def test_update_keeps_local_time_when_the_received_stamp_is_behind() -> None:
    clock = HybridClock("device", Wall(50_000))
    merged = clock.update(HLC(1_000, 99, "hub"))
    assert merged == HLC(50_000, 0, "device")


def test_update_with_equal_walls_takes_the_larger_counter() -> None:
    wall = Wall(1_000)
    clock = HybridClock("a", wall)
    for _ in range(3):
        clock.now()  # (1000, 2)
    assert clock.update(HLC(1_000, 9, "b")) == HLC(1_000, 10, "a")
    assert clock.update(HLC(1_000, 1, "b")) == HLC(1_000, 11, "a")


def test_counter_overflow_borrows_a_millisecond_and_stays_ordered() -> None:
    clock = HybridClock("n", Wall(1_000))
    last = clock.now()
    for _ in range(100_001):
        stamp = clock.now()
        assert stamp > last
        last = stamp
    assert last.wall_ms == 1_001 and HLC.parse(str(last)) == last
    assert clock.update(HLC(1_001, 99_999, "x")) == HLC(1_002, 0, "n")


def test_stamps_of_one_message_exchange_are_causally_ordered() -> None:
    hub_wall, device_wall = Wall(100_000), Wall(40_000)  # the device is a minute behind
    hub, device = HybridClock("hub", hub_wall), HybridClock("dev", device_wall)
    sent = hub.now()
    received = device.update(sent)
    reply = device.now()
    back = hub.update(reply)
    assert sent < received < reply < back


@pytest.mark.parametrize(
    "text",
    ["", "123", "0000000000001.00000", "0000000000001.00000@", "x.00000@n", "0000000000001.x@n", "-000000000001.00000@n", "0000000000001.100000@n", "0000000000001@n"],
)
def test_malformed_stamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HLC stamp"):
        HLC.parse(text)


def test_wire_form_is_fixed_width() -> None:
    assert str(HLC(1_732_550_000_000, 5, "agent-1")) == "1732550000000.00005@agent-1"
    assert str(HLC(0, 0, "n")) == "0000000000000.00000@n"


# --- properties ----------------------------------------------------------------

nodes = st.text(min_size=1, max_size=12)
stamps = st.builds(HLC, st.integers(0, 10**13 - 1), st.integers(0, 99_999), nodes)


@given(stamps)
def test_parse_of_str_is_identity(stamp: HLC) -> None:
    assert HLC.parse(str(stamp)) == stamp


@given(stamps, stamps)
def test_string_order_equals_stamp_order(a: HLC, b: HLC) -> None:
    assert (str(a) < str(b)) == (a < b)
    assert (str(a) == str(b)) == (a == b)


@given(st.lists(stamps, min_size=1, max_size=30))
def test_stamps_are_totally_ordered(values: list[HLC]) -> None:
    ordered = sorted(values)
    assert sorted(ordered, key=str) == ordered
    for a in values:
        for b in values:
            assert (a < b) + (a == b) + (a > b) == 1


events = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 10**12)),  # the wall clock jumps anywhere, backwards too
        st.tuples(st.just("now"), st.just(0)),
        st.tuples(st.just("recv"), stamps),
    ),
    max_size=60,
)


@given(events)
def test_every_stamp_exceeds_the_previous_and_every_received_one(script: list[tuple[str, object]]) -> None:
    wall = Wall(0)
    clock = HybridClock("me", wall)
    last = clock.last
    for kind, value in script:
        if kind == "tick":
            assert isinstance(value, int)
            wall.ms = value
            continue
        if kind == "now":
            stamp = clock.now()
        else:
            assert isinstance(value, HLC)
            stamp = clock.update(value)
            assert stamp > value
        assert stamp > last and stamp.node == "me"
        assert HLC.parse(str(stamp)) == stamp
        last = stamp
