"""Galleries other than the pipeline's own schema, through the `library:` mapping: other table and column
names with an upsert media_meta (SQLite), a PostgreSQL schema, and a gallery missing a required column,
which every command refuses with the check-db report (exit code 2, no traceback)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from sqlalchemy import create_engine, text

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.export import export_records
from ollama_pipeline.core.runner import Pipeline, run_stage

# A gallery of another design: prefixed tables, its own column names, media_meta unique on (item, name).
OTHER_SCHEMA = """
CREATE TABLE gal_media (item_id INTEGER PRIMARY KEY, file_path TEXT NOT NULL, kind TEXT, w INTEGER, h INTEGER,
                        review_state TEXT, review_score REAL);
CREATE TABLE gal_prompts (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, positive TEXT, negative TEXT);
CREATE TABLE gal_tags (id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE);
CREATE TABLE gal_media_tags (item_id INTEGER NOT NULL, tag_id INTEGER NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
                             score REAL, origin TEXT, PRIMARY KEY (item_id, tag_id));
CREATE TABLE gal_media_meta (item_id INTEGER NOT NULL, name TEXT NOT NULL, body TEXT, changed TEXT,
                             PRIMARY KEY (item_id, name));
"""

OTHER_MAPPING: dict[str, Any] = {
    "prefix": "gal_",
    "columns": {
        "media": {"id": "item_id", "path": "file_path", "type": "kind", "width": "w", "height": "h",
                  "quality_status": "review_state", "quality_score": "review_score"},
        "prompts": {"media_id": "item_id", "prompt": "positive", "negative_prompt": "negative"},
        "tags": {"name": "label"},
        "media_tags": {"media_id": "item_id", "locked": "pinned", "confidence": "score"},
        "media_meta": {"media_id": "item_id", "key": "name", "value": "body", "updated_at": "changed"},
    },
    "tag_origin_column": "origin",
    "values": {"ollama.caption": "text", "ollama.title": "text"},
    "quality_status": {"ok": "fine", "needs_review": "check", "rejected": "hidden"},
}


def _images(root: Path, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img_{i}.png"
        Image.new("RGB", (40 + i, 30), (i * 60 % 256, 90, 140)).save(root / name)
        names.append(name)
    return names


def _config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "ollama_pipeline.yaml"
    path.write_text(yaml.safe_dump(json.loads(settings.model_dump_json(by_alias=True))), encoding="utf-8")
    return path


def test_other_column_names_through_a_mapping_are_read_and_written(
        tmp_path: Path, settings_factory: Callable[..., Settings], capsys: pytest.CaptureFixture[str]) -> None:
    """Prefixed tables with other column names: check-db maps them, stages read and write through them."""
    db = tmp_path / "other.sqlite"
    con = sqlite3.connect(db)
    con.executescript(OTHER_SCHEMA)
    for i, name in enumerate(_images(tmp_path / "media", 3), start=1):
        con.execute("INSERT INTO gal_media (item_id, file_path, kind, w, h) VALUES (?, ?, 'image', 40, 30)", (i, name))
        con.execute("INSERT INTO gal_prompts (item_id, positive, negative) VALUES (?, 'a fox in snow', 'blurry')", (i,))
    con.execute("INSERT INTO gal_tags (label) VALUES ('fox')")
    con.execute("INSERT INTO gal_media_tags (item_id, tag_id, pinned, score, origin) VALUES (1, 1, 1, 1.0, 'human')")
    con.commit()
    settings = settings_factory(f"sqlite:///{db}", library=OTHER_MAPPING)
    config = _config(tmp_path, settings)
    assert cli_main(["--config", str(config), "check-db", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"] == "custom" and report["tables"]["media"]["physical"] == "gal_media"
    assert "path=file_path" in report["tables"]["media"]["reads"]
    assert report["tables"]["media_meta"]["layout"].startswith("upsert")
    assert cli_main(["--config", str(config), "init-db"]) == 0
    capsys.readouterr()

    pipeline = Pipeline.from_settings(settings)
    for stage in ("ollama_caption", "ollama_title", "ollama_tags_normalize", "ollama_quality"):
        outcomes = list(run_stage(pipeline, stage, [1, 2, 3]))
        assert {o.status for o in outcomes} == {"written"}, [o.error for o in outcomes]
    rows = dict(con.execute("SELECT name, body FROM gal_media_meta WHERE item_id = 1").fetchall())
    assert not rows["ollama.caption"].startswith("{")  # plain text, as the mapping asks
    assert json.loads(rows["ollama.quality"])["verdict"] in {"ok", "needs_review", "rejected"}
    assert {r[0] for r in con.execute("SELECT review_state FROM gal_media")} <= {"fine", "check", "hidden"}
    assert con.execute("SELECT pinned, origin FROM gal_media_tags WHERE item_id = 1 AND tag_id = 1").fetchone() == (1, "human")
    assert con.execute("SELECT COUNT(*) FROM gal_media_tags WHERE origin = 'ollama'").fetchone()[0] > 0
    assert set(con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'gal_%' "
                           "AND name NOT LIKE 'ollama_%' AND name NOT LIKE 'sqlite_%'").fetchall()) == set()
    records = list(export_records(pipeline.engine))
    assert [r["media_id"] for r in records] == [1, 2, 3]
    assert records[0]["ollama"]["ollama.caption"]["text"] == rows["ollama.caption"]
    con.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_gallery_in_a_postgresql_schema_is_used_through_the_mapping(
        db_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """Gallery tables in their own PostgreSQL schema; the pipeline's tables stay in its own."""
    admin = create_engine(db_url)
    with admin.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS gallery CASCADE"))
        conn.execute(text("CREATE SCHEMA gallery"))
        conn.execute(text("CREATE TABLE gallery.media (id SERIAL PRIMARY KEY, path TEXT NOT NULL, type TEXT, "
                          "quality_status TEXT, quality_score DOUBLE PRECISION)"))
        conn.execute(text("CREATE TABLE gallery.media_meta (id SERIAL PRIMARY KEY, media_id INTEGER NOT NULL, "
                          "key TEXT NOT NULL, value TEXT, source TEXT, created_at TIMESTAMP)"))
        for name in _images(tmp_path / "media", 2):
            conn.execute(text("INSERT INTO gallery.media (path, type) VALUES (:p, 'image')"), {"p": name})
    try:
        settings = settings_factory(db_url, library={"schema": "gallery"})
        pipeline = Pipeline.from_settings(settings)
        init_db(pipeline.engine)
        outcomes = list(run_stage(pipeline, "ollama_caption", [1, 2]))
        assert {o.status for o in outcomes} == {"written"}, [o.error for o in outcomes]
        again = list(run_stage(pipeline, "ollama_caption", [1, 2], force=True))
        assert all(o.status in {"written", "unchanged"} for o in again)
        with admin.connect() as conn:
            keys = conn.execute(text("SELECT key, source FROM gallery.media_meta WHERE media_id = 1")).fetchall()
            assert ("ollama.caption", "ollama") in keys
            assert conn.execute(text("SELECT to_regclass('public.ollama_stage_results') IS NOT NULL")).scalar()
            assert not conn.execute(text("SELECT to_regclass('public.media') IS NOT NULL")).scalar()
    finally:
        with admin.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS gallery CASCADE"))
        admin.dispose()


def test_a_gallery_missing_a_required_column_stops_every_command_with_the_report(
        tmp_path: Path, settings_factory: Callable[..., Settings], capsys: pytest.CaptureFixture[str]) -> None:
    """media without a path column: check-db, init-db, run and the job commands exit 2 with the fix line."""
    db = tmp_path / "broken.sqlite"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE media (id INTEGER PRIMARY KEY, filename TEXT);"
                      "CREATE TABLE media_meta (id INTEGER PRIMARY KEY, media_id INTEGER, key TEXT, value TEXT);"
                      "INSERT INTO media (id, filename) VALUES (1, 'a.png');")
    con.close()
    config = _config(tmp_path, settings_factory(f"sqlite:///{db}"))
    for argv in (["check-db"], ["init-db"], ["run", "--stages", "caption"], ["process", "--limit", "1"],
                 ["enqueue", "ollama_caption", "1"]):
        code = cli_main(["--config", str(config), *argv])
        captured = capsys.readouterr()
        assert code == 2, argv
        out = captured.out + captured.err
        assert "required column 'path' not found in media" in out, argv
        assert "library.columns.media.path: <the column that holds it>" in out
        assert "ALTER TABLE media ADD COLUMN path TEXT;" in out
        assert "Traceback" not in out
