"""Fixtures shared by the integration tests; each test module defines its own `settings`."""

from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.settings import Settings
from app.storage.db import make_engine
from tests.integration.ingest_support import redis_under, running_app


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A client on the test's Redis prefix; every key under it is deleted afterwards."""
    with redis_under(redis_url, redis_prefix) as client:
        yield client


@pytest.fixture
def engine(migrated_database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(migrated_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def client(settings: Settings, store: redis.Redis) -> Iterator[TestClient]:
    """The real app over the module's `settings`, with its lifespan run."""
    with running_app(settings) as (test_client, _):
        yield test_client
