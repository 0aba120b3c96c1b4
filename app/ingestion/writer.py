"""The write path: one atomic Lua script call stores a whole batch of events.

For each event, in order: the idempotency key is claimed (`SET NX EX`); a repeated id only
counts a duplicate. A new event goes into the buffer of its own slot, or, when that slot is
already closed, into the oldest open slot flagged late (see `app.ingestion.slots`); it is
appended to the slot's stream and to the user's recent events and seen items. The slot counters
and `slots_index` are updated once per slot touched, and the clock last: events are judged
against the watermark as it stood when the request arrived (in clock="wall" advanced first by
the server's clock), and the batch's newest timestamp then moves it on.

Running it all in one script makes a request one round trip at most and atomic: a concurrent
request sees all of a batch or none of it, a crash never leaves an event claimed but not stored,
and a slot is never written after the watermark closed it. The API goes through `EventWriter`,
which lets concurrent requests of a process share one call; `write_events` is the direct call.
"""

import asyncio
from typing import NamedTuple

import orjson
import redis.asyncio as aioredis

from app.ingestion.lua import CLOCK_HELPERS, LuaScript
from app.ingestion.slots import slot_of
from app.ingestion.validation import Event
from app.keys import RedisKeys
from app.settings import Settings

# TODO: the script builds its keys from the prefix rather than receiving them in KEYS, which a
# standalone Redis allows and Redis Cluster does not; on a cluster the batch must be split by
# hash slot first (slot keys share a hash tag, user and dedup keys do not).
_WRITE_EVENTS = LuaScript(
    CLOCK_HELPERS
    + """
local prefix = ARGV[1]
local slot_seconds = tonumber(ARGV[2])
local lateness_s = tonumber(ARGV[3])
local wall_now_s = tonumber(ARGV[4])
local batch_max_ts = tonumber(ARGV[5])
local dedup_ttl_s = ARGV[6]
local recent_events_per_user = tonumber(ARGV[7])
local events = cjson.decode(ARGV[8])

local function slot_of(ts)
  local slot = math.floor(ts / slot_seconds)
  if slot * slot_seconds > ts then return slot - 1 end
  if (slot + 1) * slot_seconds <= ts then return slot + 1 end
  if slot == 0 then return 0 end
  return slot
end

-- the watermark this batch is judged against
local clock_key = prefix .. ':clock'
local max_ts, watermark = read_clock(clock_key)
if wall_now_s ~= nil then
  local newest = wall_now_s
  if max_ts ~= nil and max_ts > newest then newest = max_ts end
  watermark = raise_watermark(watermark, newest - lateness_s)
end
local open_slot = nil
if watermark ~= nil then open_slot = string.format('%.0f', slot_of(watermark)) end

-- per event: claim the id, then store it or count the duplicate; the outcome of each event is
-- one character: '1' stored, '2' stored late, '0' duplicate
local counts = {}
local recent_keys = {}
local outcomes = {}
for i = 1, #events do
  local e = events[i]
  local event_id, user_id, item_id, ts, value, event_type, event_slot =
    e[1], e[2], e[3], e[4], e[5], e[6], e[7]
  local slot, late_flag = event_slot, '0'
  if watermark ~= nil and watermark >= (tonumber(event_slot) + 1) * slot_seconds then
    slot, late_flag = open_slot, '1'
  end
  local slot_counts = counts[slot]
  if slot_counts == nil then
    slot_counts = {0, 0, 0}
    counts[slot] = slot_counts
  end

  if redis.call('SET', prefix .. ':dedup:' .. event_id, '1', 'NX', 'EX', dedup_ttl_s) then
    redis.call('XADD', prefix .. ':slot:{' .. slot .. '}:events', '*',
      'event_id', event_id, 'user_id', user_id, 'item_id', item_id, 'ts', ts,
      'value', value, 'type', event_type, 'late', late_flag, 'event_slot', event_slot)
    local recent_key = prefix .. ':user:' .. user_id .. ':recent'
    redis.call('LPUSH', recent_key,
      '{"item_id":' .. cjson.encode(item_id) .. ',"ts":' .. ts .. ',"value":' .. value .. '}')
    recent_keys[recent_key] = true
    redis.call('SADD', prefix .. ':user:' .. user_id .. ':seen', item_id)
    slot_counts[1] = slot_counts[1] + 1
    if late_flag == '1' then
      slot_counts[2] = slot_counts[2] + 1
      outcomes[i] = '2'
    else
      outcomes[i] = '1'
    end
  else
    slot_counts[3] = slot_counts[3] + 1
    outcomes[i] = '0'
  end
end

-- once per slot and per user touched
for slot, slot_counts in pairs(counts) do
  local stats_key = prefix .. ':slot:{' .. slot .. '}:stats'
  if slot_counts[1] > 0 then redis.call('HINCRBY', stats_key, 'events', slot_counts[1]) end
  if slot_counts[2] > 0 then redis.call('HINCRBY', stats_key, 'late', slot_counts[2]) end
  if slot_counts[3] > 0 then redis.call('HINCRBY', stats_key, 'duplicates', slot_counts[3]) end
  redis.call('ZADD', prefix .. ':slots', tonumber(slot), slot)
end
for recent_key in pairs(recent_keys) do
  redis.call('LTRIM', recent_key, 0, recent_events_per_user - 1)
end

-- the clock moves on with the batch's newest event
if max_ts == nil or batch_max_ts > max_ts then max_ts = batch_max_ts end
watermark = raise_watermark(watermark, max_ts - lateness_s)
redis.call('HSET', clock_key, 'max_event_ts', fmt(max_ts), 'watermark', fmt(watermark))
return {table.concat(outcomes), fmt(watermark)}
"""
)


class WriteResult(NamedTuple):
    accepted: int
    duplicates: int
    late: int
    watermark: float


async def write_events(
    redis: aioredis.Redis,
    keys: RedisKeys,
    settings: Settings,
    events: list[Event],
    now_s: float,
) -> WriteResult:
    """Store a validated, non-empty batch in one round trip; see the module docstring."""
    outcomes, watermark = await _store(redis, keys, settings, events, now_s)
    return _result(outcomes, watermark)


class EventWriter:
    """Shares script calls among the concurrent requests of one process (a group commit).

    While one call is in flight, the requests that arrive queue up; when it returns, they all go
    in the next call, up to `max_events_per_request` events, and each gets its own counts back.
    A lone request goes out at once, so nothing waits on a timer; under load many small
    requests cost one round trip, which is what lets single-event posts keep up. A group is one
    atomic script call, so each request is still stored entirely or not at all.
    """

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._waiting: list[tuple[list[Event], float, asyncio.Future[WriteResult]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, events: list[Event], now_s: float) -> WriteResult:
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((events, now_s, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await self._store_group(self._take_group())
        finally:
            self._flusher = None

    def _take_group(self) -> list[tuple[list[Event], float, asyncio.Future[WriteResult]]]:
        limit = self.settings.max_events_per_request
        taken, taken_events = 0, 0
        for events, _, _ in self._waiting:
            if taken and taken_events + len(events) > limit:
                break
            taken, taken_events = taken + 1, taken_events + len(events)
        group, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return group

    async def _store_group(
        self, group: list[tuple[list[Event], float, asyncio.Future[WriteResult]]]
    ) -> None:
        events = [event for request_events, _, _ in group for event in request_events]
        now_s = max(request_now_s for _, request_now_s, _ in group)
        try:
            outcomes, watermark = await _store(self.redis, self.keys, self.settings, events, now_s)
        except asyncio.CancelledError:
            for _, _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # each request of the group raises it to its own caller
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return

        start = 0
        for request_events, _, future in group:
            end = start + len(request_events)
            if not future.done():
                future.set_result(_result(outcomes[start:end], watermark))
            start = end


async def _store(
    redis: aioredis.Redis, keys: RedisKeys, settings: Settings, events: list[Event], now_s: float
) -> tuple[str, float]:
    """Run the script; returns one outcome character per event and the new watermark."""
    slot_seconds = settings.slot_seconds
    rows = [
        (e.event_id, e.user_id, e.item_id, repr(e.ts_s), repr(e.value), e.type,
         str(slot_of(e.ts_s, slot_seconds)))
        for e in events
    ]  # fmt: skip
    args = [
        keys.prefix,
        slot_seconds,
        repr(settings.allowed_lateness_s),
        repr(now_s) if settings.clock == "wall" else "",
        repr(max(e.ts_s for e in events)),
        settings.dedup_ttl_s,
        settings.recent_events_per_user,
        orjson.dumps(rows),
    ]
    outcomes, watermark = await _WRITE_EVENTS.run(redis, [], args)
    return str(outcomes), float(watermark)


def _result(outcomes: str, watermark: float) -> WriteResult:
    duplicates = outcomes.count("0")
    return WriteResult(len(outcomes) - duplicates, duplicates, outcomes.count("2"), watermark)
