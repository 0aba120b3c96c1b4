"""The FastAPI application factory.

Routers live one per domain in this package; shared resources (Redis client, SQL engine, the
served model snapshot) are created in the lifespan and hung on `app.state`.
"""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.errors import install_error_handlers
from app.metrics import install_metrics
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.api.resources import close_resources, open_resources

        await open_resources(app, settings)
        # what start-up allocated (imports, torch, the model) lives as long as the process: keep
        # it out of the collector's full passes, which would otherwise pause requests ~100 ms
        gc.freeze()
        try:
            yield
        finally:
            await close_resources(app)

    app = FastAPI(title="metarec", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    install_metrics(app)
    _include_routers(app)
    return app


def _include_routers(app: FastAPI) -> None:
    from app.api import events, health, items, models, recommendations, slots

    app.include_router(health.router)
    app.include_router(events.router, prefix="/v1")
    app.include_router(items.router, prefix="/v1")
    app.include_router(slots.router, prefix="/v1")
    app.include_router(recommendations.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
