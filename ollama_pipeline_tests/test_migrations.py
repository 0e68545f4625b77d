"""The pipeline's own tables by numbered Alembic migrations: an upgrade from the schema that init-db made
before migrations existed keeps every row and ends at head; optional gallery columns are added only on
request, shown first with --sql, and removed again exactly."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import inspect

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.migrations import current_revision, head_revision
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline_tests.localsupervisor_schema import create_localsupervisor_db, snapshot
from ollama_pipeline_tests.test_gallery_mapping import _config

BEFORE = Path(__file__).resolve().parent / "data" / "schema_before_migrations.sql"


def test_upgrade_from_the_schema_before_migrations_keeps_rows_and_reaches_head(
        tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """A database made by the old init-db (no version table) is adopted and upgraded; its data stays."""
    from PIL import Image

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(BEFORE.read_text(encoding="utf-8"))
    (tmp_path / "media").mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "media" / "a.png")
    con.execute("INSERT INTO media (id, path, type, has_nsfw, status, created_at, updated_at) "
                "VALUES (1, 'a.png', 'image', 0, 'active', '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    con.execute("INSERT INTO media_meta (media_id, key, value, updated_at) VALUES (1, 'exif.camera', "
                "'\"X100\"', '2025-01-01 00:00:00')")
    con.execute("INSERT INTO ollama_stage_results (media_id, stage, status, updated_at) "
                "VALUES (1, 'ollama_caption', 'failed', '2025-01-01 00:00:00')")
    con.commit()
    con.close()
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert current_revision(conn) is None
    init_db(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"ollama_values", "ollama_tag_links", "ollama_added_columns", "ollama_alembic_version"} <= tables
    con = sqlite3.connect(db)
    assert con.execute("SELECT key, value FROM media_meta").fetchall() == [("exif.camera", '"X100"')]
    assert con.execute("SELECT status FROM ollama_stage_results").fetchall() == [("failed",)]
    con.close()
    pipeline = Pipeline.from_settings(settings_factory(f"sqlite:///{db}"))
    (outcome,) = run_stage(pipeline, "ollama_caption", [1])
    assert outcome.status == "written", outcome.error
    init_db(engine)  # at head: nothing to do


def test_optional_columns_are_added_on_request_shown_with_sql_and_removed_again(
        tmp_path: Path, settings_factory: Callable[..., Settings], capsys: pytest.CaptureFixture[str]) -> None:
    """init-db --add-optional-columns --sql prints ALTERs; applying and dropping them restores the schema."""
    db = tmp_path / "ls.sqlite"
    settings = settings_factory(f"sqlite:///{db}")
    create_localsupervisor_db(db, settings.media_root, 2)
    config = _config(tmp_path, settings)
    before = snapshot(db)
    assert cli_main(["--config", str(config), "init-db", "--add-optional-columns", "--sql"]) == 0
    sql = capsys.readouterr().out
    assert 'ALTER TABLE "media_tags" ADD COLUMN "weight" REAL;' in sql
    assert 'ALTER TABLE "media" ADD COLUMN "updated_at" TEXT;' in sql
    assert snapshot(db) == before  # --sql changes nothing
    assert cli_main(["--config", str(config), "init-db", "--add-optional-columns"]) == 0
    capsys.readouterr()
    assert "weight" in snapshot(db)["media_tags"][0]
    assert cli_main(["--config", str(config), "init-db", "--drop-optional-columns"]) == 0
    capsys.readouterr()
    assert snapshot(db) == before


def _at_revision(db: Path, revision: str) -> None:
    """A database with the pipeline's own tables at an older revision, as that release's init-db left it."""
    from alembic import command

    from ollama_pipeline.core.db.migrations import alembic_config

    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn, gallery_fk=False), revision)
    engine.dispose()


@pytest.mark.parametrize("made_on_first_use", [False, True])
def test_upgrade_from_0002_creates_run_heartbeats_or_keeps_the_one_made_on_first_use(
        tmp_path: Path, made_on_first_use: bool) -> None:
    """From revision 0002, init-db reaches head with ollama_run_heartbeats; a table made earlier keeps its rows."""
    db = tmp_path / "at0002.sqlite"
    _at_revision(db, "0002")
    if made_on_first_use:  # the table as heartbeats.py made it outside the migrations, with one run in it
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE ollama_run_heartbeats (run_id VARCHAR(64) NOT NULL PRIMARY KEY, status "
                    "VARCHAR(16) NOT NULL, host VARCHAR(255), pid INTEGER, interval_s FLOAT NOT NULL, started_at "
                    "DATETIME NOT NULL, heartbeat_at DATETIME NOT NULL, ended_at DATETIME, reason TEXT)")
        con.execute("INSERT INTO ollama_run_heartbeats VALUES ('r1', 'ended', 'h', 1, 10.0, "
                    "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:01', NULL)")
        con.commit()
        con.close()
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert current_revision(conn) == "0002"
    init_db(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    columns = {c["name"] for c in inspect(engine).get_columns("ollama_run_heartbeats")}
    assert columns == {"run_id", "status", "host", "pid", "interval_s", "started_at", "heartbeat_at", "ended_at",
                       "reason"}
    con = sqlite3.connect(db)
    rows = con.execute("SELECT run_id, status FROM ollama_run_heartbeats").fetchall()
    con.close()
    assert rows == ([("r1", "ended")] if made_on_first_use else [])
    engine.dispose()


def test_run_heartbeats_migration_downgrades_to_0002(tmp_path: Path) -> None:
    """Downgrading head to 0002 drops ollama_run_heartbeats and nothing else of the pipeline's."""
    from alembic import command

    from ollama_pipeline.core.db.migrations import alembic_config

    db = tmp_path / "down.sqlite"
    _at_revision(db, "0003")
    engine = make_engine(f"sqlite:///{db}")
    assert "ollama_run_heartbeats" in inspect(engine).get_table_names()
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn, gallery_fk=False), "0002")
    tables = set(inspect(engine).get_table_names())
    assert "ollama_run_heartbeats" not in tables
    assert {"ollama_jobs", "ollama_values", "ollama_tag_links"} <= tables
    engine.dispose()
