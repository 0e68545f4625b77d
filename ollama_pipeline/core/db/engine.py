"""Engines for SQLite (WAL, busy timeout, immediate write transactions) and PostgreSQL, and `init_db`.

The same code runs on both. SQLite write transactions start with BEGIN IMMEDIATE so that two writers
fail fast on the lock (then retried) instead of deadlocking on a read-to-write upgrade.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Column, Connection, Engine, Index, MetaData, Table, create_engine, event, inspect
from sqlalchemy.engine import make_url

from ollama_pipeline.core.config import LibraryConfig
from ollama_pipeline.core.db.models import GALLERY_TABLES, Base
from ollama_pipeline.core.ids import IdType, column_type

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Reads opened with read_connection() take no write lock; everything else may write.
        deferred = conn.get_execution_options().get("ollama_read_only", False)
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


def make_engine(url: str, *, busy_timeout_ms: int = 30_000) -> Engine:
    """A new engine for url; SQLite files get WAL and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # A pool: opening and closing a SQLite connection per transaction cost ~1.5 ms of CPU per item.
        engine = create_engine(url, pool_size=8, max_overflow=24, connect_args={"check_same_thread": False})
        _sqlite_setup(engine, busy_timeout_ms)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def get_engine(url: str, *, busy_timeout_ms: int = 30_000) -> Engine:
    """One engine per URL and process."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, busy_timeout_ms=busy_timeout_ms)
        return engine


def _without_gallery_keys(table: Table, metadata: MetaData, media_id_type: IdType = "integer",
                          dialect: str = "sqlite") -> Table:
    """A copy of one of the pipeline's tables without foreign keys into the gallery (whose media table
    has another name or schema, or ids of another type), its `media_id` of the gallery's id type."""
    id_sql = column_type(media_id_type, dialect)
    copy = Table(table.name, metadata, *[Column(c.name, id_sql if c.name == "media_id" else c.type,
                                                primary_key=c.primary_key, nullable=c.nullable)
                                         for c in table.columns])
    for ix in table.indexes:
        Index(ix.name, *[copy.c[c.name] for c in ix.columns], unique=bool(ix.unique), **ix.dialect_kwargs)
    return copy


def _create(engine_or_conn: Any, tables: list[Table], *, gallery_fk: bool, media_id_type: IdType,
            dialect: str) -> None:
    if gallery_fk and media_id_type == "integer":
        Base.metadata.create_all(engine_or_conn, tables=tables, checkfirst=True)
    else:
        metadata = MetaData()
        metadata.create_all(engine_or_conn, checkfirst=True, tables=[
            _without_gallery_keys(t, metadata, media_id_type, dialect) for t in tables])


def migrate_own_tables(engine: Engine, *, gallery_fk: bool = True, media_id_type: IdType = "integer") -> str | None:
    """Create or upgrade the pipeline's own tables with the numbered Alembic migrations; returns the
    revision the database was at before (None: never migrated, e.g. made by create_all before).
    media_id_type: the gallery's id type, which the pipeline's `media_id` columns take (migration 0005)."""
    from ollama_pipeline.core.db.migrations import (
        alembic_config,
        current_revision,
        head_revision,
        stamp_head,
    )

    existing = set(inspect(engine).get_table_names())
    if not existing & set(MIGRATED_TABLES):  # a fresh database: the models' tables at head, then stamp
        own = [Base.metadata.tables[t] for t in MIGRATED_TABLES if t in Base.metadata.tables]
        with engine.begin() as conn:
            _create(conn, own, gallery_fk=gallery_fk, media_id_type=media_id_type, dialect=engine.dialect.name)
            from ollama_pipeline.core.db.optional import ADDED

            ADDED.create(conn, checkfirst=True)
            stamp_head(conn)
        return None
    with engine.connect() as conn:
        before = current_revision(conn)
    if before == head_revision():
        missing = [Base.metadata.tables[t] for t in MIGRATED_TABLES if t in Base.metadata.tables
                   and t not in existing]
        if missing:  # at head, but a table was dropped by hand: made again as the models say
            _create(engine, missing, gallery_fk=gallery_fk, media_id_type=media_id_type,
                    dialect=engine.dialect.name)
        return before
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn, gallery_fk=gallery_fk, media_id_type=media_id_type), "head")
    return before


def init_db(engine: Engine, library: LibraryConfig | None = None) -> list[str]:
    """Create and upgrade the pipeline's own tables (Alembic migrations); on a database without a gallery,
    also the gallery tables in the pipeline's own schema. Existing gallery tables are used as they are."""
    from ollama_pipeline.core.db.gallery import forget

    library = library or getattr(engine, "_ollama_library", None) or LibraryConfig()
    insp = inspect(engine)
    existing = set(insp.get_table_names())
    media_name = library.tables.get("media") or f"{library.prefix}media"
    gallery_present = media_name in set(insp.get_table_names(schema=library.schema_name))
    plain = media_name == "media" and library.schema_name is None
    if not gallery_present and plain:
        gallery = [t for name, t in Base.metadata.tables.items() if name in GALLERY_TABLES]
        Base.metadata.create_all(engine, tables=gallery, checkfirst=True)
    id_type: IdType = "integer"
    if gallery_present:
        from ollama_pipeline.core.db.gallery import discover

        id_type = discover(engine, library).id_type
    migrate_own_tables(engine, gallery_fk=plain, media_id_type=id_type)
    # Tables of the pipeline that no migration names yet are made as the models say.
    others = [t for name, t in Base.metadata.tables.items()
              if name not in GALLERY_TABLES and name not in MIGRATED_TABLES]
    if others:
        _create(engine, others, gallery_fk=plain, media_id_type=id_type, dialect=engine.dialect.name)
    forget(engine)
    now = set(inspect(engine).get_table_names())
    return [t for t in [*Base.metadata.tables, "ollama_added_columns"] if t not in existing and t in now]


# The tables the Alembic migrations (ollama_pipeline/core/db/migrations/versions) create.
MIGRATED_TABLES = ("ollama_jobs", "ollama_stage_results", "ollama_media_index", "ollama_values", "ollama_tag_links",
                   "ollama_added_columns", "ollama_run_heartbeats", "ollama_backfill_selections",
                   "ollama_backfill_items")


def engine_for_settings(settings: Any) -> Engine:
    """The process-wide engine of the settings' database, bound to its `library:` mapping."""
    engine = get_engine(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
    engine._ollama_library = settings.library  # type: ignore[attr-defined]
    return engine


def read_connection(engine: Engine) -> Connection:
    """A connection for reads only: on SQLite its transaction takes no write lock."""
    return engine.connect().execution_options(ollama_read_only=True)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
