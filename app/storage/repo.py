"""The service verbs over the SQL tables, for PostgreSQL and SQLite alike.

Every verb takes a `bind`: an Engine (the verb runs in a transaction of its own) or a Connection
(the verb joins the caller's transaction, so several verbs commit or roll back together).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from app.storage.tables import interactions, items, model_versions, slots, users

Bind = sa.Engine | sa.Connection
SLOT_STATES = ("open", "closed", "archived", "trained")


@contextmanager
def _transaction(bind: Bind) -> Iterator[sa.Connection]:
    if isinstance(bind, sa.Connection):
        yield bind
        return
    with bind.begin() as conn:
        yield conn


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    """An INSERT of the connection's dialect, which knows ON CONFLICT."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported SQL dialect {conn.dialect.name!r}: use PostgreSQL or SQLite")


def _utc(moment: datetime | None) -> datetime | None:
    """Datetimes in UTC; SQLite hands them back without a zone, and every stored one is UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


# items


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    categories: list[str]
    hidden: bool
    attributes: dict[str, Any]
    updated_at: datetime


@dataclass(frozen=True)
class ItemWrite:
    """What an item upsert changed: `previous` is None when the item is new."""

    previous: ItemRecord | None
    current: ItemRecord


def _item_record(row: sa.Row[Any]) -> ItemRecord:
    return ItemRecord(
        item_id=row.item_id,
        categories=list(row.categories),
        hidden=bool(row.hidden),
        attributes=dict(row.attributes),
        updated_at=_utc(row.updated_at) or _now(),
    )


def get_item(bind: Bind, item_id: str) -> ItemRecord | None:
    with _transaction(bind) as conn:
        row = conn.execute(sa.select(items).where(items.c.item_id == item_id)).first()
    return None if row is None else _item_record(row)


def upsert_item(
    bind: Bind,
    item_id: str,
    *,
    categories: Sequence[str],
    hidden: bool,
    attributes: dict[str, Any],
) -> ItemWrite:
    """Create or replace an item's metadata, returning what it was before.

    The row is locked first (a placeholder insert, then SELECT ... FOR UPDATE; on SQLite the
    insert takes the database write lock), so concurrent writes of one item are serialised
    until the caller's transaction ends and `previous` is always the committed state.
    """
    now = _now()
    with _transaction(bind) as conn:
        placeholder = {
            "item_id": item_id,
            "categories": [],
            "hidden": False,
            "attributes": {},
            "updated_at": now,
        }
        created = conn.execute(
            _insert(conn, items)
            .values(placeholder)
            .on_conflict_do_nothing(index_elements=["item_id"])
            .returning(items.c.item_id)
        ).first()
        previous = None
        if created is None:
            locked = sa.select(items).where(items.c.item_id == item_id).with_for_update()
            previous = _item_record(conn.execute(locked).one())

        current = ItemRecord(item_id, list(categories), hidden, dict(attributes), now)
        conn.execute(
            sa.update(items)
            .where(items.c.item_id == item_id)
            .values(
                categories=current.categories,
                hidden=current.hidden,
                attributes=current.attributes,
                updated_at=current.updated_at,
            )
        )
    return ItemWrite(previous, current)


# interactions and users


@dataclass(frozen=True)
class InteractionRow:
    event_id: str
    user_id: str
    item_id: str
    ts: float
    value: float
    type: str | None
    slot_id: int
    late: bool = False


def insert_interactions(bind: Bind, rows: Sequence[InteractionRow]) -> int:
    """Insert events once each (a known event_id is skipped); returns how many were new.

    The users of the new rows are upserted in the same transaction from the new rows only, so
    a re-run over the same events changes neither table.
    """
    if not rows:
        return 0
    with _transaction(bind) as conn:
        statement = (
            _insert(conn, interactions)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(interactions.c.user_id, interactions.c.ts)
        )
        new_rows = conn.execute(statement, [row.__dict__ for row in rows]).all()
        _upsert_users(conn, new_rows)
    return len(new_rows)


@dataclass
class _UserDelta:
    first_seen_ts: float
    last_seen_ts: float
    events: int = field(default=0)


def _upsert_users(conn: sa.Connection, new_rows: Sequence[sa.Row[Any]]) -> None:
    deltas: dict[str, _UserDelta] = {}
    for row in new_rows:
        user_id, ts = row.user_id, float(row.ts)
        delta = deltas.setdefault(user_id, _UserDelta(ts, ts))
        delta.first_seen_ts = min(delta.first_seen_ts, ts)
        delta.last_seen_ts = max(delta.last_seen_ts, ts)
        delta.events += 1
    if not deltas:
        return

    statement = _insert(conn, users)
    new = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=["user_id"],
        set_={
            "events": users.c.events + new.events,
            "first_seen_ts": sa.case(
                (new.first_seen_ts < users.c.first_seen_ts, new.first_seen_ts),
                else_=users.c.first_seen_ts,
            ),
            "last_seen_ts": sa.case(
                (new.last_seen_ts > users.c.last_seen_ts, new.last_seen_ts),
                else_=users.c.last_seen_ts,
            ),
        },
    )
    # sorted, so that two writers lock PostgreSQL rows in the same order
    params = [{"user_id": user_id, **deltas[user_id].__dict__} for user_id in sorted(deltas)]
    conn.execute(statement, params)


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    first_seen_ts: float
    last_seen_ts: float
    events: int


def get_user(bind: Bind, user_id: str) -> UserRecord | None:
    with _transaction(bind) as conn:
        row = conn.execute(sa.select(users).where(users.c.user_id == user_id)).first()
    return None if row is None else UserRecord(**row._asdict())


@dataclass(frozen=True)
class InteractionColumns:
    """One slot's events as columns, in time order: what the learner reads.

    `ts` is unix seconds (float64), `value` the event weight (float32).
    """

    event_id: list[str]
    user_id: list[str]
    item_id: list[str]
    ts: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.event_id)


def interactions_of_slot(bind: Bind, slot_id: int) -> InteractionColumns:
    """The events archived into buffer slot `slot_id` (late arrivals included)."""
    query = (
        sa.select(
            interactions.c.event_id,
            interactions.c.user_id,
            interactions.c.item_id,
            interactions.c.ts,
            interactions.c.value,
        )
        .where(interactions.c.slot_id == slot_id)
        .order_by(interactions.c.ts, interactions.c.event_id)
    )
    with _transaction(bind) as conn:
        rows = conn.execute(query).all()

    return InteractionColumns(
        event_id=[row.event_id for row in rows],
        user_id=[row.user_id for row in rows],
        item_id=[row.item_id for row in rows],
        ts=np.fromiter((row.ts for row in rows), dtype=np.float64, count=len(rows)),
        value=np.fromiter((row.value for row in rows), dtype=np.float32, count=len(rows)),
    )


def count_interactions(bind: Bind, slot_id: int | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(interactions)
    if slot_id is not None:
        query = query.where(interactions.c.slot_id == slot_id)
    with _transaction(bind) as conn:
        return int(conn.execute(query).scalar_one())


# slots


@dataclass(frozen=True)
class SlotRecord:
    slot_id: int
    state: str
    start_ts: float
    end_ts: float
    events: int
    late: int
    duplicates: int
    closed_at: datetime | None
    archived_at: datetime | None
    trained_at: datetime | None
    model_version: int | None


def _slot_record(row: sa.Row[Any]) -> SlotRecord:
    values = row._asdict()
    for column in ("closed_at", "archived_at", "trained_at"):
        values[column] = _utc(values[column])
    return SlotRecord(**values)


def record_slot_closed(
    bind: Bind,
    slot_id: int,
    *,
    slot_seconds: int,
    events: int,
    late: int,
    duplicates: int,
) -> None:
    """Record that a slot closed with the buffer's counters; a later state is left as it is."""
    with _transaction(bind) as conn:
        statement = _insert(conn, slots).values(
            slot_id=slot_id,
            state="closed",
            start_ts=float(slot_id * slot_seconds),
            end_ts=float((slot_id + 1) * slot_seconds),
            events=events,
            late=late,
            duplicates=duplicates,
            closed_at=_now(),
        )
        new = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=["slot_id"],
            set_={"events": new.events, "late": new.late, "duplicates": new.duplicates},
            where=slots.c.state.in_(("open", "closed")),
        )
        conn.execute(statement)


def record_slot_archived(bind: Bind, slot_id: int) -> SlotRecord:
    """Mark a recorded slot archived (unless already later), counting its events from the
    archived rows themselves; `duplicates` keeps the buffer's count from `record_slot_closed`."""
    counts = sa.select(
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(sa.case((interactions.c.late, 1), else_=0)), 0),
    ).where(interactions.c.slot_id == slot_id)
    with _transaction(bind) as conn:
        events, late = conn.execute(counts).one()
        conn.execute(
            sa.update(slots).where(slots.c.slot_id == slot_id).values(events=events, late=late)
        )
        conn.execute(
            sa.update(slots)
            .where(slots.c.slot_id == slot_id, slots.c.state.in_(("open", "closed")))
            .values(state="archived", archived_at=_now())
        )
        row = conn.execute(sa.select(slots).where(slots.c.slot_id == slot_id)).one()
    return _slot_record(row)


def record_slot_trained(bind: Bind, slot_id: int, *, model_version: int | None) -> None:
    with _transaction(bind) as conn:
        conn.execute(
            sa.update(slots)
            .where(slots.c.slot_id == slot_id, slots.c.state == "archived")
            .values(state="trained", trained_at=_now(), model_version=model_version)
        )


def get_slot(bind: Bind, slot_id: int) -> SlotRecord | None:
    with _transaction(bind) as conn:
        row = conn.execute(sa.select(slots).where(slots.c.slot_id == slot_id)).first()
    return None if row is None else _slot_record(row)


def list_slots(
    bind: Bind,
    *,
    limit: int = 100,
    before_slot_id: int | None = None,
    state: str | None = None,
) -> list[SlotRecord]:
    """Recorded slots, newest first; `before_slot_id` (exclusive) pages back in time."""
    query = sa.select(slots).order_by(slots.c.slot_id.desc()).limit(limit)
    if before_slot_id is not None:
        query = query.where(slots.c.slot_id < before_slot_id)
    if state is not None:
        query = query.where(slots.c.state == state)
    with _transaction(bind) as conn:
        return [_slot_record(row) for row in conn.execute(query)]


def slot_ids_in_state(bind: Bind, state: str, *, limit: int | None = None) -> list[int]:
    """Ids of the slots in `state`, oldest first."""
    query = sa.select(slots.c.slot_id).where(slots.c.state == state).order_by(slots.c.slot_id)
    if limit is not None:
        query = query.limit(limit)
    with _transaction(bind) as conn:
        return [int(slot_id) for slot_id in conn.execute(query).scalars()]


# model versions


@dataclass(frozen=True)
class ModelVersionRecord:
    version: int
    trained_through_slot: int
    created_at: datetime
    path: str
    metrics: dict[str, Any]
    published: bool


def _model_version_record(row: sa.Row[Any]) -> ModelVersionRecord:
    return ModelVersionRecord(
        version=row.version,
        trained_through_slot=row.trained_through_slot,
        created_at=_utc(row.created_at) or _now(),
        path=row.path,
        metrics=dict(row.metrics),
        published=bool(row.published),
    )


def next_model_version(bind: Bind) -> int:
    with _transaction(bind) as conn:
        newest = conn.execute(sa.select(sa.func.max(model_versions.c.version))).scalar_one()
    return 1 if newest is None else int(newest) + 1


def register_model_version(
    bind: Bind,
    *,
    version: int,
    trained_through_slot: int,
    path: str,
    metrics: dict[str, Any],
    published: bool = True,
) -> ModelVersionRecord:
    """Record a saved model; a version or slot registered before raises IntegrityError."""
    record = ModelVersionRecord(
        version=version,
        trained_through_slot=trained_through_slot,
        created_at=_now(),
        path=path,
        metrics=metrics,
        published=published,
    )
    with _transaction(bind) as conn:
        conn.execute(sa.insert(model_versions).values(record.__dict__))
    return record


def get_model_version(bind: Bind, version: int) -> ModelVersionRecord | None:
    query = sa.select(model_versions).where(model_versions.c.version == version)
    with _transaction(bind) as conn:
        row = conn.execute(query).first()
    return None if row is None else _model_version_record(row)


def get_model_version_for_slot(bind: Bind, slot_id: int) -> ModelVersionRecord | None:
    """The version trained through `slot_id`, if one is registered (at most one can be)."""
    query = sa.select(model_versions).where(model_versions.c.trained_through_slot == slot_id)
    with _transaction(bind) as conn:
        row = conn.execute(query).first()
    return None if row is None else _model_version_record(row)


def list_model_versions(
    bind: Bind, *, limit: int = 100, before_version: int | None = None
) -> list[ModelVersionRecord]:
    """Registered versions, newest first; `before_version` (exclusive) pages back."""
    query = sa.select(model_versions).order_by(model_versions.c.version.desc()).limit(limit)
    if before_version is not None:
        query = query.where(model_versions.c.version < before_version)
    with _transaction(bind) as conn:
        return [_model_version_record(row) for row in conn.execute(query)]
