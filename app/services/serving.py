"""The served model snapshot and its hot swap (placeholder until the serving work lands)."""

from typing import Any

from fastapi import FastAPI

from app.settings import Settings


async def start_serving(app: FastAPI, settings: Settings) -> Any:
    return None


async def stop_serving(app: FastAPI) -> None:
    return None
