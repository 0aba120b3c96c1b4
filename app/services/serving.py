"""The served model snapshot and its hot swap.

Each API process holds one `ServingManager`. A background task subscribes to the model channel
and, on every message and at least every `model_poll_s` (a message can be missed), reads the
pointer and the pin. When the version to serve (the pinned one, else the newest) differs from
the one served, it is loaded and warmed in a worker thread and swapped in by one reference
assignment. A version that fails to load is logged and the old snapshot stays.
"""

import asyncio
import gc
import logging
import time
from pathlib import Path

import redis.asyncio as aioredis
import sqlalchemy as sa
import torch
from fastapi import FastAPI

from app.keys import RedisKeys
from app.services.recommend import RecentPopularity, Recommender
from app.services.snapshot import Adapter, Snapshot, load_snapshot, warm_snapshot
from app.settings import Settings
from app.storage import repo
from models.coldstart import adapt_users

log = logging.getLogger(__name__)

# a version that failed to load is tried again after this long (or when the pointer moves on)
RETRY_FAILED_S = 30.0


class SnapshotLoadError(Exception):
    """A published version could not be turned into a snapshot."""


class ServingManager:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        keys: RedisKeys,
        engine: sa.Engine,
        adapt: Adapter = adapt_users,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys
        self.engine = engine
        self.adapt = adapt
        self.device = settings.torch_device
        self.recommender = Recommender(
            keys,
            adapt,
            slot_seconds=settings.slot_seconds,
            cold_start_max_events=settings.cold_start_max_events,
            popularity=RecentPopularity(settings.popular_recent_events, settings.popular_cache_s),
        )

        self.current: Snapshot | None = None  # swapped by assignment only
        self.ready = False  # True once the first look at the pointer has been handled
        self.pointer: int | None = None  # model_current as last read
        self.pinned: int | None = None  # model_pinned as last read
        self.swaps = 0
        self.last_swap_ms: float | None = None
        self._failed_at: dict[int, float] = {}
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def target_version(self) -> int | None:
        """The version this process should serve: the pinned one, else the newest."""
        return self.pinned if self.pinned is not None else self.pointer

    async def start(self) -> None:
        try:
            await self.sync()
        except Exception as exc:  # Redis or SQL not answering yet: the follower retries
            log.warning("model pointer not read at start, retrying in the background: %r", exc)
        self._task = asyncio.create_task(self._follow(), name="metarec-model-follower")

    async def stop(self) -> None:
        self._stopping = True  # a cancel can be swallowed by a Redis read timing out with it
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sync(self) -> Snapshot | None:
        """Read the pointer and the pin; load and swap in the target version if it changed."""
        async with self._sync_lock:
            current, pinned = await self.client.mget(
                self.keys.model_current, self.keys.model_pinned
            )
            self.pointer = _int_or_none(current)
            self.pinned = _int_or_none(pinned)
            target = self.target_version
            if target is not None and self._should_load(target):
                await self._swap_to(target)
            self.ready = True
            return self.current

    def _should_load(self, version: int) -> bool:
        if self.current is not None and self.current.version == version:
            return False
        failed_at = self._failed_at.get(version)
        return failed_at is None or time.monotonic() - failed_at >= RETRY_FAILED_S

    async def _swap_to(self, version: int) -> None:
        started = time.perf_counter()
        try:
            snapshot, warm_ms = await asyncio.to_thread(self._load_and_warm, version)
        except Exception as exc:
            self._failed_at[version] = time.monotonic()
            served = None if self.current is None else self.current.version
            log.error("version %d not loaded, still serving %s: %r", version, served, exc)
            return

        previous = self.current
        self.current = snapshot  # the swap: requests already running keep the old one
        # the snapshot's millions of ids would make every full garbage collection a pause of
        # 100 ms or more; frozen objects are skipped by it (and still freed by refcount)
        gc.freeze()
        self.swaps += 1
        self.last_swap_ms = (time.perf_counter() - started) * 1e3
        self._failed_at.pop(version, None)
        log.info(
            "serving version %d (was %s): load %.0f ms, warm %.0f ms, swap took %.0f ms",
            version,
            None if previous is None else previous.version,
            snapshot.load_ms,
            warm_ms,
            self.last_swap_ms,
        )

    def _load_and_warm(self, version: int) -> tuple[Snapshot, float]:
        record = repo.get_model_version(self.engine, version)
        if record is None:
            raise SnapshotLoadError(f"version {version} is not registered in model_versions")
        snapshot = load_snapshot(
            Path(record.path),
            version=version,
            trained_through_slot=record.trained_through_slot,
            device=self.device,
        )
        return snapshot, warm_snapshot(snapshot, self.adapt)

    async def _follow(self) -> None:
        """Follow the model channel for the life of the process; reconnect on any error."""
        poll_s = self.settings.model_poll_s
        while not self._stopping:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.model_channel)
                await self.sync()  # anything published before the subscription took effect
                while not self._stopping:
                    # a message, or poll_s without one: either way, look at the pointer
                    message = await pubsub.get_message(timeout=poll_s)
                    if message is not None:
                        self._failed_at.clear()  # news from a publisher: try failed ones again
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("model channel lost, reconnecting in %.1f s: %r", poll_s, exc)
                await asyncio.sleep(poll_s)
            finally:
                await pubsub.aclose()


def _int_or_none(value: bytes | str | None) -> int | None:
    return None if value is None or value in ("", b"") else int(value)


async def start_serving(app: FastAPI, settings: Settings) -> ServingManager:
    """Create the process's manager, read the pointer once, and start following it."""
    torch.set_num_threads(settings.api_torch_threads)
    manager = ServingManager(settings, app.state.redis, app.state.keys, app.state.engine)
    await manager.start()
    gc.freeze()  # what the process holds from start-up on needs no cyclic collection
    return manager


async def stop_serving(app: FastAPI) -> None:
    manager: ServingManager | None = getattr(app.state, "serving", None)
    if manager is not None:
        await manager.stop()
        batcher = manager.recommender.batcher
        log.info(
            "serving stopped: %d swaps, %d requests scored in %d batches",
            manager.swaps,
            batcher.scored,
            batcher.batches,
        )
