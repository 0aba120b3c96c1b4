"""SQL engine creation (placeholder until the storage work lands)."""

import sqlalchemy as sa


def make_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_pre_ping=True)
