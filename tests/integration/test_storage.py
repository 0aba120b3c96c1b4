"""The migrations and the storage verbs, on PostgreSQL and on SQLite."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.storage import repo
from app.storage.db import make_engine
from app.storage.migrate import head_revision, upgrade_to_head
from app.storage.tables import metadata

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(
    request: pytest.FixtureRequest, migrated_database_url: str, tmp_path: Path
) -> Iterator[sa.Engine]:
    if request.param == "postgresql":
        if not migrated_database_url.startswith("postgresql"):
            pytest.skip("no PostgreSQL reachable on 127.0.0.1:5432")
        url = migrated_database_url
    else:
        url = f"sqlite:///{tmp_path / 'metarec.db'}"
        upgrade_to_head(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def tag() -> str:
    """A prefix for this test's ids: the PostgreSQL database is shared by the session."""
    return uuid.uuid4().hex[:10]


def _slot_id() -> int:
    # slot ids below 1e6 belong to this module; the worker and API tests use larger ones
    return int(uuid.uuid4().int % 999_000) + 1_000


def _events(tag: str, count: int, *, slot_id: int, start: int = 0) -> list[repo.InteractionRow]:
    return [
        repo.InteractionRow(
            event_id=f"{tag}-e{i}",
            user_id=f"{tag}-u{i % 3}",
            item_id=f"{tag}-i{i % 5}",
            ts=1_000.0 + i,
            value=0.5 + i % 2,
            type="click" if i % 2 else None,
            slot_id=slot_id,
            late=i % 4 == 0,
        )
        for i in range(start, start + count)
    ]


def test_migrated_schema_matches_the_tables(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, metadata) == []


def test_upgrading_twice_changes_nothing(engine: sa.Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    assert upgrade_to_head(url) == head_revision() == "0001"


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    engine.dispose()


def test_inserting_events_twice_stores_each_once(engine: sa.Engine, tag: str) -> None:
    slot_id = _slot_id()

    assert repo.insert_interactions(engine, _events(tag, 60, slot_id=slot_id)) == 60
    # a re-run over an overlapping batch adds only the 20 unseen events
    assert repo.insert_interactions(engine, _events(tag, 80, slot_id=slot_id)) == 20
    assert repo.insert_interactions(engine, _events(tag, 80, slot_id=slot_id)) == 0
    assert repo.insert_interactions(engine, []) == 0

    assert repo.count_interactions(engine, slot_id) == 80


def test_user_counts_follow_new_events_only(engine: sa.Engine, tag: str) -> None:
    slot_id = _slot_id()
    repo.insert_interactions(engine, _events(tag, 30, slot_id=slot_id))
    repo.insert_interactions(engine, _events(tag, 30, slot_id=slot_id))
    repo.insert_interactions(engine, _events(tag, 30, slot_id=slot_id, start=30))

    # user u1 has events 1, 4, ..., 58: 20 of them, first at 1001, last at 1058
    user = repo.get_user(engine, f"{tag}-u1")
    assert user == repo.UserRecord(f"{tag}-u1", 1_001.0, 1_058.0, 20)
    assert repo.get_user(engine, f"{tag}-nobody") is None


def test_interactions_of_a_slot_come_as_time_ordered_columns(engine: sa.Engine, tag: str) -> None:
    slot_id = _slot_id()
    events = _events(tag, 12, slot_id=slot_id)
    repo.insert_interactions(engine, list(reversed(events)))
    repo.insert_interactions(engine, _events(tag, 3, slot_id=slot_id + 1, start=100))

    columns = repo.interactions_of_slot(engine, slot_id)

    assert len(columns) == 12
    assert columns.event_id == [event.event_id for event in events]
    assert columns.user_id == [event.user_id for event in events]
    assert columns.item_id == [event.item_id for event in events]
    assert columns.ts.dtype == np.float64 and columns.value.dtype == np.float32
    np.testing.assert_allclose(columns.ts, [event.ts for event in events])
    np.testing.assert_allclose(columns.value, [event.value for event in events])
    assert len(repo.interactions_of_slot(engine, slot_id + 2)) == 0


def test_an_item_upsert_returns_what_it_replaced(engine: sa.Engine, tag: str) -> None:
    item_id = f"{tag}-item"
    assert repo.get_item(engine, item_id) is None

    first = repo.upsert_item(
        engine, item_id, categories=["a", "b"], hidden=False, attributes={"year": 1997}
    )
    second = repo.upsert_item(engine, item_id, categories=["b"], hidden=True, attributes={})

    assert first.previous is None
    assert second.previous == first.current
    stored = repo.get_item(engine, item_id)
    assert stored is not None
    assert (stored.categories, stored.hidden, stored.attributes) == (["b"], True, {})
    assert stored.updated_at == second.current.updated_at


def test_an_item_upsert_joins_the_callers_transaction(engine: sa.Engine, tag: str) -> None:
    item_id = f"{tag}-item"
    with pytest.raises(RuntimeError), engine.begin() as conn:
        repo.upsert_item(conn, item_id, categories=["a"], hidden=False, attributes={})
        raise RuntimeError("the caller fails before committing")

    assert repo.get_item(engine, item_id) is None


def test_a_slot_moves_closed_archived_trained(engine: sa.Engine, tag: str) -> None:
    slot_id = _slot_id()
    repo.record_slot_closed(engine, slot_id, slot_seconds=60, events=9, late=1, duplicates=4)
    closed = repo.get_slot(engine, slot_id)
    assert closed is not None
    assert (closed.state, closed.start_ts, closed.end_ts) == (
        "closed",
        slot_id * 60.0,
        slot_id * 60.0 + 60,
    )
    assert (closed.events, closed.late, closed.duplicates) == (9, 1, 4)
    assert closed.closed_at is not None and closed.archived_at is None

    # the archived counts are those of the rows in SQL: 8 events, 2 of them late
    repo.insert_interactions(engine, _events(tag, 8, slot_id=slot_id))
    archived = repo.record_slot_archived(engine, slot_id)
    assert (archived.state, archived.events, archived.late, archived.duplicates) == (
        "archived",
        8,
        2,
        4,
    )
    assert archived.archived_at is not None

    # closing again (a restart before the buffer was dropped) does not move it back
    repo.record_slot_closed(engine, slot_id, slot_seconds=60, events=0, late=0, duplicates=0)
    assert repo.get_slot(engine, slot_id) == archived
    assert slot_id in repo.slot_ids_in_state(engine, "archived")

    repo.record_slot_trained(engine, slot_id, model_version=7)
    trained = repo.get_slot(engine, slot_id)
    assert trained is not None
    assert (trained.state, trained.model_version) == ("trained", 7)
    assert trained.trained_at is not None


def test_slots_are_listed_newest_first_in_pages(engine: sa.Engine) -> None:
    base = _slot_id()
    for slot_id in range(base, base + 5):
        repo.record_slot_closed(engine, slot_id, slot_seconds=60, events=1, late=0, duplicates=0)

    first_page = repo.list_slots(engine, limit=2, before_slot_id=base + 5)
    second_page = repo.list_slots(engine, limit=2, before_slot_id=first_page[-1].slot_id)

    assert [slot.slot_id for slot in first_page] == [base + 4, base + 3]
    assert [slot.slot_id for slot in second_page] == [base + 2, base + 1]
    closed = repo.list_slots(engine, limit=1000, state="closed", before_slot_id=base + 5)
    assert {slot.slot_id for slot in closed} >= set(range(base, base + 5))


def test_model_versions_register_once_and_list_newest_first(engine: sa.Engine) -> None:
    base = _slot_id()
    for version in (base + 1, base + 2, base + 3):
        repo.register_model_version(
            engine,
            version=version,
            trained_through_slot=version,
            path=f"/models/v{version:06d}",
            metrics={"recall_at_20": 0.25},
        )

    assert repo.next_model_version(engine) >= base + 4
    listed = repo.list_model_versions(engine, before_version=base + 4, limit=3)
    assert [record.version for record in listed] == [base + 3, base + 2, base + 1]
    second = repo.get_model_version(engine, base + 2)
    assert second is not None
    assert (second.trained_through_slot, second.metrics, second.published) == (
        base + 2,
        {"recall_at_20": 0.25},
        True,
    )
    assert repo.get_model_version(engine, -1) is None
    with pytest.raises(sa.exc.IntegrityError):
        repo.register_model_version(
            engine, version=base + 2, trained_through_slot=-base, path="/x", metrics={}
        )


def test_the_first_model_version_is_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    assert repo.next_model_version(engine) == 1
    assert repo.list_model_versions(engine) == []
    engine.dispose()
