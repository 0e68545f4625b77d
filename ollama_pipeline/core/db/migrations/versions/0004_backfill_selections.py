"""Targeted backfills (core.backfill): a stored selection per `ollama-pipeline backfill --where ...` and its
member items, which the Dagster runs of that backfill restrict their partitions to.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if not insp.has_table("ollama_backfill_selections"):
        op.create_table(
            "ollama_backfill_selections",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("where_text", sa.Text(), nullable=False),
            sa.Column("stages", sa.Text(), nullable=False),
            sa.Column("items", sa.Integer(), nullable=False),
            sa.Column("partitions", sa.Integer(), nullable=False),
            sa.Column("backfill_id", sa.String(64)),
            sa.Column("source", sa.String(16), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        )
    if not insp.has_table("ollama_backfill_items"):
        op.create_table(
            "ollama_backfill_items",
            sa.Column("selection_id", sa.String(32), primary_key=True),
            sa.Column("media_id", sa.Integer(), primary_key=True),
        )


def downgrade() -> None:
    op.drop_table("ollama_backfill_items")
    op.drop_table("ollama_backfill_selections")
