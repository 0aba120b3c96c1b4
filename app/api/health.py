"""Liveness, readiness and Prometheus metrics; open to every caller, no API key."""

import asyncio
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, KeysDep, RedisDep, SettingsDep
from app.errors import error_body

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready"}})
async def readyz(request: Request, redis: RedisDep, engine: EngineDep) -> Any:
    """Ready when Redis answers, the database answers, and a model (or the popularity fallback)
    is loaded; otherwise 503 naming each part that failed."""
    checks = {
        "redis": await _check(redis.ping()),
        "database": await _check(run_in_threadpool(_select_one, engine)),
        "model": _check_serving(getattr(request.app.state, "serving", None)),
    }
    failed = [f"{name}: {state}" for name, state in checks.items() if state != "ok"]
    if failed:
        body = error_body("not ready: " + "; ".join(failed), "unavailable")
        return JSONResponse({**body, "checks": checks}, status_code=503)
    return {"status": "ready", "checks": checks}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, redis: RedisDep, keys: KeysDep, settings: SettingsDep) -> Any:
    """Prometheus text exposition of this process's metrics."""
    process_metrics = request.app.state.metrics
    try:
        await asyncio.wait_for(
            process_metrics.refresh_slot_gauges(redis, keys, settings), CHECK_TIMEOUT_S
        )
        process_metrics.redis_up.set(1)
    except (RedisError, TimeoutError):
        process_metrics.redis_up.set(0)
    return Response(process_metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _check(awaitable: Any) -> str:
    try:
        await asyncio.wait_for(awaitable, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:  # any failure of the dependency means not ready; say which
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _select_one(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def _check_serving(serving: object) -> str:
    # ready once the serving manager has looked at the model pointer: a version is loaded, or
    # there is none yet and answers come from the popularity fallback
    if getattr(serving, "ready", False):
        return "ok"
    return "no model and no popularity fallback loaded yet"
