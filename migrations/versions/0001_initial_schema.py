"""Initial schema: users, items, interactions, slots, model versions.

Revision ID: 0001
Revises:
Create Date: 2024-06-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("first_seen_ts", sa.Float, nullable=False),
        sa.Column("last_seen_ts", sa.Float, nullable=False),
        sa.Column("events", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )

    op.create_table(
        "items",
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("categories", sa.JSON, nullable=False),
        sa.Column("hidden", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_items"),
    )

    op.create_table(
        "interactions",
        sa.Column("id", BIG_ID, nullable=False, autoincrement=True),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("type", sa.String(64), nullable=True),
        sa.Column("slot_id", sa.BigInteger, nullable=False),
        sa.Column("late", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("event_id", name="uq_interactions_event_id"),
    )
    op.create_index("ix_interactions_slot_id", "interactions", ["slot_id"])
    op.create_index("ix_interactions_user_id_ts", "interactions", ["user_id", "ts"])
    op.create_index("ix_interactions_item_id", "interactions", ["item_id"])

    op.create_table(
        "slots",
        sa.Column("slot_id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("start_ts", sa.Float, nullable=False),
        sa.Column("end_ts", sa.Float, nullable=False),
        sa.Column("events", sa.Integer, nullable=False, server_default="0"),
        sa.Column("late", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model_version", sa.Integer, nullable=True),
        sa.PrimaryKeyConstraint("slot_id", name="pk_slots"),
    )
    op.create_index("ix_slots_state", "slots", ["state"])

    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("trained_through_slot", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.PrimaryKeyConstraint("version", name="pk_model_versions"),
        sa.UniqueConstraint("trained_through_slot", name="uq_model_versions_trained_through_slot"),
    )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_index("ix_slots_state", table_name="slots")
    op.drop_table("slots")
    op.drop_index("ix_interactions_item_id", table_name="interactions")
    op.drop_index("ix_interactions_user_id_ts", table_name="interactions")
    op.drop_index("ix_interactions_slot_id", table_name="interactions")
    op.drop_table("interactions")
    op.drop_table("items")
    op.drop_table("users")
