"""Opening and closing what an API process holds: Redis, the SQL engine, the model snapshot."""

import redis.asyncio as aioredis
from fastapi import FastAPI

from app.keys import RedisKeys
from app.settings import Settings
from app.storage.db import make_engine


async def open_resources(app: FastAPI, settings: Settings) -> None:
    from app.services.serving import start_serving

    if not settings.redis_url:
        raise RuntimeError(
            "METAREC_REDIS_URL is not set: start the API with `metarec serve`, which starts an "
            "embedded Redis when no URL is given"
        )
    app.state.redis = aioredis.from_url(settings.redis_url, decode_responses=True)
    app.state.keys = RedisKeys(settings.redis_prefix)
    app.state.engine = make_engine(settings.resolved_database_url)
    app.state.serving = await start_serving(app, settings)


async def close_resources(app: FastAPI) -> None:
    from app.services.serving import stop_serving

    await stop_serving(app)
    await app.state.redis.aclose()
    app.state.engine.dispose()
