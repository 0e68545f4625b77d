"""Alembic environment: runs on the connection that `init_db` passes in (no alembic.ini, no URL here)."""

from __future__ import annotations

from alembic import context

from ollama_pipeline.core.db.migrations import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
