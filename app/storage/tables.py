"""The SQL schema. Tables are created only by the Alembic migrations in `migrations/`."""

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("first_seen_ts", sa.Float, nullable=False),
    sa.Column("last_seen_ts", sa.Float, nullable=False),
    sa.Column("events", sa.Integer, nullable=False, server_default="0"),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", sa.String(128), primary_key=True),
    sa.Column("categories", sa.JSON, nullable=False),
    sa.Column("hidden", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("attributes", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("item_id", sa.String(128), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("type", sa.String(64), nullable=True),
    # the buffer slot the event was stored in; for a late event this is later than slot_of(ts)
    sa.Column("slot_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("late", sa.Boolean, nullable=False, server_default=sa.false()),
    # a user's history in time order, and an item's events (popularity, similar items)
    sa.Index("ix_interactions_user_id_ts", "user_id", "ts"),
    sa.Index("ix_interactions_item_id", "item_id"),
)

# state is one of: open, closed, archived, trained
slots = sa.Table(
    "slots",
    metadata,
    sa.Column("slot_id", sa.BigInteger, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("start_ts", sa.Float, nullable=False),
    sa.Column("end_ts", sa.Float, nullable=False),
    sa.Column("events", sa.Integer, nullable=False, server_default="0"),
    sa.Column("late", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("model_version", sa.Integer, nullable=True),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("trained_through_slot", sa.BigInteger, nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("path", sa.String(512), nullable=False),
    # query-slot and guardrail metrics as the meta-update reported them
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("published", sa.Boolean, nullable=False, server_default=sa.true()),
)
