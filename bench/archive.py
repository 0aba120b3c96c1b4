"""How fast the worker archives closed slots from Redis into SQL (a benchmark, not a test).

Fills the slot buffers of a throw-away Redis prefix with `--events` events through the real write
path, closes the slots, and times one worker pass over them (read the streams in batches, insert
into `interactions` with ON CONFLICT DO NOTHING, upsert the users, mark the slots archived, drop
the buffers). Each database is measured `--runs` times; the median run is reported.

    psql -h 127.0.0.1 -U postgres -d test -c 'CREATE DATABASE metarec_bench'
    python bench/archive.py --redis-url redis://127.0.0.1:6379/0 \
        --database-url postgresql://postgres@127.0.0.1:5432/metarec_bench \
        --database-url sqlite:////tmp/metarec-archive-bench.db

The events go into slots far from real time and are deleted from SQL afterwards.
"""

import argparse
import asyncio
import platform
import statistics
import time
import uuid

import redis.asyncio as aioredis
import sqlalchemy as sa

from app.ingestion.validation import Event
from app.ingestion.writer import write_events
from app.keys import RedisKeys
from app.settings import Settings
from app.storage.db import make_engine
from app.storage.migrate import upgrade_to_head
from app.storage.tables import interactions, slots, users
from app.worker import Worker

SLOT_S = 60
FIRST_SLOT = 5_000_000_000 // SLOT_S
WRITE_BATCH = 10_000


def _events(run_tag: str, count: int, slot_count: int) -> list[Event]:
    per_slot = count // slot_count
    return [
        Event(
            event_id=f"{run_tag}-{n}",
            user_id=f"{run_tag}-u{n % 5_000}",
            item_id=f"i{n % 2_000}",
            ts_s=(FIRST_SLOT + n // per_slot) * SLOT_S + (n % per_slot) * SLOT_S / per_slot,
            value=1.0,
            type="",
        )
        for n in range(per_slot * slot_count)
    ]


async def _fill(settings: Settings, events: list[Event], slot_count: int) -> None:
    client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
    keys = RedisKeys(settings.redis_prefix)
    for start in range(0, len(events), WRITE_BATCH):
        await write_events(client, keys, settings, events[start : start + WRITE_BATCH], 0.0)
    closer = Event("closer", "closer", "i0", (FIRST_SLOT + slot_count) * SLOT_S, 1.0, "")
    await write_events(client, keys, settings, [closer], 0.0)
    await client.aclose()


async def _archive(settings: Settings, engine: sa.Engine) -> float:
    client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
    worker = Worker(settings, client, engine)
    assert await worker.lease.acquire()
    started = time.perf_counter()
    await worker.run_once()
    elapsed_s = time.perf_counter() - started
    await worker.lease.release()
    await client.aclose()
    return elapsed_s


async def _clean(settings: Settings, engine: sa.Engine, run_tag: str) -> None:
    client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
    leftover = [key async for key in client.scan_iter(f"{settings.redis_prefix}:*")]
    if leftover:
        await client.delete(*leftover)
    await client.aclose()
    with engine.begin() as conn:
        conn.execute(sa.delete(interactions).where(interactions.c.slot_id >= FIRST_SLOT))
        conn.execute(sa.delete(slots).where(slots.c.slot_id >= FIRST_SLOT))
        conn.execute(sa.delete(users).where(users.c.user_id.startswith(f"{run_tag}-")))


def _measure(args: argparse.Namespace, database_url: str) -> list[float]:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    rates = []
    for _ in range(args.runs):
        run_tag = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            redis_url=args.redis_url,
            database_url=database_url,
            redis_prefix=f"bench-archive-{run_tag}",
            clock="event",
            slot_seconds=SLOT_S,
            allowed_lateness_s=0.0,
            archive_batch_size=args.batch_size,
        )
        events = _events(run_tag, args.events, args.slots)
        asyncio.run(_fill(settings, events, args.slots))
        try:
            elapsed_s = asyncio.run(_archive(settings, engine))
        finally:
            asyncio.run(_clean(settings, engine, run_tag))
        rates.append(len(events) / elapsed_s)
    engine.dispose()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", action="append", required=True)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=Settings().archive_batch_size)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.python_version()}; {args.events} events")
    print(f"in {args.slots} slots, archive batch {args.batch_size}, median of {args.runs} runs")
    print("| database | events/s (median) | runs |")
    print("|---|---|---|")
    for database_url in args.database_url:
        rates = _measure(args, database_url)
        dialect = sa.make_url(make_engine(database_url).url).get_backend_name()
        shown = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"| {dialect} | {statistics.median(rates):,.0f} | {shown} |")


if __name__ == "__main__":
    main()
