"""Event ingestion into event-time slot buffers in Redis (see `slots` for the arithmetic)."""

from app.ingestion.clock import (
    advance_wall_clock,
    closed_slot_ids,
    pending_slots,
    read_clock,
    slot_stats,
)
from app.ingestion.slots import (
    buffer_slot,
    is_closed,
    last_closed_slot,
    slot_end_s,
    slot_of,
    slot_start_s,
    watermark_s,
)

__all__ = [
    "advance_wall_clock",
    "buffer_slot",
    "closed_slot_ids",
    "is_closed",
    "last_closed_slot",
    "pending_slots",
    "read_clock",
    "slot_end_s",
    "slot_of",
    "slot_start_s",
    "slot_stats",
    "watermark_s",
]
