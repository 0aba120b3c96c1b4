"""The worker: closes slots, archives them into SQL, and trains on them, as the single leader.

One pass (`run_once`): advance the watermark by the server clock (clock="wall"), then take each
closed slot that still has a buffer, oldest first, through closed -> archived (SQL) and drop its
buffer; then offer the archived slots to the trainer, oldest first, and mark them trained.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import sqlalchemy as sa

from app.ingestion import advance_wall_clock, closed_slot_ids, slot_stats
from app.keys import RedisKeys
from app.settings import Settings
from app.storage import repo
from app.worker.archive import archive_stream, drop_buffer
from app.worker.lease import LeaseLost, RedisLease
from app.worker.trainer import NoTrainer, SlotTrainer

log = logging.getLogger("metarec.worker")

MAX_BACKOFF_S = 30.0


def _ms_since(started_s: float) -> float:
    return (time.perf_counter() - started_s) * 1000


def backoff_s(failures: int, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """The wait after `failures` failed passes in a row: doubling from `base_s`, at most `cap_s`."""
    if failures <= 0:
        return base_s
    return min(cap_s, base_s * 2 ** min(failures, 16))


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


@dataclass
class PassReport:
    archived: int = 0
    trained: int = 0


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        engine: sa.Engine,
        *,
        trainer: SlotTrainer | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.engine = engine
        self.trainer = trainer or NoTrainer()
        self.keys = RedisKeys(settings.redis_prefix)
        self.lease = RedisLease(redis, self.keys.worker_lease, settings.worker_lease_s)

    # leadership

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for the lease, work while holding it, and give it back when `stop` is set."""
        waiting_since: float | None = None
        while not stop.is_set():
            if not await self._try_acquire():
                if waiting_since is None:
                    waiting_since = time.perf_counter()
                    log.info("worker lease held by another worker; waiting")
                await sleep_or_stop(
                    stop, min(self.settings.worker_poll_s, self.lease.renew_every_s)
                )
                continue

            waited_ms = 0.0 if waiting_since is None else _ms_since(waiting_since)
            waiting_since = None
            log.info("worker lease acquired after %.0f ms", waited_ms)
            await self._lead(stop)

    async def _try_acquire(self) -> bool:
        try:
            return await self.lease.acquire()
        except aioredis.RedisError as exc:
            log.warning("worker lease not acquired: Redis error %s", exc)
            return False

    async def _lead(self, stop: asyncio.Event) -> None:
        keeper = asyncio.create_task(self._keep_lease(stop))
        try:
            await self._work(stop)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self._release()

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.lease.held:
            await sleep_or_stop(stop, self.lease.renew_every_s)
            try:
                if not await self.lease.renew():
                    log.warning("worker lease lost to another worker")
                    return
            except aioredis.RedisError as exc:
                log.warning("worker lease not renewed: Redis error %s", exc)

    async def _release(self) -> None:
        try:
            await self.lease.release()
            log.info("worker lease released")
        except aioredis.RedisError as exc:
            log.warning("worker lease not released (it expires by itself): %s", exc)

    async def _work(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set() and self.lease.held:
            try:
                await self.run_once(stop)
                failures = 0
            except LeaseLost:
                log.warning("worker lease ran out; stopping work until it is taken again")
                return
            except Exception:
                failures += 1
                log.exception("worker pass failed (%d in a row)", failures)
            await sleep_or_stop(stop, backoff_s(failures, self.settings.worker_poll_s))
        if not stop.is_set():
            log.warning("worker lease expired unrenewed; waiting to take it again")

    # one pass

    async def run_once(self, stop: asyncio.Event | None = None) -> PassReport:
        """Archive every closed slot, then train on archived slots; needs the lease held."""
        report = PassReport()
        watermark = await advance_wall_clock(self.redis, self.keys, self.settings, time.time())
        slot_seconds = self.settings.slot_seconds
        for slot_id in await closed_slot_ids(self.redis, self.keys, slot_seconds, watermark):
            if stop is not None and stop.is_set():
                return report
            await self.archive_slot(slot_id)
            report.archived += 1

        report.trained = await self.train_archived(stop)
        return report

    async def archive_slot(self, slot_id: int) -> repo.SlotRecord:
        """Take one closed slot from its Redis buffer to `archived` in SQL."""
        self.lease.check()
        started = time.perf_counter()
        stats = await slot_stats(self.redis, self.keys, slot_id)
        await asyncio.to_thread(
            repo.record_slot_closed,
            self.engine,
            slot_id,
            slot_seconds=self.settings.slot_seconds,
            **stats,
        )
        log.info(
            "slot %d closed: %d events, %d late, %d duplicates, recorded in %.0f ms",
            slot_id,
            stats["events"],
            stats["late"],
            stats["duplicates"],
            _ms_since(started),
        )

        started = time.perf_counter()
        read, inserted, record = await self._archive_until_drained(slot_id)
        log.info(
            "slot %d archived: %d events read, %d new, %d in SQL, in %.0f ms",
            slot_id,
            read,
            inserted,
            record.events,
            _ms_since(started),
        )
        return record

    async def _archive_until_drained(self, slot_id: int) -> tuple[int, int, repo.SlotRecord]:
        """Archive the buffer, mark the slot archived, then drop the buffer; if events arrived
        in the meantime, archive those too before dropping."""
        cursor = ""
        read = inserted = 0
        while True:
            report = await archive_stream(
                self.redis,
                self.engine,
                self.keys,
                slot_id,
                batch_size=self.settings.archive_batch_size,
                after_entry_id=cursor,
                before_batch=self.lease.check,
            )
            read, inserted = read + report.read, inserted + report.inserted
            cursor = report.last_entry_id
            record = await asyncio.to_thread(repo.record_slot_archived, self.engine, slot_id)

            self.lease.check()
            if await drop_buffer(self.redis, self.keys, slot_id, last_entry_id=cursor):
                return read, inserted, record

    # the training hook

    async def train_archived(self, stop: asyncio.Event | None = None) -> int:
        """Offer archived slots to the trainer, oldest first, until it declines one."""
        trained = 0
        for slot_id in await asyncio.to_thread(repo.slot_ids_in_state, self.engine, "archived"):
            if stop is not None and stop.is_set():
                break
            self.lease.check()
            started = time.perf_counter()
            outcome = await asyncio.to_thread(self.trainer.train, slot_id)
            if outcome is None:
                break

            self.lease.check()
            await asyncio.to_thread(
                repo.record_slot_trained,
                self.engine,
                slot_id,
                model_version=outcome.model_version,
            )
            log.info(
                "slot %d trained: model version %s in %.0f ms",
                slot_id,
                outcome.model_version,
                _ms_since(started),
            )
            trained += 1
        return trained
