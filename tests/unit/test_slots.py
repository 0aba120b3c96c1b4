"""Slot arithmetic, the watermark in both clocks, and late routing."""

import math

import pytest

from app.ingestion.slots import (
    buffer_slot,
    is_closed,
    last_closed_slot,
    slot_end_s,
    slot_of,
    slot_start_s,
    watermark_s,
)

HOUR_S = 3600


@pytest.mark.parametrize(
    ("ts_s", "expected"),
    [
        (0.0, 0),
        (3599.999, 0),
        (3600.0, 1),  # a boundary belongs to the slot that starts there
        (7199.0, 1),
        (-0.001, -1),  # before 1970: floor, not truncation
        (-3600.0, -1),
        (-3600.001, -2),
        (1_700_000_000.5, 472_222),
    ],
)
def test_slot_of_floors_on_both_sides_of_zero(ts_s: float, expected: int) -> None:
    assert slot_of(ts_s, HOUR_S) == expected


def test_slot_bounds_cover_the_slot_half_open() -> None:
    for slot_id in (-2, -1, 0, 1, 472_222):
        start_s, end_s = slot_start_s(slot_id, HOUR_S), slot_end_s(slot_id, HOUR_S)
        assert end_s - start_s == HOUR_S
        assert slot_of(start_s, HOUR_S) == slot_id
        assert slot_of(math.nextafter(end_s, -math.inf), HOUR_S) == slot_id
        assert slot_of(end_s, HOUR_S) == slot_id + 1


def test_slot_of_is_exact_a_hair_below_a_boundary() -> None:
    for boundary_s in (0.0, 3600.0 * 472_223, -3600.0 * 5):
        below_s = math.nextafter(boundary_s, -math.inf)
        assert slot_of(below_s, HOUR_S) == slot_of(boundary_s, HOUR_S) - 1


def test_slot_of_with_one_second_slots() -> None:
    assert slot_of(12.9, 1) == 12
    assert slot_of(-0.5, 1) == -1


def test_watermark_in_event_clock_follows_only_event_time() -> None:
    assert watermark_s(None, 1_000.0, "event", 60.0) is None
    assert watermark_s(500.0, 1_000.0, "event", 60.0) == 440.0


def test_watermark_in_wall_clock_takes_the_later_of_event_and_server_time() -> None:
    assert watermark_s(None, 1_000.0, "wall", 60.0) == 940.0
    assert watermark_s(500.0, 1_000.0, "wall", 60.0) == 940.0
    assert watermark_s(2_000.0, 1_000.0, "wall", 60.0) == 1_940.0
    assert watermark_s(None, None, "wall", 60.0) is None


def test_a_slot_closes_when_the_watermark_reaches_its_end() -> None:
    assert not is_closed(0, None, HOUR_S)
    assert not is_closed(0, 3599.9, HOUR_S)
    assert is_closed(0, 3600.0, HOUR_S)
    assert is_closed(-1, 0.0, HOUR_S)
    assert not is_closed(1, 3600.0, HOUR_S)


def test_an_event_of_an_open_slot_stays_in_its_slot() -> None:
    assert buffer_slot(5, None, HOUR_S) == (5, False)
    assert buffer_slot(5, 5 * HOUR_S + 10.0, HOUR_S) == (5, False)
    assert buffer_slot(9, 5 * HOUR_S + 10.0, HOUR_S) == (9, False)  # future slots are open


def test_a_late_event_goes_to_the_oldest_open_slot() -> None:
    watermark = 5 * HOUR_S + 10.0
    assert buffer_slot(4, watermark, HOUR_S) == (5, True)
    assert buffer_slot(-3, watermark, HOUR_S) == (5, True)
    # exactly on the boundary: slot 4 has just closed, slot 5 holds the watermark
    assert buffer_slot(4, 5.0 * HOUR_S, HOUR_S) == (5, True)


def test_the_buffer_slot_of_a_late_event_is_always_open() -> None:
    for watermark in (0.0, 3599.999, 3600.0, -7200.5, 1_700_000_000.25):
        slot_id, late = buffer_slot(slot_of(watermark, HOUR_S) - 1, watermark, HOUR_S)
        assert late
        assert not is_closed(slot_id, watermark, HOUR_S)


def test_last_closed_slot() -> None:
    assert last_closed_slot(None, HOUR_S) is None
    assert last_closed_slot(-math.inf, HOUR_S) is None
    assert last_closed_slot(3599.0, HOUR_S) == -1
    assert last_closed_slot(3600.0, HOUR_S) == 0
