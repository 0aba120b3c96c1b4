"""Helpers for the ingestion tests: an app over the test Redis and database, and Redis state."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.settings import Settings


@contextmanager
def running_app(settings: Settings) -> Iterator[tuple[TestClient, FastAPI]]:
    """The real app with its lifespan run, answering through an in-process client."""
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app


@contextmanager
def redis_under(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """A client for the test; every key under `prefix` is deleted afterwards."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


def snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` with its content, to show that a request changed nothing."""
    state: dict[str, Any] = {}
    for key in sorted(client.scan_iter(f"{prefix}:*", count=1000)):
        kind = client.type(key)
        if kind == "string":
            state[key] = client.get(key)
        elif kind == "hash":
            state[key] = client.hgetall(key)
        elif kind == "list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == "set":
            state[key] = sorted(client.smembers(key))
        elif kind == "zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            state[key] = client.xrange(key)
    return state
