"""Run heartbeats: one row per pipeline run (a Dagster run or a CLI run), renewed while it works, so a run
killed with SIGKILL is found by its stopped heartbeat (core.queue.heartbeats). Before this revision the
table was made on first use outside the migrations; a database that has it already keeps it as it is.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("ollama_run_heartbeats"):
        return
    op.create_table(
        "ollama_run_heartbeats",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer()),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("reason", sa.Text()),
    )
    op.create_index("ix_ollama_run_heartbeats_heartbeat_at", "ollama_run_heartbeats", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_ollama_run_heartbeats_heartbeat_at", table_name="ollama_run_heartbeats")
    op.drop_table("ollama_run_heartbeats")
