"""Event-time slot arithmetic: tumbling windows of `slot_seconds`, closed by a watermark.

A slot `k` covers the half-open interval `[k * slot_seconds, (k + 1) * slot_seconds)` of unix
seconds, so timestamps before 1970 land in negative slots and a timestamp on a boundary belongs
to the slot that starts there. The watermark is the newest event time seen (in `clock="wall"`
also the server clock) minus the allowed lateness; a slot is closed once the watermark has reached
its end. An event whose own slot is closed is late: it goes into the buffer of the oldest open
slot, the one that holds the watermark, and is flagged late.

The Lua write path in `app.ingestion.writer` repeats `is_closed` and `buffer_slot` inside Redis
with the same floating-point operations; the tests hold the two to the same answers.
"""

import math
from typing import Literal

Clock = Literal["wall", "event"]


def slot_of(ts_s: float, slot_seconds: int) -> int:
    """The slot holding the unix time `ts_s`: `floor(ts_s / slot_seconds)`, computed exactly.

    The float division can round a timestamp a hair below a boundary up onto it, so the quotient
    is checked against the slot's bounds and moved by one when it is off.
    """
    slot_id = math.floor(ts_s / slot_seconds)
    if slot_id * slot_seconds > ts_s:
        return slot_id - 1
    if (slot_id + 1) * slot_seconds <= ts_s:
        return slot_id + 1
    return slot_id


def slot_start_s(slot_id: int, slot_seconds: int) -> float:
    return float(slot_id * slot_seconds)


def slot_end_s(slot_id: int, slot_seconds: int) -> float:
    """The first instant after the slot; the slot closes when the watermark reaches it."""
    return float((slot_id + 1) * slot_seconds)


def watermark_s(
    max_event_ts: float | None, now_s: float | None, clock: Clock, lateness_s: float
) -> float | None:
    """The watermark implied by the newest event time and, in `clock="wall"`, the server clock.

    Returns None when nothing has advanced it yet (no event, and no clock in `clock="event"`).
    The stored watermark never moves back: callers take the max with the previous one.
    """
    candidates = [] if max_event_ts is None else [max_event_ts]
    if clock == "wall" and now_s is not None:
        candidates.append(now_s)
    if not candidates:
        return None
    return max(candidates) - lateness_s


def is_closed(slot_id: int, watermark: float | None, slot_seconds: int) -> bool:
    if watermark is None:
        return False
    return watermark >= slot_end_s(slot_id, slot_seconds)


def buffer_slot(event_slot: int, watermark: float | None, slot_seconds: int) -> tuple[int, bool]:
    """The slot whose buffer receives an event of `event_slot`, and whether the event is late.

    An event of an open slot goes into its own slot. An event of a closed slot is late and goes
    into the oldest open slot, `slot_of(watermark)`, which is open by construction.
    """
    if not is_closed(event_slot, watermark, slot_seconds):
        return event_slot, False
    assert watermark is not None
    return slot_of(watermark, slot_seconds), True


def last_closed_slot(watermark: float | None, slot_seconds: int) -> int | None:
    """The newest closed slot under `watermark`, or None when no slot can be closed yet."""
    if watermark is None or not math.isfinite(watermark):
        return None
    return slot_of(watermark, slot_seconds) - 1
