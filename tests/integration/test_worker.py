"""The worker against real Redis and SQL: archiving, re-runs, the lease, and the trainer hook."""

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa

from app.ingestion.validation import Event
from app.ingestion.writer import write_events
from app.keys import RedisKeys
from app.settings import Settings
from app.storage import repo
from app.storage.db import make_engine
from app.storage.migrate import upgrade_to_head
from app.worker import NoTrainer, TrainOutcome, Worker
from app.worker.archive import archive_stream, drop_buffer
from app.worker.lease import LeaseLost, RedisLease
from tests.integration.worker_support import (
    SlotRange,
    count_in_slots,
    interaction_rows,
    slot_states,
    user_event_counts,
)

pytestmark = pytest.mark.integration

SLOT_S = 10


@pytest.fixture
def settings(redis_url: str, migrated_database_url: str, redis_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        redis_prefix=redis_prefix,
        clock="event",
        slot_seconds=SLOT_S,
        allowed_lateness_s=0.0,
        archive_batch_size=7,
        worker_poll_s=0.05,
        worker_lease_s=3.0,
    )


@pytest.fixture
def slot_range() -> SlotRange:
    return SlotRange.fresh(3, SLOT_S)


@pytest.fixture
def user_prefix() -> str:
    return f"wu-{uuid.uuid4().hex[:8]}-"


def _events(slot_range: SlotRange, user_prefix: str, per_slot: int) -> list[Event]:
    return [
        Event(
            event_id=f"{user_prefix}{slot}-{i}",
            user_id=f"{user_prefix}{i % 4}",
            item_id=f"item-{i % 6}",
            ts_s=slot_range.ts(slot, within_s=i * SLOT_S / per_slot),
            value=1.0,
            type="view" if i % 2 else "",
        )
        for slot in range(slot_range.count)
        for i in range(per_slot)
    ]


async def _write(settings: Settings, events: list[Event]) -> None:
    client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
    try:
        await write_events(client, RedisKeys(settings.redis_prefix), settings, events, 0.0)
    finally:
        await client.aclose()


async def _close_all(settings: Settings, slot_range: SlotRange, user_prefix: str) -> None:
    """One event at the end of the range moves the watermark past every slot of it."""
    closer = Event(f"{user_prefix}closer", f"{user_prefix}closer", "item-0", 0.0, 1.0, "")
    await _write(settings, [closer._replace(ts_s=slot_range.after_end_ts)])


async def _one_pass(settings: Settings, engine: sa.Engine, **kwargs: object) -> Worker:
    client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
    worker = Worker(settings, client, engine, **kwargs)  # type: ignore[arg-type]
    try:
        assert await worker.lease.acquire()
        await worker.run_once()
        await worker.lease.release()
    finally:
        await client.aclose()
    return worker


def test_a_pass_archives_every_closed_slot_and_drops_its_buffer(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    events = _events(slot_range, user_prefix, per_slot=20)
    asyncio.run(_write(settings, events))
    asyncio.run(_write(settings, events[:5]))  # five duplicates

    # before the closer, the newest slot is still open: only the first two are archived
    caplog.set_level(logging.INFO, logger="metarec.worker")
    asyncio.run(_one_pass(settings, engine))
    assert slot_states(engine, slot_range) == {
        slot_range.first: "archived",
        slot_range.first + 1: "archived",
    }
    assert count_in_slots(engine, slot_range) == 40
    assert f"slot {slot_range.first} archived: 20 events read, 20 new" in caplog.text

    asyncio.run(_close_all(settings, slot_range, user_prefix))
    asyncio.run(_one_pass(settings, engine))

    rows = interaction_rows(engine, slot_range)
    assert sorted(row.event_id for row in rows) == sorted(event.event_id for event in events)
    assert {row.type for row in rows} == {"view", None}
    assert all(not row.late for row in rows)
    assert slot_states(engine, slot_range) == slot_range.all_in("archived")
    # the duplicates arrived when the first slots had closed: they count in the open one
    counters = [repo.get_slot(engine, slot_id) for slot_id in slot_range.ids]
    assert [(s.events, s.late, s.duplicates) for s in counters if s] == [
        (20, 0, 0),
        (20, 0, 0),
        (20, 0, 5),
    ]

    # the buffers are gone; the closer's slot is open and keeps its buffer
    for slot_id in slot_range.ids:
        assert not store.exists(keys.slot_stream(slot_id), keys.slot_stats(slot_id))
    assert store.zrange(keys.slots_index, 0, -1) == [str(slot_range.first + slot_range.count)]
    assert sum(user_event_counts(engine, user_prefix).values()) == 60


def test_a_second_pass_changes_nothing(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=10)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    asyncio.run(_one_pass(settings, engine))
    users_before = user_event_counts(engine, user_prefix)

    asyncio.run(_one_pass(settings, engine))

    assert count_in_slots(engine, slot_range) == 30
    assert user_event_counts(engine, user_prefix) == users_before
    assert sum(users_before.values()) == 30


def test_an_interrupted_archive_resumes_without_duplicates(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=30)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    batches_allowed = iter([None, None, None])

    def stop_after_three_batches() -> None:
        if next(batches_allowed, "stop") == "stop":
            raise LeaseLost("stand-in for a crash in the middle of a slot")

    async def interrupted() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        with pytest.raises(LeaseLost):
            await archive_stream(
                client,
                engine,
                keys,
                slot_range.first,
                batch_size=settings.archive_batch_size,
                before_batch=stop_after_three_batches,
            )
        await client.aclose()

    asyncio.run(interrupted())
    assert count_in_slots(engine, slot_range) == 3 * settings.archive_batch_size

    asyncio.run(_one_pass(settings, engine))

    assert count_in_slots(engine, slot_range) == 90
    assert sum(user_event_counts(engine, user_prefix).values()) == 90


def test_a_buffer_left_behind_an_archived_slot_is_dropped_on_the_next_pass(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=10)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    asyncio.run(_one_pass(settings, engine))
    # as if the worker had died after marking the slot archived but before dropping its buffer
    store.xadd(keys.slot_stream(slot_range.first), {"event_id": "x"})
    store.delete(keys.slot_stream(slot_range.first))
    rows = interaction_rows(engine, slot_range)
    for row in rows[:10]:
        fields = {
            "event_id": row.event_id,
            "user_id": row.user_id,
            "item_id": row.item_id,
            "ts": repr(row.ts),
            "value": repr(row.value),
            "type": row.type or "",
            "late": "0",
            "event_slot": str(row.slot_id),
        }
        store.xadd(keys.slot_stream(row.slot_id), fields)  # type: ignore[arg-type]
        store.zadd(keys.slots_index, {str(row.slot_id): row.slot_id})

    asyncio.run(_one_pass(settings, engine))

    assert count_in_slots(engine, slot_range) == 30
    assert not any(store.exists(keys.slot_stream(slot_id)) for slot_id in slot_range.ids)
    assert slot_states(engine, slot_range) == slot_range.all_in("archived")


def test_a_buffer_that_grew_after_the_last_read_is_not_dropped(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    slot_id = slot_range.first
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=5)))

    async def archive_then_grow_then_drop() -> tuple[bool, bool]:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        report = await archive_stream(client, engine, keys, slot_id, batch_size=100)
        await client.xadd(keys.slot_stream(slot_id), {"event_id": "late-arrival"})
        refused = await drop_buffer(client, keys, slot_id, last_entry_id=report.last_entry_id)
        newest = (await client.xrevrange(keys.slot_stream(slot_id), count=1))[0][0]
        dropped = await drop_buffer(client, keys, slot_id, last_entry_id=newest)
        await client.aclose()
        return refused, dropped

    refused, dropped = asyncio.run(archive_then_grow_then_drop())

    assert (refused, dropped) == (False, True)
    assert not store.exists(keys.slot_stream(slot_id), keys.slot_stats(slot_id))
    assert str(slot_id) not in store.zrange(keys.slots_index, 0, -1)


def test_one_lease_holder_at_a_time(settings: Settings, store: redis.Redis) -> None:
    key = RedisKeys(settings.redis_prefix).worker_lease

    async def contend() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        first, second = RedisLease(client, key, 5.0), RedisLease(client, key, 5.0)
        assert await first.acquire()
        assert not await second.acquire()
        assert await first.renew()
        assert not await second.renew() and not second.held
        # releasing someone else's lease does nothing
        await second.release()
        assert await client.get(key) == first.token

        await first.release()
        assert not first.held
        assert await second.acquire() and second.held
        assert not await first.renew()
        with pytest.raises(LeaseLost):
            first.check()
        await second.release()
        await client.aclose()

    asyncio.run(contend())


def test_two_running_workers_share_the_slots_without_overlap(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=40)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    leaders: list[int] = []

    async def run_two() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        workers = [Worker(settings, client, engine) for _ in range(2)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
        for _ in range(200):
            await asyncio.sleep(0.05)
            leaders.append(sum(worker.lease.held for worker in workers))
            if slot_states(engine, slot_range) == slot_range.all_in("archived"):
                break
        stop.set()
        await asyncio.gather(*tasks)
        assert await client.get(workers[0].keys.worker_lease) is None
        await client.aclose()

    asyncio.run(run_two())

    assert max(leaders) == 1
    assert slot_states(engine, slot_range) == slot_range.all_in("archived")
    assert count_in_slots(engine, slot_range) == 120


class _TrainsAllButNewest:
    """Trains every slot that has a successor archived, like a support/query meta-update."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.calls: list[int] = []

    def train(self, slot_id: int) -> TrainOutcome | None:
        self.calls.append(slot_id)
        if repo.get_slot(self.engine, slot_id + 1) is None:
            return None
        return TrainOutcome(model_version=slot_id % 1000)


@pytest.fixture
def own_database(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, sa.Engine]]:
    """Settings over a database of this test alone: the trainer sees every archived slot."""
    url = f"sqlite:///{tmp_path / 'metarec.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    yield settings.model_copy(update={"database_url": url}), engine
    engine.dispose()


def test_the_trainer_gets_archived_slots_oldest_first(
    own_database: tuple[Settings, sa.Engine],
    store: redis.Redis,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    settings, engine = own_database
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=3)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    trainer = _TrainsAllButNewest(engine)

    asyncio.run(_one_pass(settings, engine, trainer=trainer))

    first, second, third = slot_range.ids
    assert slot_states(engine, slot_range) == {
        first: "trained",
        second: "trained",
        third: "archived",
    }
    assert trainer.calls[-3:] == [first, second, third]
    trained = repo.get_slot(engine, second)
    assert trained is not None and trained.model_version == second % 1000


def test_without_a_trainer_slots_stay_archived(
    settings: Settings,
    store: redis.Redis,
    engine: sa.Engine,
    slot_range: SlotRange,
    user_prefix: str,
) -> None:
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=2)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))

    worker = asyncio.run(_one_pass(settings, engine))

    assert isinstance(worker.trainer, NoTrainer)
    assert slot_states(engine, slot_range) == slot_range.all_in("archived")


class _FailingTrainer:
    def __init__(self) -> None:
        self.calls = 0

    def train(self, slot_id: int) -> TrainOutcome | None:
        self.calls += 1
        raise RuntimeError("the model update failed")


def test_a_failing_trainer_leaves_slots_archived_and_the_worker_running(
    own_database: tuple[Settings, sa.Engine],
    store: redis.Redis,
    slot_range: SlotRange,
    user_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, engine = own_database
    asyncio.run(_write(settings, _events(slot_range, user_prefix, per_slot=2)))
    asyncio.run(_close_all(settings, slot_range, user_prefix))
    trainer = _FailingTrainer()
    caplog.set_level(logging.INFO, logger="metarec.worker")

    async def run_briefly() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        worker = Worker(settings, client, engine, trainer=trainer)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await task
        await client.aclose()

    asyncio.run(run_briefly())

    assert slot_states(engine, slot_range) == slot_range.all_in("archived")
    # it was retried with a growing pause, each failure logged with its traceback
    assert trainer.calls >= 2
    assert "worker pass failed (2 in a row)" in caplog.text
    assert "RuntimeError: the model update failed" in caplog.text
    assert "worker lease released" in caplog.text
