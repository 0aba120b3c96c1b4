"""The model store: one directory per published version, and the one way to publish a version.

Layout: `model_store_path / f"v{version:06d}"` holds the `ServingModel` files and whatever the
learner keeps beside them (its checkpoint). Publishing a version is four steps, each safe to
repeat after a crash: write the directory (atomically, by renaming a finished temporary one),
register the version in SQL, move the Redis pointer `model_current` forward, publish the version
number on `model_channel` so that every API process loads it at once.
"""

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from app.errors import Conflict
from app.keys import RedisKeys
from app.storage import repo
from models.serving import META_FILE, ServingModel

log = logging.getLogger(__name__)

# the pointer only moves forward, so a stale publisher can never roll the fleet back
_ADVANCE_POINTER = """
local current = tonumber(redis.call('GET', KEYS[1]))
local proposed = tonumber(ARGV[1])
if current == nil or current < proposed then
    redis.call('SET', KEYS[1], ARGV[1])
    return proposed
end
return current
"""


@dataclass(frozen=True)
class PublishedVersion:
    version: int
    trained_through_slot: int
    path: Path
    pointer: int  # model_current after publishing (>= version)
    publish_ms: float


def version_dir(store_path: Path, version: int) -> Path:
    return store_path / f"v{version:06d}"


def write_version_files(
    store_path: Path,
    version: int,
    model: ServingModel,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the version's directory once; a complete directory from an earlier try is kept."""
    final = version_dir(store_path, version)
    if (final / META_FILE).is_file():
        return final.resolve()

    store_path.mkdir(parents=True, exist_ok=True)
    partial = store_path / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model.save(partial)
        if write_extra is not None:
            write_extra(partial)
        if final.exists():
            shutil.rmtree(final)  # an incomplete directory left by hand; ours are renamed whole
        partial.rename(final)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return final.resolve()


def register_version(
    engine: sa.Engine,
    *,
    version: int,
    trained_through_slot: int,
    path: Path,
    metrics: dict[str, Any],
) -> repo.ModelVersionRecord:
    """Insert the model_versions row; the same row registered before is accepted as is."""
    existing = repo.get_model_version(engine, version)
    if existing is None:
        try:
            return repo.register_model_version(
                engine,
                version=version,
                trained_through_slot=trained_through_slot,
                path=str(path),
                metrics=metrics,
            )
        except sa.exc.IntegrityError:
            existing = repo.get_model_version(engine, version)

    if existing is None or existing.trained_through_slot != trained_through_slot:
        raise Conflict(
            f"version: {version} cannot be registered as trained through slot "
            f"{trained_through_slot}: that version or slot is already registered differently"
        )
    return existing


def advance_pointer(client: redis.Redis, keys: RedisKeys, version: int) -> int:
    """Move model_current forward to `version` (never back) and announce it; returns the pointer."""
    pointer = int(client.eval(_ADVANCE_POINTER, 1, keys.model_current, str(version)))
    client.publish(keys.model_channel, str(version))
    return pointer


def publish_version(
    *,
    engine: sa.Engine,
    client: redis.Redis,
    keys: RedisKeys,
    store_path: Path,
    version: int,
    model: ServingModel,
    trained_through_slot: int,
    metrics: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> PublishedVersion:
    """Write, register, point to and announce one model version; repeating it is harmless.

    `client` is a synchronous Redis client; an asyncio caller runs this in a thread.
    `write_extra(directory)` may add files (the learner's checkpoint) before the directory is
    renamed into place.
    """
    started = time.perf_counter()
    path = write_version_files(store_path, version, model, write_extra)
    register_version(
        engine,
        version=version,
        trained_through_slot=trained_through_slot,
        path=path,
        metrics=metrics,
    )
    pointer = advance_pointer(client, keys, version)

    publish_ms = (time.perf_counter() - started) * 1e3
    log.info(
        "version %d published (trained through slot %d, %.0f ms)",
        version,
        trained_through_slot,
        publish_ms,
    )
    return PublishedVersion(version, trained_through_slot, path, pointer, publish_ms)
