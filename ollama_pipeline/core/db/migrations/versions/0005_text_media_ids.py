"""Text and UUID media ids: the pipeline's `media_id` columns take the type of the gallery's `media.id`.

A gallery whose ids are text or UUIDs (`library.id_type`, else the reflected type of its id column) gets
`media_id` columns of text (SQLite, and PostgreSQL for text ids) or `uuid` (PostgreSQL, UUID ids) in
ollama_jobs, ollama_stage_results, ollama_media_index, ollama_values, ollama_tag_links and
ollama_backfill_items, so that their
joins with the gallery compare equal types. Integer galleries are left as they are. Rows of such a table
made before (integer ids, which cannot name an item of a UUID gallery) are dropped on PostgreSQL; on
SQLite and for text ids they are kept as their text.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import context, op

from ollama_pipeline.core.ids import column_type, id_type_of

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("ollama_jobs", "ollama_stage_results", "ollama_media_index", "ollama_values", "ollama_tag_links",
          "ollama_backfill_items")
_ACTIVE = sa.text("status IN ('queued', 'running')")


def _retype(to: sa.types.TypeEngine, using: str, *, clear: bool) -> None:
    bind = op.get_bind()
    insp = sa.inspect(bind)
    for name in TABLES:
        if not insp.has_table(name):
            continue
        current = {c["name"]: c["type"] for c in insp.get_columns(name)}.get("media_id")
        if current is None or (id_type_of(current) == "integer") == (id_type_of(to) == "integer"):
            continue
        partial = name == "ollama_jobs" and any(ix["name"] == "uq_ollama_jobs_active" for ix in insp.get_indexes(name))
        if partial:
            op.drop_index("uq_ollama_jobs_active", table_name=name)
        if clear and bind.dialect.name == "postgresql":
            op.execute(sa.text(f"DELETE FROM {name}"))
        with op.batch_alter_table(name) as batch:
            batch.alter_column("media_id", type_=to, existing_type=current, existing_nullable=False,
                               postgresql_using=f"media_id::{using}")
        if partial:
            op.create_index("uq_ollama_jobs_active", name, ["job_type", "media_id"], unique=True,
                            sqlite_where=_ACTIVE, postgresql_where=_ACTIVE)


def upgrade() -> None:
    id_type = context.config.attributes.get("media_id_type", "integer")
    if id_type == "integer":
        return
    dialect = op.get_bind().dialect.name
    to = column_type(id_type, dialect)
    uuid = id_type == "uuid" and dialect == "postgresql"
    _retype(to, "text::uuid" if uuid else "text", clear=uuid)


def downgrade() -> None:
    if context.config.attributes.get("media_id_type", "integer") == "integer":
        return
    _retype(sa.Integer(), "text::integer", clear=True)  # text ids are no integers: their rows go
