"""Database URL handling (no database needed)."""

import pytest

from app.storage.db import normalise_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/metarec", "postgresql+psycopg://u:p@db:5432/metarec"),
        ("postgres://u@db/metarec", "postgresql+psycopg://u@db/metarec"),
        ("postgresql+psycopg://u@db/metarec", "postgresql+psycopg://u@db/metarec"),
        ("sqlite:///var/metarec.db", "sqlite:///var/metarec.db"),
    ],
)
def test_postgres_urls_get_the_psycopg_driver(given: str, expected: str) -> None:
    assert normalise_url(given) == expected
