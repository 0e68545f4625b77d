"""Numbered Alembic migrations of the pipeline's own tables (`ollama_*`); run by `init_db`.

The version is kept in `ollama_alembic_version`, so a gallery's own Alembic table is never touched.
Gallery tables are never migrated here: they belong to the gallery (see `init-db --add-optional-columns`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

VERSION_TABLE = "ollama_alembic_version"
HERE = Path(__file__).resolve().parent


def alembic_config(connection: Connection | None = None, *, gallery_fk: bool = True,
                   media_id_type: str = "integer") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    cfg.attributes["gallery_fk"] = gallery_fk  # foreign keys to media.id only when the gallery's media is `media`
    cfg.attributes["media_id_type"] = media_id_type  # the gallery's media.id: integer, text or uuid (0005)
    return cfg


@cache
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@cache
def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None
    return head


def stamp_head(connection: Connection) -> None:
    """Record the head revision for tables just made from the models (Alembic's documented way to build
    an up-to-date database from scratch: create_all, then stamp)."""
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    ctx.stamp(script_directory(), "head")


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
