"""The shared event-time clock in Redis and the slot buffers it closes, as the worker reads them.

The clock hash holds `max_event_ts` (newest event time accepted) and `watermark`; both only move
forward. `slots_index` lists every slot that has a buffer (events or counters) in Redis; the
worker removes a slot from it once the slot's buffer is archived, so the closed slots still in the
index are the ones waiting for the worker.
"""

import math

import redis.asyncio as aioredis

from app.ingestion.lua import CLOCK_HELPERS, LuaScript
from app.ingestion.slots import last_closed_slot, slot_end_s
from app.keys import RedisKeys
from app.settings import Settings

_ADVANCE_WALL_CLOCK = LuaScript(
    CLOCK_HELPERS
    + """
local max_ts, old_wm = read_clock(KEYS[1])
local newest = tonumber(ARGV[1])
if max_ts ~= nil and max_ts > newest then newest = max_ts end
local wm = raise_watermark(old_wm, newest - tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'watermark', fmt(wm))
return fmt(wm)
"""
)

STAT_FIELDS = ("events", "late", "duplicates")


async def advance_wall_clock(
    redis: aioredis.Redis, keys: RedisKeys, settings: Settings, now_s: float
) -> float:
    """Let the server clock advance the watermark (clock="wall") and return the watermark.

    In clock="event" only event time moves the watermark: nothing is written and the stored
    watermark is returned, or -inf when no event has been seen yet (so no slot is closed).
    """
    if settings.clock == "wall":
        reply = await _ADVANCE_WALL_CLOCK.run(
            redis, [keys.clock], [repr(float(now_s)), repr(settings.allowed_lateness_s)]
        )
        return float(reply)

    _, watermark = await read_clock(redis, keys)
    return -math.inf if watermark is None else watermark


async def read_clock(redis: aioredis.Redis, keys: RedisKeys) -> tuple[float | None, float | None]:
    """`(max_event_ts, watermark)` as stored; None for a part that has not been set yet."""
    max_event_ts, watermark = await redis.hmget(keys.clock, ["max_event_ts", "watermark"])
    return _float_or_none(max_event_ts), _float_or_none(watermark)


async def closed_slot_ids(
    redis: aioredis.Redis, keys: RedisKeys, slot_seconds: int, watermark: float | None
) -> list[int]:
    """Slots in `slots_index` whose end is at or before `watermark`, oldest first."""
    newest_closed = last_closed_slot(watermark, slot_seconds)
    if newest_closed is None:
        return []
    members = await redis.zrangebyscore(keys.slots_index, "-inf", newest_closed)
    return [int(_text(member)) for member in members]


async def slot_stats(redis: aioredis.Redis, keys: RedisKeys, slot_id: int) -> dict[str, int]:
    """The counters of one slot buffer: `events`, `late`, `duplicates` (0 when never counted)."""
    stored = await redis.hgetall(keys.slot_stats(slot_id))
    return {field: int(stored.get(field, 0)) for field in STAT_FIELDS}


async def pending_slots(
    redis: aioredis.Redis, keys: RedisKeys, slot_seconds: int, watermark: float | None
) -> tuple[int, float]:
    """How many closed slots still hold a buffer, and how long ago (watermark seconds) the
    oldest of them closed; `(0, 0.0)` when the worker is up to date."""
    newest_closed = last_closed_slot(watermark, slot_seconds)
    if newest_closed is None or watermark is None:
        return 0, 0.0
    pipe = redis.pipeline(transaction=False)
    pipe.zcount(keys.slots_index, "-inf", newest_closed)
    pipe.zrangebyscore(keys.slots_index, "-inf", newest_closed, start=0, num=1)
    count, oldest = await pipe.execute()
    if not oldest:
        return 0, 0.0
    return int(count), watermark - slot_end_s(int(_text(oldest[0])), slot_seconds)


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(_text(value))


def _text(value: object) -> str:
    # the clients of this project decode replies, but a raw client hands back bytes
    return value.decode() if isinstance(value, bytes) else str(value)
