"""Moving one closed slot's buffer from its Redis stream into the SQL `interactions` table.

Archiving is idempotent: events are inserted with ON CONFLICT (event_id) DO NOTHING, and the
buffer is dropped only after the slot is marked archived in SQL. A crash at any point leaves
either the buffer in Redis (the next run archives it again and inserts nothing twice) or the
slot archived in SQL with its buffer gone.
"""

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
import sqlalchemy as sa

from app.ingestion.lua import LuaScript
from app.keys import RedisKeys
from app.storage import repo

# Drop the stream and counters of a slot only when the stream's newest entry is the last one
# archived, so an event that reached the buffer after the last read is not lost. Both keys
# share the slot's hash tag, so this runs on Redis Cluster too.
_DROP_IF_ARCHIVED = LuaScript(
    """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 and newest[1][1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
)


class MalformedEntry(ValueError):
    """A stream entry the write path could not have produced."""


def interaction_of(entry_id: str, fields: Mapping[str, str], slot_id: int) -> repo.InteractionRow:
    """The SQL row of one stream entry of buffer slot `slot_id`."""
    try:
        return repo.InteractionRow(
            event_id=fields["event_id"],
            user_id=fields["user_id"],
            item_id=fields["item_id"],
            ts=float(fields["ts"]),
            value=float(fields["value"]),
            type=fields.get("type") or None,
            slot_id=slot_id,
            late=fields.get("late", "0") == "1",
        )
    except (KeyError, ValueError) as exc:
        raise MalformedEntry(f"stream entry {entry_id} of slot {slot_id}: {exc!r}") from exc


@dataclass(frozen=True)
class ArchiveReport:
    read: int
    inserted: int
    last_entry_id: str


async def archive_stream(
    redis: aioredis.Redis,
    engine: sa.Engine,
    keys: RedisKeys,
    slot_id: int,
    *,
    batch_size: int,
    after_entry_id: str = "",
    before_batch: Callable[[], None] = lambda: None,
) -> ArchiveReport:
    """Insert the slot's buffered events after `after_entry_id` into SQL, a batch at a time.

    `before_batch` runs before each batch is read (the worker checks its lease there).
    """
    stream = keys.slot_stream(slot_id)
    cursor = after_entry_id
    read = inserted = 0
    while True:
        before_batch()
        start = f"({cursor}" if cursor else "-"
        # the worker's client decodes replies (decode_responses=True)
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await redis.xrange(stream, min=start, max="+", count=batch_size),
        )
        if not entries:
            return ArchiveReport(read, inserted, cursor)

        rows = [interaction_of(entry_id, fields, slot_id) for entry_id, fields in entries]
        inserted += await asyncio.to_thread(repo.insert_interactions, engine, rows)
        read += len(entries)
        cursor = entries[-1][0]


async def drop_buffer(
    redis: aioredis.Redis, keys: RedisKeys, slot_id: int, *, last_entry_id: str
) -> bool:
    """Delete an archived slot's stream and counters and take it out of the index.

    Returns False, deleting nothing, when entries newer than `last_entry_id` are in the stream.
    """
    dropped = await _DROP_IF_ARCHIVED.run(
        redis, [keys.slot_stream(slot_id), keys.slot_stats(slot_id)], [last_entry_id]
    )
    if not dropped:
        return False

    await redis.zrem(keys.slots_index, str(slot_id))
    # a write that recreated the buffer between the two calls puts the slot back in the index
    if await redis.exists(keys.slot_stream(slot_id), keys.slot_stats(slot_id)):
        await redis.zadd(keys.slots_index, {str(slot_id): slot_id})
    return True
