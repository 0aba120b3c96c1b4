"""Request dependencies: shared resources and API-key checks, as `Annotated` aliases."""

import hmac
from typing import Annotated

import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
from app.keys import RedisKeys
from app.settings import Settings

# The dependencies are `async def` though they never await: FastAPI runs a plain `def` dependency
# on a worker thread, and that hop per dependency costs more than a whole small request.


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _redis(request: Request) -> aioredis.Redis:
    return request.app.state.redis


async def _keys(request: Request) -> RedisKeys:
    return request.app.state.keys


async def _engine(request: Request) -> sa.Engine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(_redis)]
KeysDep = Annotated[RedisKeys, Depends(_keys)]
EngineDep = Annotated[sa.Engine, Depends(_engine)]


def _check_key(presented: str | None, allowed: list[str], *, role: str) -> None:
    if not allowed:
        return
    if presented is None:
        raise Unauthorized(f"missing X-API-Key header: {role} calls need a {role} key")
    # compared as bytes: a header may carry any latin-1 character, compare_digest takes only
    # ASCII strings
    presented_bytes = presented.encode("utf-8", "surrogateescape")
    if not any(hmac.compare_digest(presented_bytes, key.encode()) for key in allowed):
        raise Forbidden(f"the X-API-Key given is not a {role} key")


# The key checks take the bare request rather than a settings dependency and a Header parameter:
# each sub-dependency FastAPI resolves costs a noticeable share of a single-event write.


def _settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def require_write(request: Request) -> None:
    settings = _settings_of(request)
    allowed = settings.write_api_keys + settings.admin_api_keys
    _check_key(request.headers.get("x-api-key"), allowed, role="write")


async def require_read(request: Request) -> None:
    settings = _settings_of(request)
    allowed = settings.read_api_keys
    if allowed:
        allowed = allowed + settings.write_api_keys + settings.admin_api_keys
    _check_key(request.headers.get("x-api-key"), allowed, role="read")


async def require_admin(request: Request) -> None:
    _check_key(request.headers.get("x-api-key"), _settings_of(request).admin_api_keys, role="admin")


WriteAuth = Depends(require_write)
ReadAuth = Depends(require_read)
AdminAuth = Depends(require_admin)
