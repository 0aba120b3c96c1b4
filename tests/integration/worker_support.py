"""Helpers for the worker and slot tests: a slot range of the test's own, and SQL read-backs.

The PostgreSQL database is shared by the whole test session, so each test puts its events in
slots no other test uses (ids from 1e8 up; the storage tests stay below 1e6) and reads back only
those slots.
"""

import random
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from app.storage.tables import interactions, slots, users


@dataclass(frozen=True)
class SlotRange:
    """`count` consecutive slots of `slot_seconds`, starting at `first`."""

    first: int
    count: int
    slot_seconds: int

    @classmethod
    def fresh(cls, count: int, slot_seconds: int) -> "SlotRange":
        return cls(100_000_000 + random.randrange(10**6) * 1_000, count, slot_seconds)

    @property
    def ids(self) -> list[int]:
        return list(range(self.first, self.first + self.count))

    def ts(self, slot_offset: int, within_s: float = 0.0) -> float:
        """A timestamp `within_s` seconds into the slot `slot_offset` after the first."""
        return float((self.first + slot_offset) * self.slot_seconds) + within_s

    def all_in(self, state: str) -> dict[int, str]:
        """What `slot_states` reads when every slot of the range is in `state`."""
        return dict.fromkeys(self.ids, state)

    @property
    def after_end_ts(self) -> float:
        return float((self.first + self.count) * self.slot_seconds)


def interaction_rows(engine: sa.Engine, slot_range: SlotRange) -> list[Any]:
    query = sa.select(interactions).where(interactions.c.slot_id.in_(slot_range.ids))
    with engine.connect() as conn:
        return list(conn.execute(query))


def count_in_slots(engine: sa.Engine, slot_range: SlotRange) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(interactions)
        .where(interactions.c.slot_id.in_(slot_range.ids))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def slot_states(engine: sa.Engine, slot_range: SlotRange) -> dict[int, str]:
    query = sa.select(slots.c.slot_id, slots.c.state).where(slots.c.slot_id.in_(slot_range.ids))
    with engine.connect() as conn:
        return {int(slot_id): state for slot_id, state in conn.execute(query)}


def user_event_counts(engine: sa.Engine, user_prefix: str) -> dict[str, int]:
    query = sa.select(users.c.user_id, users.c.events).where(
        users.c.user_id.startswith(user_prefix)
    )
    with engine.connect() as conn:
        return {user_id: int(events) for user_id, events in conn.execute(query)}
