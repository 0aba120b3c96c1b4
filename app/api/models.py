"""Model versions: the registry, the pointer this fleet follows, and pinning (rollback)."""

from datetime import datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Path, Query
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminAuth, EngineDep, KeysDep, ReadAuth, RedisDep
from app.api.recommendations import ManagerDep
from app.errors import NotFound
from app.keys import RedisKeys
from app.services.serving import ServingManager
from app.storage import repo

router = APIRouter(tags=["models"])


class ModelVersionOut(BaseModel):
    version: int
    trained_through_slot: int
    created_at: datetime
    metrics: dict[str, Any]
    published: bool


class ModelVersionsOut(BaseModel):
    versions: list[ModelVersionOut]


class ModelPointerOut(BaseModel):
    current: int | None  # the newest published version (model_current)
    pinned: int | None  # the version every API process is held to, if any
    served: int | None  # the version this process answers from (None: popularity only)
    served_trained_through_slot: int | None
    following: str  # "pinned" or "newest"


@router.get("/models", dependencies=[ReadAuth], response_model=ModelVersionsOut)
async def list_models(
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, description="only versions older than this")] = None,
) -> ModelVersionsOut:
    """Registered versions, newest first, with the slot each was trained through."""
    records = await run_in_threadpool(
        repo.list_model_versions, engine, limit=limit, before_version=before
    )
    return ModelVersionsOut(
        versions=[
            ModelVersionOut(
                version=record.version,
                trained_through_slot=record.trained_through_slot,
                created_at=record.created_at,
                metrics=record.metrics,
                published=record.published,
            )
            for record in records
        ]
    )


async def _pointer(
    client: aioredis.Redis, keys: RedisKeys, manager: ServingManager
) -> ModelPointerOut:
    current, pinned = await client.mget(keys.model_current, keys.model_pinned)
    served = manager.current
    return ModelPointerOut(
        current=None if current is None else int(current),
        pinned=None if pinned is None else int(pinned),
        served=None if served is None else served.version,
        served_trained_through_slot=None if served is None else served.trained_through_slot,
        following="newest" if pinned is None else "pinned",
    )


@router.get("/models/current", dependencies=[ReadAuth], response_model=ModelPointerOut)
async def get_current_model(
    client: RedisDep, keys: KeysDep, manager: ManagerDep
) -> ModelPointerOut:
    """The newest version, the pin, and the version this process serves right now."""
    return await _pointer(client, keys, manager)


@router.post("/models/{version}/activate", dependencies=[AdminAuth], response_model=ModelPointerOut)
async def activate_model(
    version: Annotated[int, Path(ge=1)],
    client: RedisDep,
    keys: KeysDep,
    engine: EngineDep,
    manager: ManagerDep,
) -> ModelPointerOut:
    """Pin every API process to `version` (a rollback) until the pin is removed."""
    record = await run_in_threadpool(repo.get_model_version, engine, version)
    if record is None:
        raise NotFound(f"version: model version {version} does not exist")
    await client.set(keys.model_pinned, str(version))
    await client.publish(keys.model_channel, "pin")
    return await _pointer(client, keys, manager)


@router.delete("/models/pin", dependencies=[AdminAuth], response_model=ModelPointerOut)
async def unpin_model(client: RedisDep, keys: KeysDep, manager: ManagerDep) -> ModelPointerOut:
    """Remove the pin: every API process follows the newest version again."""
    await client.delete(keys.model_pinned)
    await client.publish(keys.model_channel, "unpin")
    return await _pointer(client, keys, manager)
