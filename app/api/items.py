"""`PUT /v1/items/{item_id}` and `GET /v1/items/{item_id}`: item metadata.

SQL holds the metadata; Redis holds what requests filter on (the hidden set, one set of item ids
per category, and a version counter bumped on every change), so a hidden item disappears from
answers at once. The Redis mirror is written while the SQL row is locked and before the SQL
transaction commits: two writes of one item mirror in the order they commit.
"""

from datetime import datetime
from typing import Annotated, Any

import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from app.api.body import JsonBody
from app.api.deps import EngineDep, KeysDep, ReadAuth, RedisDep, SettingsDep, WriteAuth
from app.errors import InvalidInput, NotFound, Unavailable
from app.keys import RedisKeys
from app.settings import Settings
from app.storage import repo

router = APIRouter(tags=["items"])

MAX_CATEGORIES = 100

ItemIdPath = Annotated[str, Path(description="the item's id, 1 to max_id_chars characters")]


class ItemIn(BaseModel):
    """An item's metadata; a PUT replaces all of it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    categories: list[str] = Field(default_factory=list, max_length=MAX_CATEGORIES)
    hidden: bool = False
    attributes: dict[str, Any] = Field(default_factory=dict)


class ItemOut(BaseModel):
    item_id: str
    categories: list[str]
    hidden: bool
    attributes: dict[str, Any]
    updated_at: datetime


def _item_out(item: repo.ItemRecord) -> ItemOut:
    return ItemOut(
        item_id=item.item_id,
        categories=item.categories,
        hidden=item.hidden,
        attributes=item.attributes,
        updated_at=item.updated_at,
    )


def _check_id(value: str, field: str, settings: Settings) -> str:
    if not value or value.isspace():
        raise InvalidInput(f"{field}: must not be empty")
    if len(value) > settings.max_id_chars:
        raise InvalidInput(f"{field}: longer than {settings.max_id_chars} characters")
    return value


def _parse_item(body: bytes, settings: Settings) -> ItemIn:
    try:
        item = ItemIn.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        raise InvalidInput(f"{field}: {error['msg']}") from exc

    for position, category in enumerate(item.categories):
        _check_id(category, f"categories.{position}", settings)
    # a category listed twice is one category
    item.categories = list(dict.fromkeys(item.categories))
    return item


@router.put("/items/{item_id}", dependencies=[WriteAuth], response_model=ItemOut)
async def put_item(
    item_id: ItemIdPath,
    body: JsonBody,
    settings: SettingsDep,
    redis: RedisDep,
    keys: KeysDep,
    engine: EngineDep,
) -> ItemOut:
    """Create or replace an item's categories, hidden flag and attributes."""
    _check_id(item_id, "item_id", settings)
    item = _parse_item(body, settings)

    conn = await run_in_threadpool(engine.connect)
    try:
        write = await run_in_threadpool(
            repo.upsert_item,
            conn,
            item_id,
            categories=item.categories,
            hidden=item.hidden,
            attributes=item.attributes,
        )
        await _mirror(redis, keys, write)
        await run_in_threadpool(conn.commit)
    except sa.exc.OperationalError as exc:
        raise Unavailable(f"database: {type(exc).__name__}") from exc
    except RedisError as exc:
        raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    finally:
        # closing without a commit rolls the transaction back
        await run_in_threadpool(conn.close)
    return _item_out(write.current)


async def _mirror(redis: aioredis.Redis, keys: RedisKeys, write: repo.ItemWrite) -> None:
    """Bring the item's Redis sets in line with its new metadata, in one transaction."""
    item_id, current = write.current.item_id, write.current
    dropped = set() if write.previous is None else set(write.previous.categories)
    dropped -= set(current.categories)

    pipe = redis.pipeline(transaction=True)
    for category in sorted(dropped):
        pipe.srem(keys.item_category(category), item_id)
    for category in current.categories:
        pipe.sadd(keys.item_category(category), item_id)
    if current.hidden:
        pipe.sadd(keys.items_hidden, item_id)
    else:
        pipe.srem(keys.items_hidden, item_id)
    pipe.incr(keys.items_version)
    await pipe.execute()


@router.get("/items/{item_id}", dependencies=[ReadAuth], response_model=ItemOut)
async def get_item(item_id: ItemIdPath, settings: SettingsDep, engine: EngineDep) -> ItemOut:
    """An item's metadata as last written."""
    _check_id(item_id, "item_id", settings)
    try:
        item = await run_in_threadpool(repo.get_item, engine, item_id)
    except sa.exc.OperationalError as exc:
        raise Unavailable(f"database: {type(exc).__name__}") from exc
    if item is None:
        raise NotFound(f"item_id: no item {item_id!r}")
    return _item_out(item)
