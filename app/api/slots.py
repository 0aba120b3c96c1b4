"""`GET /v1/slots`: every slot with its state and counters, newest first.

Slots the worker has recorded come from SQL (closed, archived, trained); slots that still have
only a Redis buffer (open, or closed and waiting for the worker) come from their Redis counters.
"""

from datetime import datetime
from typing import Annotated, Literal

import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, KeysDep, ReadAuth, RedisDep, SettingsDep
from app.errors import Unavailable
from app.ingestion import is_closed, read_clock, slot_end_s, slot_start_s
from app.ingestion.clock import STAT_FIELDS
from app.keys import RedisKeys
from app.storage import repo

router = APIRouter(tags=["slots"], dependencies=[ReadAuth])

SlotState = Literal["open", "closed", "archived", "trained"]


class SlotOut(BaseModel):
    slot_id: int
    state: SlotState
    start_ts: float
    end_ts: float
    events: int
    late: int
    duplicates: int
    closed_at: datetime | None = None
    archived_at: datetime | None = None
    trained_at: datetime | None = None
    model_version: int | None = None


class SlotsOut(BaseModel):
    slots: list[SlotOut]
    watermark: float | None
    slot_seconds: int
    # pass as `before` to get the next (older) page; None on the last page
    next_before: int | None


@router.get("/slots")
async def list_slots(
    settings: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(description="only slots with a smaller id")] = None,
) -> SlotsOut:
    """Slots newest first with state, event, late and duplicate counts, `limit` per page."""
    try:
        _, watermark = await read_clock(redis, keys)
        buffered = await _buffered_slots(redis, keys, limit, before)
    except RedisError as exc:
        raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    try:
        recorded = await run_in_threadpool(
            repo.list_slots, engine, limit=limit, before_slot_id=before
        )
    except sa.exc.OperationalError as exc:
        raise Unavailable(f"database: {type(exc).__name__}") from exc

    merged = {slot_id: _buffered_out(slot_id, stats, watermark, settings.slot_seconds)
              for slot_id, stats in buffered.items()}  # fmt: skip
    # a slot the worker has recorded is shown as SQL has it, even while its buffer remains
    merged.update({record.slot_id: SlotOut(**record.__dict__) for record in recorded})
    page = [merged[slot_id] for slot_id in sorted(merged, reverse=True)[:limit]]

    next_before = page[-1].slot_id if len(page) == limit else None
    return SlotsOut(
        slots=page,
        watermark=watermark,
        slot_seconds=settings.slot_seconds,
        next_before=next_before,
    )


async def _buffered_slots(
    redis: aioredis.Redis, keys: RedisKeys, limit: int, before: int | None
) -> dict[int, dict[str, int]]:
    """The newest `limit` slots with a Redis buffer below `before`, with their counters."""
    top = "+inf" if before is None else f"({before}"
    members = await redis.zrevrangebyscore(keys.slots_index, top, "-inf", start=0, num=limit)
    slot_ids = [int(str(member)) for member in members]

    pipe = redis.pipeline(transaction=False)
    for slot_id in slot_ids:
        pipe.hgetall(keys.slot_stats(slot_id))
    replies = await pipe.execute()
    return {
        slot_id: {name: int(stored.get(name, 0)) for name in STAT_FIELDS}
        for slot_id, stored in zip(slot_ids, replies, strict=True)
    }


def _buffered_out(
    slot_id: int, stats: dict[str, int], watermark: float | None, slot_seconds: int
) -> SlotOut:
    # closed here means the watermark has passed it and the worker has not recorded it yet
    state: SlotState = "closed" if is_closed(slot_id, watermark, slot_seconds) else "open"
    return SlotOut(
        slot_id=slot_id,
        state=state,
        start_ts=slot_start_s(slot_id, slot_seconds),
        end_ts=slot_end_s(slot_id, slot_seconds),
        events=stats["events"],
        late=stats["late"],
        duplicates=stats["duplicates"],
    )
