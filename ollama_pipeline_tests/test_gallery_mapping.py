"""Galleries other than the pipeline's own schema, through the `library:` mapping: other table and column
names with an upsert media_meta (SQLite), a PostgreSQL schema, and a gallery missing a required column,
which every command refuses with the check-db report (exit code 2, no traceback). Two of them with text
and UUID media ids run end to end through Dagster (`ollama-pipeline run`, the new-media sensor, the
export feed in format v2); the web UI shows and re-runs items of text and UUID galleries."""

from __future__ import annotations

import html
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from sqlalchemy import create_engine, text

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.core.config import LibraryConfig, Settings
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


# ---- text and UUID media ids, end to end through Dagster ------------------------------------------------

# A gallery with text ids: prefixed tables, other column names, upsert media_meta (SQLite).
TEXT_ID_SCHEMA = """
CREATE TABLE pic_media (item_key TEXT PRIMARY KEY, file_path TEXT NOT NULL, kind TEXT, w INTEGER, h INTEGER,
                        review_state TEXT, review_score REAL);
CREATE TABLE pic_prompts (id INTEGER PRIMARY KEY, item_key TEXT NOT NULL, positive TEXT, negative TEXT,
                          seed TEXT);
CREATE TABLE pic_tags (id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE);
CREATE TABLE pic_media_tags (item_key TEXT NOT NULL, tag_id INTEGER NOT NULL, pinned INTEGER NOT NULL DEFAULT 0,
                             score REAL, origin TEXT, PRIMARY KEY (item_key, tag_id));
CREATE TABLE pic_media_meta (item_key TEXT NOT NULL, name TEXT NOT NULL, body TEXT, changed TEXT,
                             PRIMARY KEY (item_key, name));
"""
TEXT_ID_MAPPING: dict[str, Any] = {
    "prefix": "pic_",
    "columns": {
        "media": {"id": "item_key", "path": "file_path", "type": "kind", "width": "w", "height": "h",
                  "quality_status": "review_state", "quality_score": "review_score"},
        "prompts": {"media_id": "item_key", "prompt": "positive", "negative_prompt": "negative"},
        "tags": {"name": "label"},
        "media_tags": {"media_id": "item_key", "locked": "pinned", "confidence": "score"},
        "media_meta": {"media_id": "item_key", "key": "name", "value": "body", "updated_at": "changed"},
    },
    "tag_origin_column": "origin",
}
TEXT_IDS = ["0042", "beach-07", "fox-01"]  # "0042" stays text: never the integer 42

# A gallery in its own PostgreSQL schema whose ids are UUIDs; media_meta an append-only log.
UUID_SCHEMA = """
CREATE TABLE {s}.media (id UUID PRIMARY KEY, path TEXT NOT NULL, type TEXT, quality_status TEXT,
                        quality_score DOUBLE PRECISION);
CREATE TABLE {s}.prompts (id SERIAL PRIMARY KEY, media_id UUID NOT NULL REFERENCES {s}.media (id), prompt TEXT,
                          negative_prompt TEXT, seed TEXT);
CREATE TABLE {s}.media_meta (id SERIAL PRIMARY KEY, media_id UUID NOT NULL REFERENCES {s}.media (id),
                             key TEXT NOT NULL, value TEXT, source TEXT, created_at TIMESTAMP);
"""
UUIDS = ["0b8f6a1e-5d2c-4c7e-9a51-2f0d3b7c9e11", "5f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
         "c3d2e1f0-a9b8-4c7d-8e6f-5a4b3c2d1e0f"]
STAGE_COUNT = 8


def _twin_images(root: Path, names: list[str]) -> None:
    """Small PNGs; the first two alike, so the duplicate stage has a candidate to compare."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        color = (200, 80, 40) if i < 2 else (i * 70 % 256, 90, 160)
        image = Image.new("RGB", (48, 36), color)
        image.paste((20, 20, 20), (4 + (i % 2), 4, 20, 20))
        image.save(root / name)


def _cli(config: Path, *argv: str) -> tuple[int, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["--config", str(config), *argv])
    return code, out.getvalue() + err.getvalue()


def _end_to_end(config: Path, settings: Settings, ids: list[str], add_media: Callable[[], list[str]],
                stage_results: Callable[[], list[tuple[Any, str, str]]], emulator: Any, tmp_path: Path) -> None:
    """init-db, an 8-stage `run` through Dagster, the new-media sensor and its run, an unchanged re-run
    (0 model calls), `run --media` with listed ids and a refused range, the export feed (v2, string ids)."""
    from dagster import DagsterInstance, Definitions, build_sensor_context, in_process_executor

    from ollama_pipeline.core.export import EXPORT_SCHEMA_TEXT_IDS
    from ollama_pipeline.core.export_schema import ExportRecord
    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.definitions import defs
    from ollama_pipeline.defs.assets import all_assets
    from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME
    from ollama_pipeline.defs.resources import PipelineResource
    from ollama_pipeline.defs.sensors import new_media_sensor

    code, out = _cli(config, "check-db")
    assert code == 0 and "ids: " in out, out
    assert _cli(config, "init-db")[0] == 0
    code, out = _cli(config, "run")
    assert code == 0, out
    results = stage_results()
    assert len(results) == len(ids) * STAGE_COUNT and {r[2] for r in results} == {"ok"}, results
    assert {r[0] for r in results} == set(ids)

    with DagsterInstance.get() as instance:  # the CLI's instance ($DAGSTER_HOME under tmp_path)
        assert all(key.startswith("h") for key in instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME))
        new = add_media()
        resources = {"pipeline": PipelineResource.for_settings(settings)}
        with build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            tick = new_media_sensor(context)
        assert tick.skip_reason is None and len(tick.run_requests) == 1, tick.skip_reason
        request = tick.run_requests[0]
        assert sorted(request.run_config["ops"]["ollama_library"]["config"]["media_keys"]) == sorted(new)
        buckets = {Partitioning(size=settings.pipeline.partition_size).key_of(i) for i in new}
        assert buckets <= set(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME))
        job = Definitions(assets=all_assets, resources=resources,
                          executor=in_process_executor).resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, asset_selection=request.asset_selection,
                                        run_config=request.run_config, tags=request.tags, raise_on_error=False)
        assert result.success
        assert sorted(r[0] for r in stage_results() if r[2] == "ok") == sorted([*ids, *new] * STAGE_COUNT)
        with build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
            again = new_media_sensor(context)
        assert not again.run_requests and again.skip_reason is not None

    calls = emulator.stats()["model_calls"]
    code, out = _cli(config, "run")
    assert code == 0 and emulator.stats()["model_calls"] == calls, out  # unchanged: no model call
    code, out = _cli(config, "run", "--media", f"{ids[0]},{ids[1]}", "--stages", "caption", "--force")
    assert code == 0 and emulator.stats()["model_calls"] == calls + 2, out
    code, out = _cli(config, "run", "--media", "1-5")
    assert code == 2 and "ranges apply to integer ids" in out and "Traceback" not in out, out

    feed = tmp_path / "feed.jsonl"
    assert _cli(config, "export", "--out", str(feed))[0] == 0
    lines = [json.loads(line) for line in feed.read_text(encoding="utf-8").splitlines()]
    assert [line["media_id"] for line in lines] == sorted([*ids, *new])
    assert {line["schema"] for line in lines} == {EXPORT_SCHEMA_TEXT_IDS}
    assert all(len(line["stages"]) == STAGE_COUNT for line in lines)
    for line in lines:
        ExportRecord.model_validate(line)
    duplicates = lines[[line["media_id"] for line in lines].index(ids[0])]["ollama"]["ollama.duplicate_assist"]
    candidates = [c["media_id"] for c in duplicates["candidates"]]
    assert ids[1] in candidates and all(isinstance(c, str) for c in candidates)


def _new_files(root: Path, count: int) -> list[str]:
    names = [f"new_{i}.png" for i in range(count)]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), (30 + 90 * i, 200, 60)).save(root / name)
    return names


def test_text_ids_in_a_prefixed_sqlite_gallery_run_end_to_end_through_dagster(
        tmp_path: Path, settings_factory: Callable[..., Settings], emulator: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Text ids, prefixed tables, other column names: 8 stages through Dagster, 0 calls on re-run, the
    sensor's new rows, string ids in the export feed v2 and in the duplicate candidates."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    db = tmp_path / "text_ids.sqlite"
    con = sqlite3.connect(db)
    con.executescript(TEXT_ID_SCHEMA)
    files = [f"{key}.png" for key in TEXT_IDS]
    _twin_images(tmp_path / "media", files)
    for key, name in zip(TEXT_IDS, files, strict=True):
        con.execute("INSERT INTO pic_media (item_key, file_path, kind, w, h) VALUES (?, ?, 'image', 48, 36)",
                    (key, name))
        con.execute("INSERT INTO pic_prompts (item_key, positive, negative, seed) VALUES (?, 'a red square', "
                    "'blurry', '77')", (key,))
    con.commit()
    settings = settings_factory(f"sqlite:///{db}", library=TEXT_ID_MAPPING)
    config = _config(tmp_path, settings)

    def add_media() -> list[str]:
        keys = ["zebra-9", "ant-3"]
        for key, name in zip(keys, _new_files(settings.media_root, 2), strict=True):
            con.execute("INSERT INTO pic_media (item_key, file_path, kind) VALUES (?, ?, 'image')", (key, name))
        con.commit()
        return keys

    def stage_results() -> list[tuple[Any, str, str]]:
        return con.execute("SELECT media_id, stage, status FROM ollama_stage_results WHERE stage != 'media'").fetchall()

    _end_to_end(config, settings, TEXT_IDS, add_media, stage_results, emulator, tmp_path)
    assert con.execute("SELECT DISTINCT typeof(media_id) FROM ollama_stage_results").fetchall() == [("text",)]
    assert con.execute("SELECT body FROM pic_media_meta WHERE item_key = '0042' AND name = 'ollama.caption'"
                       ).fetchone() is not None
    con.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_uuid_ids_in_a_postgresql_schema_run_end_to_end_through_dagster(
        db_url: str, tmp_path: Path, settings_factory: Callable[..., Settings], emulator: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """UUID ids in a PostgreSQL schema: 8 stages through Dagster, 0 calls on re-run, the sensor's new
    rows, uuid columns in the pipeline's tables, string ids in the export feed v2."""
    import uuid

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    schema = "gallery_uuid"
    admin = create_engine(db_url)
    files = [f"u{i}.png" for i in range(len(UUIDS))]
    _twin_images(tmp_path / "media", files)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        for statement in UUID_SCHEMA.format(s=schema).split(";"):
            if statement.strip():
                conn.execute(text(statement))
        for media_id, name in zip(UUIDS, files, strict=True):
            conn.execute(text(f"INSERT INTO {schema}.media (id, path, type) VALUES (:i, :p, 'image')"),
                         {"i": media_id, "p": name})
            conn.execute(text(f"INSERT INTO {schema}.prompts (media_id, prompt, negative_prompt, seed) "
                              "VALUES (:i, 'a red square', 'blurry', '77')"), {"i": media_id})
    try:
        settings = settings_factory(db_url, library={"schema": schema})
        config = _config(tmp_path, settings)

        def add_media() -> list[str]:
            keys = [str(uuid.uuid4()) for _ in range(2)]
            with admin.begin() as conn:
                for key, name in zip(keys, _new_files(settings.media_root, 2), strict=True):
                    conn.execute(text(f"INSERT INTO {schema}.media (id, path, type) VALUES (:i, :p, 'image')"),
                                 {"i": key, "p": name})
            return keys

        def stage_results() -> list[tuple[Any, str, str]]:
            with admin.connect() as conn:
                return [(str(r[0]), r[1], r[2]) for r in conn.execute(text(
                    "SELECT media_id, stage, status FROM ollama_stage_results WHERE stage != 'media'"))]

        _end_to_end(config, settings, sorted(UUIDS), add_media, stage_results, emulator, tmp_path)
        with admin.connect() as conn:
            types = set(conn.execute(text(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public' AND "
                "column_name = 'media_id' AND table_name LIKE 'ollama_%'")).scalars())
            assert types == {"uuid"}
            assert conn.execute(text(f"SELECT count(DISTINCT media_id) FROM {schema}.media_meta WHERE "
                                     "key = 'ollama.caption' AND source = 'ollama'")).scalar() == len(UUIDS) + 2
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def test_migration_0005_gives_the_pipeline_tables_text_media_ids_of_a_text_id_gallery(tmp_path: Path) -> None:
    """Pipeline tables made at revision 0002 (integer media_id) beside a text-id gallery: init-db upgrades
    them (0005) to text columns, keeps their rows and the queue's one-active-job index."""
    from alembic import command

    from ollama_pipeline.core.db.engine import make_engine
    from ollama_pipeline.core.db.migrations import alembic_config, current_revision, head_revision

    db = tmp_path / "upgrade.sqlite"
    con = sqlite3.connect(db)
    con.executescript(TEXT_ID_SCHEMA)
    con.close()
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn, gallery_fk=False), "0002")
        conn.execute(text("INSERT INTO ollama_jobs (job_type, media_id, payload, status, priority, attempts, "
                          "max_attempts, created_at, updated_at) VALUES ('ollama_caption', 'fox-01', '{}', "
                          "'queued', 0, 0, 3, '2026-01-01', '2026-01-01')"))
    init_db(engine, LibraryConfig.model_validate(TEXT_ID_MAPPING))
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        types = {row[0]: row[1] for row in conn.execute(text(
            "SELECT m.name, p.type FROM sqlite_master m JOIN pragma_table_info(m.name) p "
            "WHERE m.type = 'table' AND m.name LIKE 'ollama_%' AND p.name = 'media_id'"))}
        assert set(types) == {"ollama_jobs", "ollama_stage_results", "ollama_media_index", "ollama_values",
                              "ollama_tag_links", "ollama_backfill_items"} and set(types.values()) == {"VARCHAR(255)"}
        assert conn.execute(text("SELECT media_id FROM ollama_jobs")).scalar() == "fox-01"
        index = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'uq_ollama_jobs_active'")).scalar()
        assert index is not None and "WHERE" in index
    engine.dispose()


WEB_TEXT_IDS = ["0042", "a/b", "grün-ü"]  # a leading zero, a slash, a non-ASCII character


def _web_client(settings: Settings, tmp_path: Path) -> Any:
    from fastapi.testclient import TestClient

    from ollama_pipeline.app.web.app import create_app

    return TestClient(create_app(settings, thumb_dir=tmp_path / "thumbs"), base_url="http://127.0.0.1")


def test_the_web_ui_shows_and_reruns_items_of_a_text_id_gallery(
        tmp_path: Path, settings_factory: Callable[..., Settings], emulator: Any) -> None:
    """Text ids ("0042", "a/b", "grün-ü") after caption and title: the gallery lists them with captions in
    id order, links escape them, item pages show the values, thumbnails answer, re-run queues a job for
    the text id, and ids the column cannot hold are 404s."""
    from urllib.parse import quote

    from ollama_pipeline.app.web import queries

    db = tmp_path / "web_text_ids.sqlite"
    con = sqlite3.connect(db)
    con.executescript(TEXT_ID_SCHEMA)
    files = [f"t{i}.png" for i in range(len(WEB_TEXT_IDS))]
    _twin_images(tmp_path / "media", files)
    for key, name in zip(WEB_TEXT_IDS, files, strict=True):
        con.execute("INSERT INTO pic_media (item_key, file_path, kind, w, h) VALUES (?, ?, 'image', 48, 36)",
                    (key, name))
    con.commit()
    settings = settings_factory(f"sqlite:///{db}", library=TEXT_ID_MAPPING)
    init_db(create_engine(f"sqlite:///{db}"), LibraryConfig.model_validate(TEXT_ID_MAPPING))
    pipeline = Pipeline.from_settings(settings)
    for stage in ("ollama_caption", "ollama_title"):
        outcomes = list(run_stage(pipeline, stage, WEB_TEXT_IDS))
        assert {o.status for o in outcomes} == {"written"}, [o.error for o in outcomes]
    captions = {key: json.loads(body)["text"] for key, body in con.execute(
        "SELECT item_key, body FROM pic_media_meta WHERE name = 'ollama.caption'")}
    assert set(captions) == set(WEB_TEXT_IDS)

    with _web_client(settings, tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200, page.text
        order = [m.group(1) for m in re.finditer(r'data-media-id="([^"]*)"', page.text)]
        assert [html.unescape(i) for i in order] == sorted(WEB_TEXT_IDS)
        for key in WEB_TEXT_IDS:
            assert f'href="/media/{quote(key, safe="")}"' in page.text
            assert html.escape(captions[key]) in page.text
            item = client.get(f"/media/{quote(key, safe='')}")
            assert item.status_code == 200, item.text
            assert html.escape(captions[key]) in item.text and "ollama.title" in item.text
            thumb = client.get(f"/thumb/{quote(key, safe='')}")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
            assert client.get(f"/image/{quote(key, safe='')}").status_code == 200
            assert client.get(f"/original/{quote(key, safe='')}").status_code == 200
            assert client.get(f"/api/media/{quote(key, safe='')}").json()["media_id"] == key
        assert client.get("/media/a%2Fb.json").json()["media_id"] == "a/b"

        token = client.cookies["op_csrf"]
        answer = client.post("/media/a%2Fb/rerun", data={"stage": "ollama_caption", "csrf_token": token})
        assert answer.status_code == 200 and "queued" in answer.text, answer.text
        assert con.execute("SELECT media_id, status FROM ollama_jobs WHERE job_type = 'ollama_caption'"
                           ).fetchall() == [("a/b", "queued")]
        refused = client.post("/media/a%2Fb/rerun", data={"stage": "ollama_caption"})
        assert refused.status_code == 403
        assert client.get("/queue").text.count('href="/media/a%2Fb"') >= 1

        first = queries.gallery_page(pipeline.engine, queries.GalleryFilters(), limit=1)
        second = queries.gallery_page(pipeline.engine, queries.GalleryFilters(), after=first.next_after, limit=1)
        assert [c.id for c in first.cards + second.cards] == sorted(WEB_TEXT_IDS)[:2]  # "0042" < "a/b"
        assert client.get(f"/?after={quote(first.next_after)}").text.count("data-media-id=") == 2
        for bad in ("/media/missing", "/media/" + "x" * 300, "/media/a%00b", "/thumb/missing", "/image/",
                    "/original/a%00b", "/media/a%2Fb/nothing"):
            response = client.get(bad)
            assert response.status_code == 404, (bad, response.status_code)
    con.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_malformed_uuid_in_a_uuid_gallery_is_a_404(
        db_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """A UUID gallery on PostgreSQL: an item page answers in any UUID spelling; a token that is not a UUID
    (which the uuid column would refuse) is a 404 on every media route, never a 500."""
    schema = "gallery_uuid_web"
    admin = create_engine(db_url)
    _twin_images(tmp_path / "media", ["u0.png"])
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        for statement in UUID_SCHEMA.format(s=schema).split(";"):
            if statement.strip():
                conn.execute(text(statement))
        conn.execute(text(f"INSERT INTO {schema}.media (id, path, type) VALUES (:i, 'u0.png', 'image')"),
                     {"i": UUIDS[0]})
    try:
        settings = settings_factory(db_url, library={"schema": schema})
        init_db(create_engine(db_url), LibraryConfig.model_validate({"schema": schema}))
        with _web_client(settings, tmp_path) as client:
            assert client.get(f"/media/{UUIDS[0].upper()}").status_code == 200
            assert client.get(f"/thumb/{UUIDS[0]}").status_code == 200
            assert f'href="/media/{UUIDS[0]}"' in client.get("/").text
            for bad in ("/media/not-a-uuid", "/media/not-a-uuid.json", "/api/media/1234", "/thumb/zz",
                        "/image/0b8f6a1e-5d2c", "/original/%00", "/?after=not-a-uuid"):
                response = client.get(bad)
                assert response.status_code == (200 if bad.startswith("/?") else 404), (bad, response.status_code)
            token = client.cookies["op_csrf"]
            assert client.post("/media/not-a-uuid/rerun", data={"stage": "all", "csrf_token": token}
                               ).status_code == 404
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()
