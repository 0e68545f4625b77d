"""The LocalSupervisor profile: its own schema (plain SQL from its schema as facts), recognised by check-db,
a full 8-stage run that writes only what the profile allows, in the forms its web UI reads, append-only
media_meta with history, both tag locks, and human edits kept."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline_tests.localsupervisor_schema import create_localsupervisor_db, snapshot

# What LocalSupervisor's web UI reads from media_meta (newest row per key, `ORDER BY id DESC LIMIT 1`,
# ignoring source), and in which form: WWW/media_view.php (the media page's Ollama panel) and
# WWW/mediadb.php (the grid: ollama.title, ollama.caption) of github noliv3/LocalSupervisor.
# key -> (form, the stage that writes it here)
UI_KEYS: dict[str, tuple[str, str]] = {
    "ollama.title": ("text", "ollama_title"),                    # media_view.php, mediadb.php
    "ollama.caption": ("text", "ollama_caption"),                # media_view.php, mediadb.php
    "ollama.tags_normalized": ("list_of_str", "ollama_tags_normalize"),  # media_view.php (chips)
    "ollama.quality.score": ("int_0_100", "ollama_quality"),     # media_view.php ("Quality")
    "ollama.quality.flags": ("list_of_str", "ollama_quality"),   # media_view.php
    "ollama.prompt_eval.score": ("int_0_100", "ollama_score_multi"),  # media_view.php
    "ollama.prompt_recon.prompt": ("text", "ollama_prompt_recon"),   # media_view.php, ollama.php
    "ollama.prompt_recon.negative": ("text", "ollama_prompt_recon"),  # media_view.php
    "ollama.stage_version": ("text", "*"),                       # media_view.php
    "ollama.last_run_at": ("iso", "*"),                          # media_view.php ("Last Run")
}
# The seed's keys (INTERFACES_OLLAMA.md §2) in the form of the data contract (DATA_CONTRACTS_OLLAMA.md).
SEED_KEYS: dict[str, tuple[str, str]] = {
    "ollama.description": ("text", "ollama_caption"),
    "ollama.tags_raw": ("list_of_str", "ollama_tags_normalize"),
    "ollama.quality": ("json_object", "ollama_quality"),
    "ollama.duplicate_assist": ("json_object", "ollama_duplicate_assist"),
    "ollama.prompt_reconstruction": ("json_object", "ollama_prompt_recon"),
    "ollama.scores": ("json_object", "ollama_score_multi"),
    "ollama.policy_flags": ("policy_contract", "ollama_policy_flags"),
    "ollama.model": ("json_object", "*"),
    "ollama.version": ("json_object", "*"),
}


def _form_ok(form: str, text: str) -> bool:
    if form == "text":
        return bool(text.strip()) and not text.lstrip().startswith(("{", "["))
    if form == "iso":
        from datetime import datetime

        return datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None
    value = json.loads(text)
    if form == "list_of_str":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if form == "int_0_100":
        return isinstance(value, int) and 0 <= value <= 100
    if form == "json_object":
        return isinstance(value, dict)
    if form == "policy_contract":
        return set(value) == {"publishable", "needs_review", "blocked_reason"} and isinstance(value["publishable"], bool)
    raise AssertionError(form)


def _newest(db: Path, media_id: int) -> dict[str, tuple[str, str]]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT meta_key, meta_value, source FROM media_meta WHERE media_id = ? ORDER BY id",
                       (media_id,)).fetchall()
    con.close()
    return {k: (v, s) for k, v, s in rows}


@pytest.fixture
def ls_library(tmp_path: Path, settings_factory: Callable[..., Settings]) -> tuple[Settings, Path, list[int]]:
    db = tmp_path / "supervisor.sqlite"
    settings = settings_factory(f"sqlite:///{db}")
    ids = create_localsupervisor_db(db, settings.media_root, 6)
    return settings, db, ids


def _config_file(tmp_path: Path, settings: Settings) -> Path:
    data = json.loads(settings.model_dump_json(by_alias=True))
    path = tmp_path / "ollama_pipeline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _run_all(pipeline: Pipeline, ids: list[int], **kw: Any) -> list[Any]:
    outcomes = []
    for job_type in STAGES:
        outcomes += list(run_stage(pipeline, job_type, ids, **kw))
    return outcomes


def test_check_db_recognises_localsupervisor_and_names_what_it_reads_and_writes(
        tmp_path: Path, ls_library: tuple[Settings, Path, list[int]], capsys: pytest.CaptureFixture[str]) -> None:
    """check-db detects the profile from schema_migrations and reports meta_key/meta_value, the log layout."""
    settings, db, _ = ls_library
    config = _config_file(tmp_path, settings)
    before = snapshot(db)
    assert cli_main(["--config", str(config), "check-db", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["profile"] == "localsupervisor"
    meta = report["tables"]["media_meta"]
    assert "key=meta_key" in meta["reads"] and "value=meta_value" in meta["reads"]
    assert meta["layout"].startswith("append_log")
    assert report["tables"]["media"]["quality_status_vocabulary"] == {"ok": "ok", "needs_review": "review",
                                                                       "rejected": "blocked"}
    assert "ollama_tag_links" in report["tables"]["media_tags"]["origin"]
    assert cli_main(["--config", str(config), "init-db"]) == 0
    assert "localsupervisor profile" in capsys.readouterr().out
    assert snapshot(db) == before  # init-db created only the pipeline's own tables


def test_full_run_writes_what_its_ui_reads_appends_only_on_change_and_touches_only_allowed_rows(
        ls_library: tuple[Settings, Path, list[int]]) -> None:
    """8 stages on a LocalSupervisor database: UI forms, 0 new rows on re-run, only allowed changes."""
    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    before = snapshot(db)
    outcomes = _run_all(pipeline, ids)
    failed = [(o.stage, o.media_id, o.error) for o in outcomes if o.status == "failed"]
    assert failed == []
    after = snapshot(db)

    for media_id in ids:
        newest = _newest(db, media_id)
        for key, (form, _stage) in {**UI_KEYS, **SEED_KEYS}.items():
            if key == "ollama.prompt_eval.score" and key not in newest:
                continue
            assert key in newest, key
            text, source = newest[key]
            assert source == "ollama" and _form_ok(form, text), (key, text)
        assert newest["hash.sha256"][1] == "scan"  # the importer's row is still the newest of its key

    # Before/after: only the rows and columns the profile allows.
    for table in ("prompts", "scan_results", "jobs", "schema_migrations"):
        assert after[table] == before[table], table
    cols, rows_before = before["media"]
    _, rows_after = after["media"]
    changed_cols = {cols[i] for b, a in zip(rows_before, rows_after, strict=True) for i in range(len(cols))
                    if b[i] != a[i]}
    assert changed_cols <= {"quality_status", "quality_score"}
    assert {r[cols.index("quality_status")] for r in rows_after} <= {"unknown", "ok", "review", "blocked"}
    meta_cols, meta_rows = after["media_meta"]
    assert meta_rows[: len(before["media_meta"][1])] == before["media_meta"][1]  # append-only
    new_meta = meta_rows[len(before["media_meta"][1]):]
    assert {r[meta_cols.index("source")] for r in new_meta} == {"ollama"}
    assert all("T" in r[meta_cols.index("created_at")] for r in new_meta)
    assert after["tags"][1][: len(before["tags"][1])] == before["tags"][1]
    kept_links = set(before["media_tags"][1]) - set(after["media_tags"][1])
    assert kept_links <= set()  # the importer's links (and the locked one) are all still there
    ev_cols, events = after["media_lifecycle_events"]
    assert events and {e[ev_cols.index("event_type")] for e in events} == {"quality_eval"}
    assert all(e[ev_cols.index("actor")] == "ollama_pipeline" for e in events)
    au_cols, audits = after["audit_log"]
    assert audits and all(json.loads(a[au_cols.index("details_json")])["stage"] for a in audits)

    # Re-run: every stage skips, nothing is added anywhere.
    again = _run_all(pipeline, ids)
    assert {o.status for o in again} == {"skipped"}
    assert snapshot(db) == after


def test_tag_locks_and_link_ownership_and_human_edits_are_kept(ls_library: tuple[Settings, Path, list[int]]) -> None:
    """Locked tags/links stay; only the pipeline's own stale links go; a person's title is kept unless forced."""
    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    _run_all(pipeline, ids)
    con = sqlite3.connect(db)
    own = set(con.execute("SELECT media_id, tag_id FROM ollama_tag_links").fetchall())
    assert own, "the pipeline linked tags"
    importer = {(m, t) for m, t in con.execute("SELECT media_id, tag_id FROM media_tags").fetchall()} - own
    assert len(importer) == 2 * len(ids)
    # A stale link of the pipeline goes on a re-run; a locked tag is never linked by the pipeline.
    media_id = ids[1]
    con.execute("UPDATE tags SET locked = 1 WHERE id IN (SELECT tag_id FROM ollama_tag_links WHERE media_id = ?)",
                (media_id,))
    con.execute("DELETE FROM ollama_stage_results WHERE stage = 'ollama_tags_normalize'")
    con.commit()
    outcomes = list(run_stage(pipeline, "ollama_tags_normalize", ids, force=True))
    assert {o.status for o in outcomes} <= {"written", "unchanged"}
    links_now = set(con.execute("SELECT media_id, tag_id FROM media_tags").fetchall())
    assert importer <= links_now

    # A person edits the title in LocalSupervisor (a newer row with another source).
    con.execute("INSERT INTO media_meta (media_id, source, meta_key, meta_value, created_at) "
                "VALUES (?, 'web', 'ollama.title', 'My own title', '2026-02-01T00:00:00+00:00')", (media_id,))
    con.execute("DELETE FROM ollama_stage_results WHERE stage = 'ollama_title'")
    con.commit()
    (outcome,) = run_stage(pipeline, "ollama_title", [media_id])
    assert outcome.human_edited == ["ollama.title"]
    assert _newest(db, media_id)["ollama.title"] == ("My own title", "web")
    (forced,) = run_stage(pipeline, "ollama_title", [media_id], force=True)
    assert "ollama.title" in forced.changed_keys
    assert _newest(db, media_id)["ollama.title"][1] == "ollama"
    history = [r[0] for r in con.execute("SELECT meta_value FROM media_meta WHERE media_id = ? AND "
                                         "meta_key = 'ollama.title' ORDER BY id", (media_id,))]
    assert "My own title" in history and len(history) == 3  # every earlier value stays recoverable
    con.close()


def test_demo_library_in_localsupervisor_layout_is_read_by_web_export_and_report(
        tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """`demo --layout localsupervisor`'s library: the profile is detected, every stage runs, and this
    project's web UI, export feed and report read the results."""
    from ollama_pipeline.app.demo import verify_outputs
    from ollama_pipeline.app.demo_library import build_demo_library
    from ollama_pipeline.app.web import queries
    from ollama_pipeline.core.db.gallery import gallery_for
    from ollama_pipeline.core.export import export_records
    from ollama_pipeline.core.report import build_report

    db = tmp_path / "demo_ls.sqlite"
    settings = settings_factory(f"sqlite:///{db}")
    pipeline = Pipeline.from_settings(settings)
    report = build_demo_library(pipeline.engine, settings.media_root, 8, max_side=256, sizes="small",
                                layout="localsupervisor")
    ids = sorted(report.media_ids)
    assert gallery_for(pipeline.engine).profile == "localsupervisor"
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == 18
    assert all(Path(p).is_absolute() for (p,) in con.execute("SELECT path FROM media"))
    con.close()
    outcomes = _run_all(pipeline, ids)
    assert [o for o in outcomes if o.status == "failed"] == []
    valid, total, problems = verify_outputs(pipeline.engine, list(STAGES))
    assert (valid, total) == (len(ids), len(ids)), problems[:3]
    records = list(export_records(pipeline.engine))
    assert [r["media_id"] for r in records] == ids
    assert records[0]["ollama"]["ollama.caption"]["text"] == _newest(db, ids[0])["ollama.caption"][0]
    assert {r["quality_status"] for r in records} <= {"ok", "review", "blocked"}
    item = queries.item_data(pipeline.engine, ids[0])
    assert item is not None and item.meta["ollama.title"]["text"] and item.tags
    page = queries.gallery_page(pipeline.engine, queries.GalleryFilters(q=item.meta["ollama.title"]["text"][:8]))
    assert ids[0] in [c.id for c in page.cards]
    assert build_report(pipeline.engine).items == len(ids)


def test_its_jobs_rows_queued_by_sql_are_claimed_once_processed_and_end_done(
        ls_library: tuple[Settings, Path, list[int]]) -> None:
    """ollama_caption rows in LocalSupervisor's jobs table (as its enqueue writes them) end done with the
    caption visible; dedupe and per-media limit as its own code; other types are left for its worker."""
    from ollama_pipeline.core.errors import QueueLimitError
    from ollama_pipeline.core.queue.gallery_jobs import process_gallery_jobs
    from ollama_pipeline.core.queue.store import enqueue_ollama

    def enqueue(settings: Settings, job_type: str, media_id: int, payload: dict[str, Any] | None = None) -> Any:
        return enqueue_ollama(Pipeline.from_settings(settings), job_type, media_id, payload)

    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    con = sqlite3.connect(db)
    for media_id in ids[:3]:  # as sv_enqueue_ollama_job writes them
        con.execute("INSERT INTO jobs (media_id, prompt_id, type, status, created_at, updated_at, payload_json) "
                    "VALUES (?, NULL, 'ollama_caption', 'queued', '2026-02-01T10:00:00+00:00', "
                    "'2026-02-01T10:00:00+00:00', ?)",
                    (media_id, json.dumps({"media_id": media_id, "mode": "caption",
                                           "created_at": "2026-02-01T10:00:00+00:00"})))
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, payload_json) "
                "VALUES (?, 'ollama_embed', 'queued', '2026-02-01T10:00:00+00:00', '{}')", (ids[0],))
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, not_before, payload_json) "
                "VALUES (?, 'ollama_title', 'queued', '2026-02-01T10:00:00+00:00', '2999-01-01T00:00:00+00:00', '{}')",
                (ids[4],))
    con.commit()
    found = enqueue(settings, "ollama_caption", ids[0])
    assert (found.job_id, found.status) == (1, "deduplicated")

    outcomes = process_gallery_jobs(pipeline, limit=10)
    assert [(o.media_id, o.status) for o in outcomes] == [(m, "done") for m in ids[:3]]
    rows = con.execute("SELECT type, status, worker_owner, heartbeat_at, started_at, last_error_code FROM jobs "
                       "ORDER BY id").fetchall()
    assert [r[:2] for r in rows] == [("ollama_caption", "done")] * 3 + [("ollama_embed", "queued"),
                                                                         ("ollama_title", "queued")]
    assert all(r[2].startswith("ollama_pipeline:") and "T" in r[3] and "T" in r[4] and r[5] is None for r in rows[:3])
    for media_id in ids[:3]:
        text, source = _newest(db, media_id)["ollama.caption"]
        assert source == "ollama" and text and not text.startswith("{")
    assert process_gallery_jobs(pipeline, limit=10) == []  # nothing left it may take

    new = enqueue(settings, "ollama_title", ids[1], {"force": True})
    assert new.status == "queued"
    payload = json.loads(con.execute("SELECT payload_json FROM jobs WHERE id = ?", (new.job_id,)).fetchone()[0])
    assert payload["mode"] == "title" and payload["media_id"] == ids[1] and payload["force"] is True
    tight = settings.model_copy(update={"library": settings.library.model_copy(update={
        "jobs": settings.library.jobs.model_copy(update={"queue_max_per_type_default": 1})})})
    with pytest.raises(QueueLimitError):
        enqueue(tight, "ollama_title", ids[2])
    con.close()


def test_run_conditions_caption_only_when_missing_quality_only_while_unknown_unless_forced(
        ls_library: tuple[Settings, Path, list[int]]) -> None:
    """The data contract's run conditions (pipeline_ollama.md of LocalSupervisor's history): a caption from
    elsewhere and a quality_status a person set hold the stage back with a readable skip reason; the
    pipeline's own earlier results do not; force runs anyway; a prompt reconstruction stays meta only."""
    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO media_meta (media_id, source, meta_key, meta_value, created_at) VALUES "
                "(?, 'web', 'ollama.caption', 'A caption someone wrote', '2026-02-01T00:00:00+00:00')", (ids[0],))
    con.execute("UPDATE media SET quality_status = 'review' WHERE id = ?", (ids[1],))  # a person's review
    con.commit()
    prompts_before = snapshot(db)["prompts"]

    caption = {o.media_id: o for o in run_stage(pipeline, "ollama_caption", ids)}
    assert (caption[ids[0]].status, caption[ids[0]].reason) == ("skipped", "caption_present")
    assert {caption[i].status for i in ids[1:]} == {"written"}
    assert _newest(db, ids[0])["ollama.caption"] == ("A caption someone wrote", "web")
    quality = {o.media_id: o for o in run_stage(pipeline, "ollama_quality", ids)}
    assert (quality[ids[1]].status, quality[ids[1]].reason) == ("skipped", "quality_status_set")
    assert {quality[i].status for i in ids if i != ids[1]} == {"written"}
    assert con.execute("SELECT quality_status FROM media WHERE id = ?", (ids[1],)).fetchone() == ("review",)
    lines = [json.loads(line) for line in (settings.logs_dir / "ollama_jobs.jsonl").read_text().splitlines()]
    skips = {(r["media_id"], r["reason"]): r["message"] for r in lines if r["event"] == "stage_skipped"}
    assert "runs only when it is missing (force to replace it)" in skips[(ids[0], "caption_present")]
    assert "quality_status 'needs_review', not set by the pipeline" in skips[(ids[1], "quality_status_set")]

    # The pipeline's own status is its result: a changed fingerprint re-evaluates it.
    con.execute("UPDATE ollama_stage_results SET fingerprint = 'older' WHERE stage = 'ollama_quality' "
                "AND media_id = ?", (ids[2],))
    con.commit()
    (again,) = run_stage(pipeline, "ollama_quality", [ids[2]])
    assert again.status in {"written", "unchanged"} and again.reason is None
    # Forced, both run.
    (forced_caption,) = run_stage(pipeline, "ollama_caption", [ids[0]], force=True)
    (forced_quality,) = run_stage(pipeline, "ollama_quality", [ids[1]], force=True)
    assert forced_caption.status == "written" and _newest(db, ids[0])["ollama.caption"][1] == "ollama"
    assert forced_quality.status in {"written", "unchanged"} and forced_quality.reason is None

    # Prompt reconstruction, whatever its similarity to the stored prompt: meta only, prompts untouched.
    recon = list(run_stage(pipeline, "ollama_prompt_recon", ids))
    assert {o.status for o in recon} == {"written"}
    assert snapshot(db)["prompts"] == prompts_before
    assert all("ollama.prompt_reconstruction" in _newest(db, i) for i in ids)
    con.close()


def test_its_jobs_rows_become_dagster_runs_through_queued_jobs_sensor_and_end_done(
        ls_library: tuple[Settings, Path, list[int]], instance: Any) -> None:
    """ollama_caption rows queued by plain SQL in LocalSupervisor's jobs table: one tick of
    queued_jobs_sensor (evaluated with build_sensor_context) claims them in that table and requests one
    run; the run (executed in process as the daemon would launch it) processes them on the worker's code
    path and writes their end state there: done, result in media_meta. Other types stay queued."""
    from dagster import Definitions, build_sensor_context, in_process_executor

    from ollama_pipeline.definitions import defs
    from ollama_pipeline.defs.assets import all_assets
    from ollama_pipeline.defs.job_sensors import BATCH_TAG, JOB_IDS_TAG, JOB_TYPE_TAG, queued_jobs_sensor
    from ollama_pipeline.defs.resources import PipelineResource

    settings, db, ids = ls_library
    resource = PipelineResource.for_settings(settings)
    init_db(resource.pipeline().engine)
    con = sqlite3.connect(db)
    for media_id in ids[:3]:  # as sv_enqueue_ollama_job writes them
        con.execute("INSERT INTO jobs (media_id, prompt_id, type, status, created_at, updated_at, payload_json) "
                    "VALUES (?, NULL, 'ollama_caption', 'queued', '2026-02-01T10:00:00+01:00', "
                    "'2026-02-01T10:00:00+01:00', ?)",
                    (media_id, json.dumps({"media_id": media_id, "mode": "caption",
                                           "created_at": "2026-02-01T10:00:00+01:00"})))
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, payload_json) "
                "VALUES (?, 'ollama_embed', 'queued', '2026-02-01T10:00:00+01:00', '{}')", (ids[0],))
    con.commit()

    def tick() -> Any:
        with build_sensor_context(instance=instance, definitions=defs, resources={"pipeline": resource}) as context:
            return queued_jobs_sensor(context)

    result = tick()
    (request,) = result.run_requests
    assert request.tags[JOB_TYPE_TAG] == "ollama_caption" and request.tags[JOB_IDS_TAG] == "1,2,3"
    claimed = con.execute("SELECT status, worker_owner, heartbeat_at FROM jobs WHERE id <= 3").fetchall()
    assert all(s == "running" and o == f"ollama_pipeline:{request.tags[BATCH_TAG]}" and h for s, o, h in claimed)
    assert tick().skip_reason is not None  # claimed once: a second tick takes nothing

    job = Definitions(assets=all_assets, resources={"pipeline": resource},
                      executor=in_process_executor).resolve_implicit_global_asset_job_def()
    run = job.execute_in_process(instance=instance, asset_selection=list(request.asset_selection or []),
                                 run_config=request.run_config, tags=dict(request.tags), raise_on_error=False)
    assert run.success
    rows = con.execute("SELECT type, status, last_error_code, error_message, payload_json FROM jobs "
                       "ORDER BY id").fetchall()
    assert [r[:4] for r in rows] == [("ollama_caption", "done", None, None)] * 3 + [("ollama_embed", "queued", None,
                                                                                    None)]
    assert all(json.loads(r[4])["attempts"] == 1 for r in rows[:3])
    for media_id in ids[:3]:
        text, source = _newest(db, media_id)["ollama.caption"]
        assert source == "ollama" and text and not text.startswith("{")
    assert "ollama.caption" not in _newest(db, ids[3])
    con.close()


def _execute_check_db(settings: Settings, instance: Any) -> Any:
    """Execute the `media_check_db` asset check alone (as "Execute checks" in the UI does); its evaluation."""
    from dagster import AssetCheckKey, AssetKey, AssetSelection, materialize

    from ollama_pipeline.defs.assets import all_assets
    from ollama_pipeline.defs.resources import PipelineResource

    key = AssetCheckKey(AssetKey("media"), "media_check_db")
    result = materialize(all_assets, selection=AssetSelection.checks(key), instance=instance,
                         resources={"pipeline": PipelineResource.for_settings(settings)}, raise_on_error=False)
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.asset_check_key == key
    return evaluation


def test_check_db_is_an_asset_check_on_media_with_the_reports_gaps_in_its_metadata(
        tmp_path: Path, ls_library: tuple[Settings, Path, list[int]], settings_factory: Callable[..., Settings],
        instance: Any) -> None:
    """media_check_db runs the check-db report when executed: it passes on a LocalSupervisor library (profile
    in its metadata), fails on a gallery without media.path naming the gap and its fix, and fails (without
    breaking the code location) when the database cannot be reached."""
    import socket

    from ollama_pipeline.definitions import defs

    settings, _, _ = ls_library
    ok = _execute_check_db(settings, instance)
    assert ok.passed and ok.metadata["profile"].value == "localsupervisor"
    assert ok.metadata["missing_required"].value == 0

    broken_db = tmp_path / "no_path.sqlite"
    con = sqlite3.connect(broken_db)
    con.execute("CREATE TABLE media (id INTEGER PRIMARY KEY, type TEXT)")
    con.execute("CREATE TABLE media_meta (media_id INTEGER, key TEXT, value TEXT)")
    con.commit()
    con.close()
    broken = _execute_check_db(settings_factory(f"sqlite:///{broken_db}"), instance)
    assert not broken.passed and broken.metadata["missing_required"].value >= 1
    gaps = broken.metadata["gaps"].value
    assert any(g["table"] == "media" and g["column"] == "path" and g["level"] == "error" and g["fix"] for g in gaps)

    with socket.socket() as sock:  # a port nothing listens on: the database is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = _execute_check_db(settings_factory(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/none"), instance)
    assert not down.passed and "OperationalError" in down.metadata["error"].value
    assert defs.resolve_asset_graph().has(_media_key())  # the location itself loads without a database


def _media_key() -> Any:
    from dagster import AssetKey

    return AssetKey("media")


def test_leases_in_its_jobs_table_are_renewed_while_working_and_only_our_stopped_claims_are_requeued(
        tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """A claim in LocalSupervisor's jobs table is its heartbeat plus the lease: the worker's LeaseKeeper
    renews heartbeat_at while it works; a claim of ours whose heartbeat stopped is requeued (attempt kept)
    by the next claim, while a job LocalSupervisor's own worker runs is never touched."""
    import time

    from ollama_pipeline.core.queue import store
    from ollama_pipeline.core.queue.worker import LeaseKeeper

    db = tmp_path / "supervisor.sqlite"
    settings = settings_factory(f"sqlite:///{db}", pipeline__queue__lease_seconds=1)
    ids = create_localsupervisor_db(db, settings.media_root, 3)
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, heartbeat_at, worker_owner, payload_json) "
                "VALUES (?, 'ollama_title', 'running', '2026-02-01T10:00:00+01:00', '2026-02-01T10:00:00+01:00', "
                "'php:worker:42', '{}')", (ids[2],))  # LocalSupervisor's own worker holds this one
    con.commit()
    first = store.enqueue_ollama(pipeline, "ollama_caption", ids[0])
    (claimed,) = store.claim_jobs(pipeline, "w1", 5)
    assert claimed.id == first.job_id and claimed.attempts == 1 and claimed.job_type == "ollama_caption"
    before = con.execute("SELECT heartbeat_at FROM jobs WHERE id = ?", (claimed.id,)).fetchone()[0]
    with LeaseKeeper(pipeline) as keeper:
        keeper.track(claimed)
        deadline = time.monotonic() + 20
        while con.execute("SELECT heartbeat_at FROM jobs WHERE id = ?", (claimed.id,)).fetchone()[0] == before:
            assert time.monotonic() < deadline, "the heartbeat was not renewed"
            time.sleep(0.1)
    # The worker stopped: once its lease ran out the next claim takes the job again, as attempt 2.
    deadline = time.monotonic() + 20
    while not (again := store.claim_jobs(pipeline, "w2", 5)):
        assert time.monotonic() < deadline, "the stopped claim was not requeued"
        time.sleep(0.2)
    assert [(j.id, j.attempts, j.worker) for j in again] == [(claimed.id, 2, "w2")]
    assert con.execute("SELECT status, worker_owner, heartbeat_at FROM jobs WHERE media_id = ? AND "
                       "type = 'ollama_title'", (ids[2],)).fetchone() == ("running", "php:worker:42",
                                                                       "2026-02-01T10:00:00+01:00")
    outcome = store.finish_claimed(pipeline, again[0], None)
    assert outcome.status == "done"
    assert con.execute("SELECT status, last_error_code FROM jobs WHERE id = ?", (claimed.id,)).fetchone() == \
        ("done", None)
    con.close()


def test_a_second_demo_build_in_localsupervisor_layout_adds_nothing(
        tmp_path: Path, settings_factory: Callable[..., Settings]) -> None:
    """`make demo` twice: the second build finds every item by its absolute path (as LocalSupervisor's
    importer stores it) and adds no row."""
    from ollama_pipeline.app.demo_library import build_demo_library

    db = tmp_path / "demo_twice.sqlite"
    settings = settings_factory(f"sqlite:///{db}")
    engine = Pipeline.from_settings(settings).engine
    first = build_demo_library(engine, settings.media_root, 4, max_side=128, sizes="small", layout="localsupervisor")
    before = snapshot(db)
    second = build_demo_library(engine, settings.media_root, 4, max_side=128, sizes="small", layout="localsupervisor")
    assert (first.created, second.created, second.skipped) == (4, 0, 4)
    assert snapshot(db) == before


def test_refresh_leaves_items_with_a_waiting_row_in_its_jobs_table_to_that_job(
        ls_library: tuple[Settings, Path, list[int]]) -> None:
    """The refresh schedule's candidates skip an item whose caption job waits in LocalSupervisor's queue."""
    from ollama_pipeline.core.refresh import refresh_items

    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    assert {o.status for o in run_stage(pipeline, "ollama_caption", ids)} == {"written"}
    con = sqlite3.connect(db)
    con.execute("UPDATE ollama_stage_results SET version = 'caption-v0' WHERE stage = 'ollama_caption'")
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, payload_json) VALUES "
                "(?, 'ollama_caption', 'pending', '2026-02-01T10:00:00+01:00', '{}')", (ids[0],))
    con.commit()
    con.close()
    found = refresh_items(pipeline, STAGES["ollama_caption"], limit=100)
    assert found.stale == ids[1:]


def test_the_web_item_page_lists_the_items_rows_of_its_jobs_table(
        ls_library: tuple[Settings, Path, list[int]]) -> None:
    """The web UI's item data lists the item's jobs from LocalSupervisor's queue (stage names, the queue's
    status words), newest first; types without a stage here are not listed."""
    from ollama_pipeline.app.web import queries
    from ollama_pipeline.core.queue import store

    settings, db, ids = ls_library
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, last_error_code, error_message, "
                "payload_json) VALUES (?, 'ollama_prompt_eval', 'error', '2026-02-01T10:00:00+01:00', "
                "'network.timeout', 'timed out', '{\"attempts\": 3}')", (ids[0],))
    con.execute("INSERT INTO jobs (media_id, type, status, created_at, payload_json) VALUES "
                "(?, 'ollama_embed', 'queued', '2026-02-01T10:00:00+01:00', '{}')", (ids[0],))
    con.commit()
    con.close()
    queued = store.enqueue_ollama(pipeline, "ollama_title", ids[0])
    item = queries.item_data(pipeline.engine, ids[0])
    assert item is not None
    assert [(j["id"], j["job_type"], j["status"]) for j in item.jobs] == [
        (queued.job_id, "ollama_title", "queued"), (1, "ollama_score_multi", "failed")]
    assert (item.jobs[1]["attempts"], item.jobs[1]["error_code"]) == (3, "network.timeout")
