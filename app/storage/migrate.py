"""Running the Alembic migrations from code (`metarec migrate`, `metarec serve`, the tests)."""

import logging
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.storage.db import make_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# PostgreSQL advisory lock id held while migrating, so concurrent starts migrate one at a time
MIGRATION_LOCK_ID = 0x6D65746172


def alembic_config() -> Config:
    """An Alembic config for the `migrations/` folder of this source tree, without an ini file."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(
            f"no Alembic migrations at {MIGRATIONS_DIR}: run metarec from its source tree "
            "(pip install -e .) or a copy of it, such as the Docker image"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(database_url: str) -> str:
    """Bring the database at `database_url` to the newest revision; returns that revision."""
    started = time.perf_counter()
    config = alembic_config()
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            revision = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

    log.info("database at revision %s (%.0f ms)", revision, (time.perf_counter() - started) * 1e3)
    return revision or ""


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return head or ""
