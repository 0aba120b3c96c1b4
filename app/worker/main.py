"""Running the worker in a process of its own: `metarec worker` or `python -m app.worker`."""

import asyncio
import logging
import signal

import redis.asyncio as aioredis

from app.embedded import start_embedded
from app.settings import Settings
from app.storage.db import make_engine
from app.worker.loop import Worker
from app.worker.trainer import make_trainer

log = logging.getLogger("metarec.worker")


async def serve_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run a worker against `settings.redis_url` and the database until `stop` is set."""
    if not settings.redis_url:
        raise ValueError("serve_worker needs settings.redis_url; see app.embedded")
    redis = aioredis.from_url(settings.redis_url, decode_responses=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        worker = Worker(settings, redis, engine, trainer=make_trainer(settings, engine))
        await worker.run(stop)
    finally:
        await redis.aclose()
        engine.dispose()


async def _run_until_signalled(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "worker started: slot_seconds=%d clock=%s batch=%d",
        settings.slot_seconds,
        settings.clock,
        settings.archive_batch_size,
    )
    await serve_worker(settings, stop)
    log.info("worker stopped")


def run_worker(settings: Settings) -> int:
    """Run the worker in this process until SIGINT or SIGTERM; embedded services if no URLs."""
    services = start_embedded(settings)
    try:
        asyncio.run(_run_until_signalled(services.settings))
    finally:
        services.close()
    return 0
