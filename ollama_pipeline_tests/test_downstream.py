"""The downstream assets on a real SQLite library, a real Dagster instance and the emulator over loopback:
`ollama_export` (the JSON Lines feed, byte-identical when nothing changed) and `ollama_report` (pandas report
as Markdown tables, key figures and files), plus the feed's JSON Schema file."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AssetsDefinition,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    in_process_executor,
)
from sqlalchemy import Engine, insert, select, update

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaStageResult, Prompt
from ollama_pipeline.core.export import EXPORT_SCHEMA, EXPORT_SCHEMA_TEXT_IDS, default_export_path
from ollama_pipeline.core.export_schema import ExportRecord, render
from ollama_pipeline.core.report import LibraryReport, build_report, default_report_dir
from ollama_pipeline.core.runner import run_stage
from ollama_pipeline.core.stages import STAGES, all_meta_keys
from ollama_pipeline.definitions import defs
from ollama_pipeline.defs.assets import all_assets, index_media
from ollama_pipeline.defs.downstream import DOWNSTREAM_GROUP, downstream_assets
from ollama_pipeline.defs.launch import materialize_stages
from ollama_pipeline.defs.resources import PipelineResource

REPO = Path(__file__).resolve().parents[1]
EXPORT, REPORT = "ollama_export", "ollama_report"
RECORD_KEYS = {"schema", "media_id", "path", "hash", "type", "width", "height", "quality_status", "quality_score",
               "ollama", "stages"}
FAULT_MARKER = "[[fault:http_500]]"


def materialize_downstream(settings: Settings, instance: DagsterInstance,
                           names: tuple[str, ...] = (EXPORT, REPORT)) -> ExecuteInProcessResult:
    """Materialize downstream assets in process, from the same asset list as the code location."""
    run_defs = Definitions(assets=[*all_assets, *downstream_assets],
                           resources={"pipeline": PipelineResource.for_settings(settings)},
                           executor=in_process_executor)
    result = run_defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[AssetKey(n) for n in names])
    assert result.success
    return result


def _metadata(result: ExecuteInProcessResult, name: str) -> dict[str, Any]:
    (event,) = [m for m in result.get_asset_materialization_events() if m.asset_key == AssetKey(name)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def _stage_all(settings: Settings, ids: list[int], instance: DagsterInstance) -> None:
    """Every stage for the items through Dagster, as `ollama-pipeline run` does."""
    summary = materialize_stages(settings, ids, None, instance, log_level="WARNING")
    assert summary.ok, summary.render()


def _stage_all_in_core(settings: Settings, ids: list[int]) -> Counter[str]:
    """Every stage for the items through the core runner (no Dagster: quicker); statuses counted."""
    pipeline = PipelineResource.for_settings(settings).pipeline()
    list(index_media(pipeline, ids))
    return Counter(o.status for stage in STAGES for o in run_stage(pipeline, stage, ids))


def test_downstream_assets_sit_below_every_stage_unpartitioned_and_outside_the_partition_job() -> None:
    """Both assets: in the code location's one group, no partitions, parents = the eight stage assets."""
    graph = defs.resolve_asset_graph()
    stage_keys = {AssetKey(s) for s in STAGES}
    for name in (EXPORT, REPORT):
        node = graph.get(AssetKey(name))
        assert node.group_name == DOWNSTREAM_GROUP and node.partitions_def is None
        assert set(node.parent_keys) == stage_keys
    in_partition_job = {k for a in all_assets for k in (a.keys if isinstance(a, AssetsDefinition) else {a.key})}
    assert not {AssetKey(EXPORT), AssetKey(REPORT)} & in_partition_job
    assert defs.resolve_implicit_global_asset_job_def() is not None


def test_export_feed_is_complete_valid_and_byte_identical_for_an_unchanged_library(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance) -> None:
    """Six lines in media-id order with every ollama.* key, schema-valid; a re-run changes not one byte."""
    settings, engine, ids = library
    _stage_all(settings, ids, instance)
    first = _metadata(materialize_downstream(settings, instance, (EXPORT,)), EXPORT)

    path = default_export_path(settings)
    data = path.read_bytes()
    lines = data.decode("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["media_id"] for r in records] == ids
    for record in records:
        assert set(record) == RECORD_KEYS and record["schema"] == EXPORT_SCHEMA
        assert set(all_meta_keys()) <= set(record["ollama"])
        assert set(record["stages"]) == set(STAGES)
        assert all(s["status"] == "ok" for s in record["stages"].values())
        ExportRecord.model_validate(record)
    assert first["items"] == 6 and first["bytes"] == len(data) and first["schema"] == EXPORT_SCHEMA
    assert first["sha256"] == hashlib.sha256(data).hexdigest() and first["path"] == str(path)

    assert _stage_all_in_core(settings, ids) == {"skipped": 6 * len(STAGES)}  # nothing changed, nothing written
    second = _metadata(materialize_downstream(settings, instance, (EXPORT,)), EXPORT)
    assert path.read_bytes() == data and second["sha256"] == first["sha256"]
    latest = instance.get_latest_materialization_event(AssetKey(EXPORT))
    assert latest is not None and latest.asset_materialization.tags["dagster/data_version"] == first["sha256"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    with engine.begin() as conn:
        conn.execute(update(Media).where(Media.id == ids[2]).values(hash="changed-by-the-gallery"))
    third = _metadata(materialize_downstream(settings, instance, (EXPORT,)), EXPORT)
    assert third["sha256"] != first["sha256"] and third["items"] == 6


def test_report_counts_match_the_library_with_a_failed_and_a_blocked_item(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance, emulator: Any) -> None:
    """A corrupt file (never run) and a title the model answers with HTTP 500: tables, figures, files agree."""
    settings, engine, ids = library
    corrupt, faulty = ids[1], ids[4]
    with engine.connect() as conn:
        corrupt_path = conn.execute(select(Media.path).where(Media.id == corrupt)).scalar_one()
    (settings.media_root / corrupt_path).write_bytes(b"not an image")
    with engine.begin() as conn:
        conn.execute(update(Prompt).where(Prompt.media_id == faulty).values(prompt=f"a red fox {FAULT_MARKER}"))
    summary = materialize_stages(settings, ids, None, instance, log_level="ERROR")
    assert not summary.ok

    meta = _metadata(materialize_downstream(settings, instance, (REPORT,)), REPORT)

    with engine.connect() as conn:
        values = {(m, k): json.loads(v) for m, k, v in conn.execute(
            select(MediaMeta.media_id, MediaMeta.key, MediaMeta.value).where(MediaMeta.key.like("ollama.%")))}
        results = conn.execute(select(OllamaStageResult.stage, OllamaStageResult.status,  # stages only
                                      OllamaStageResult.error_code).where(OllamaStageResult.stage != "media")).all()
    policies = [v["outcome"] for (_, k), v in values.items() if k == "ollama.policy_flags"]
    verdicts = Counter(v["verdict"] for (_, k), v in values.items() if k == "ollama.quality")
    tags = Counter(t["name"] for (_, k), v in values.items() if k == "ollama.tags_normalized" for t in v["tags"])
    assert meta["items"] == 6
    assert meta["policy_allow"] + meta["policy_review"] + meta["policy_block"] == len(policies) == 5
    assert {o: meta[f"policy_{o}"] for o in ("allow", "review", "block")} == {
        o: policies.count(o) for o in ("allow", "review", "block")}
    assert {v: meta[f"quality_{v}"] for v in ("ok", "needs_review", "rejected")} == {
        v: verdicts[v] for v in ("ok", "needs_review", "rejected")}
    tagged = sum(1 for _, k in values if k == "ollama.tags_normalized")
    assert meta["tagged_items"] == tagged == 4 and meta["distinct_tags"] == len(tags)  # tags read the prompt
    assert isinstance(meta["score_overall_mean"], float) and isinstance(meta["ollama_caption_median_ms"], float)
    assert meta["stage_results_failed"] == sum(1 for _, status, _ in results if status == "failed") >= 1
    for table in ("tags_table", "quality_table", "scores_table", "policy_table", "stages_table"):
        assert "|---|" in meta[table]
    top_name, top_count = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    assert f"| 1 | {top_name} | {top_count} |" in meta["tags_table"]

    report = LibraryReport.model_validate_json(Path(meta["report_json"]).read_text(encoding="utf-8"))
    assert Path(meta["report_md"]).parent == default_report_dir(settings)
    assert Path(meta["report_md"]).read_text(encoding="utf-8").startswith("# Ollama library report")
    rows = {row.stage: row for row in report.stages}
    assert list(rows) == list(STAGES)
    for name, row in rows.items():
        assert row.ok + row.failed + row.not_run == 6 and row.not_run >= 1  # the corrupt file never ran
        assert row.ok == sum(1 for s, status, _ in results if s == name and status == "ok")
        assert row.duration_ms.count == row.ok
    title = rows["ollama_title"]
    assert title.failed == 1 and sum(title.error_codes.values()) == 1
    assert f"| ollama_title | {title.ok} | 1 | {title.not_run} |" in meta["stages_table"]
    assert sum(report.quality.histogram.values()) == report.quality.items == 5
    assert report.tags.top[0].name == top_name and len(report.tags.top) <= 20


def test_report_of_twenty_thousand_items_is_exact(library: tuple[Settings, Engine, list[int]]) -> None:
    """The six answered items copied to 20,004 rows: every count scales exactly (its time: `make bench`)."""
    settings, engine, ids = library
    assert _stage_all_in_core(settings, ids) == {"written": 6 * len(STAGES)}
    small = build_report(engine)
    copies = 3333
    now = datetime(2025, 1, 1)
    with engine.begin() as conn:
        conn.execute(insert(Media), [
            {"id": n * 1000 + i, "path": f"copy/{n}/{i}.png", "type": "image", "status": "active", "has_nsfw": False,
             "created_at": now, "updated_at": now} for n in range(1, copies + 1) for i in ids])
        conn.execute(insert(MediaMeta).from_select(
            ["media_id", "key", "value", "updated_at"],
            select(Media.id, MediaMeta.key, MediaMeta.value, MediaMeta.updated_at).join(
                MediaMeta, MediaMeta.media_id == Media.id % 1000).where(Media.id > 1000)))
        conn.execute(insert(OllamaStageResult).from_select(
            ["media_id", "stage", "status", "duration_ms", "prompt_eval_count", "eval_count", "updated_at"],
            select(Media.id, OllamaStageResult.stage, OllamaStageResult.status, OllamaStageResult.duration_ms,
                   OllamaStageResult.prompt_eval_count, OllamaStageResult.eval_count,
                   OllamaStageResult.updated_at).join(
                OllamaStageResult, OllamaStageResult.media_id == Media.id % 1000).where(Media.id > 1000)))
    factor = copies + 1
    big = build_report(engine)
    assert big.items == 6 * factor
    assert big.policy.outcomes == {o: n * factor for o, n in small.policy.outcomes.items()}
    assert big.quality.verdicts == {v: n * factor for v, n in small.quality.verdicts.items()}
    assert [(t.name, t.items) for t in big.tags.top] == [(t.name, t.items * factor) for t in small.tags.top]
    assert big.scores.scores["overall"].mean == pytest.approx(small.scores.scores["overall"].mean, abs=1e-3)
    assert [r.ok for r in big.stages] == [r.ok * factor for r in small.stages]


def test_export_schema_file_is_current() -> None:
    """docs/export_schema.json is what the pydantic models generate, for the feed's current format."""
    assert ExportRecord.model_fields["schema_"].annotation.__args__ == (EXPORT_SCHEMA, EXPORT_SCHEMA_TEXT_IDS)
    path = REPO / "docs" / "export_schema.json"
    assert path.read_text(encoding="utf-8") == render(), \
        "run: python -m ollama_pipeline.core.export_schema --write docs/export_schema.json"


def test_export_and_report_refresh_on_the_hourly_tick_after_a_stage_changed_not_after_every_run(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance) -> None:
    """Declarative automation (issue 11 item 13): a stage run alone requests nothing; the next hourly tick
    requests both assets once; a tick with no stage change since their materialization requests nothing."""
    from datetime import UTC, timedelta

    from dagster import AssetSelection, evaluate_automation_conditions

    from ollama_pipeline.defs.downstream import DOWNSTREAM_CRON

    assert DOWNSTREAM_CRON == "0 * * * *"
    settings, _engine, ids = library
    code_defs = Definitions(assets=[*all_assets, *downstream_assets],
                            resources={"pipeline": PipelineResource.for_settings(settings)})
    selection = AssetSelection.assets(EXPORT, REPORT)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    cursor = None

    def requested(at: datetime) -> int:
        nonlocal cursor
        result = evaluate_automation_conditions(defs=code_defs, instance=instance, asset_selection=selection,
                                                evaluation_time=at, cursor=cursor)
        cursor = result.cursor
        return result.total_requested

    ids = ids[:2]
    assert materialize_stages(settings, ids, ["caption"], instance).ok
    assert requested(hour + timedelta(minutes=59)) == 0          # updated stages, but no tick yet
    assert requested(hour + timedelta(hours=1, minutes=1)) == 2   # the tick: both, once
    materialize_downstream(settings, instance)
    assert requested(hour + timedelta(hours=1, minutes=2)) == 0
    assert requested(hour + timedelta(hours=2, minutes=1)) == 0   # a tick, but nothing changed upstream
    assert materialize_stages(settings, ids[:1], ["caption"], instance, force=True).ok
    assert requested(hour + timedelta(hours=2, minutes=30)) == 0  # a run is not a reason by itself
    assert requested(hour + timedelta(hours=3, minutes=1)) == 2
