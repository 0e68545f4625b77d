"""The pipeline's tables as main created them before schema discovery: jobs, stage results, media index.

A database that already has them (made by an earlier `init-db` with create_all) is adopted as it is.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _media_fk() -> list[sa.ForeignKeyConstraint]:
    if context.config.attributes.get("gallery_fk", True) and sa.inspect(op.get_bind()).has_table("media"):
        return [sa.ForeignKeyConstraint(["media_id"], ["media.id"], ondelete="CASCADE")]
    return []


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if not insp.has_table("ollama_jobs"):
        op.create_table(
            "ollama_jobs",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("job_type", sa.String(64), nullable=False),
            sa.Column("media_id", sa.Integer(), nullable=False),
            sa.Column("payload", sa.Text(), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("priority", sa.Integer(), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("max_attempts", sa.Integer(), nullable=False),
            sa.Column("lease_until", sa.DateTime()),
            sa.Column("worker", sa.String(128)),
            sa.Column("run_id", sa.String(64)),
            sa.Column("error_channel", sa.String(32)),
            sa.Column("error_code", sa.String(64)),
            sa.Column("error_message", sa.Text()),
            sa.Column("retryable", sa.Boolean()),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
            sa.Column("started_at", sa.DateTime()),
            sa.Column("finished_at", sa.DateTime()),
        )
        op.create_index("ix_ollama_jobs_created_at", "ollama_jobs", ["created_at"])
        op.create_index("ix_ollama_jobs_media_id", "ollama_jobs", ["media_id"])
        op.create_index("ix_ollama_jobs_status_priority", "ollama_jobs", ["status", "priority", "id"])
        op.create_index("uq_ollama_jobs_active", "ollama_jobs", ["job_type", "media_id"], unique=True,
                        sqlite_where=sa.text("status IN ('queued', 'running')"),
                        postgresql_where=sa.text("status IN ('queued', 'running')"))
    if not insp.has_table("ollama_stage_results"):
        op.create_table(
            "ollama_stage_results",
            sa.Column("media_id", sa.Integer(), primary_key=True),
            sa.Column("stage", sa.String(64), primary_key=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("fingerprint", sa.String(64)),
            sa.Column("model", sa.String(255)),
            sa.Column("model_digest", sa.String(128)),
            sa.Column("version", sa.String(128)),
            sa.Column("error_channel", sa.String(32)),
            sa.Column("error_code", sa.String(64)),
            sa.Column("error_message", sa.Text()),
            sa.Column("retryable", sa.Boolean()),
            sa.Column("prompt_eval_count", sa.Integer()),
            sa.Column("eval_count", sa.Integer()),
            sa.Column("total_duration_ms", sa.Float()),
            sa.Column("load_duration_ms", sa.Float()),
            sa.Column("duration_ms", sa.Float()),
            sa.Column("job_id", sa.Integer()),
            sa.Column("run_id", sa.String(64)),
            sa.Column("last_success_at", sa.DateTime()),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
            *_media_fk(),
        )
    if not insp.has_table("ollama_media_index"):
        op.create_table(
            "ollama_media_index",
            sa.Column("media_id", sa.Integer(), primary_key=True),
            sa.Column("content_sha256", sa.String(64), nullable=False),
            sa.Column("dhash", sa.String(16)),
            sa.Column("size_bytes", sa.BigInteger(), nullable=False),
            sa.Column("width", sa.Integer()),
            sa.Column("height", sa.Integer()),
            sa.Column("mtime_ns", sa.BigInteger()),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
            *_media_fk(),
        )
        op.create_index("ix_ollama_media_index_dhash", "ollama_media_index", ["dhash"])


def downgrade() -> None:
    op.drop_table("ollama_media_index")
    op.drop_table("ollama_stage_results")
    op.drop_table("ollama_jobs")
