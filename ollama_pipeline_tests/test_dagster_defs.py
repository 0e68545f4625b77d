"""The Dagster layer on a real SQLite library, a real Dagster instance and the emulator over loopback:
definitions, asset graph, single-run materialization over many partitions, the new-media sensor, checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    Definitions,
    SensorResult,
    build_sensor_context,
    define_asset_job,
    in_process_executor,
)
from sqlalchemy import Engine, insert, select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaMediaIndex, OllamaStageResult
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.definitions import defs
from ollama_pipeline.defs.assets import MEDIA, all_assets
from ollama_pipeline.defs.checks import degenerate_check_name, schema_check_name
from ollama_pipeline.defs.launch import materialize_stages
from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME, contiguous_ranges
from ollama_pipeline.defs.resources import PipelineResource
from ollama_pipeline.defs.sensors import new_media_sensor

REPO = Path(__file__).resolve().parents[1]
CAPTION = "ollama_caption"


def _media_path(engine: Engine, media_id: int) -> str:
    with engine.connect() as conn:
        return conn.execute(select(Media.path).where(Media.id == media_id)).scalar_one()


def _failed_partitions(instance: DagsterInstance, asset: str) -> set[str]:
    attempts = instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(
        AssetKey(asset))
    return set(attempts)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_definitions_import_without_database_or_network() -> None:
    """Importing the code location reads only the registry: it loads with no config file and no Ollama."""
    env = {**os.environ, "OLLAMA_PIPELINE_CONFIG": "/nonexistent/ollama_pipeline.yaml",
           "OLLAMA_HOST": "http://127.0.0.1:9"}
    code = ("from ollama_pipeline.definitions import defs; "
            "print(' '.join(sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys())))")
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {"media", "scan_results", *STAGES} <= set(out.stdout.split())
    assert defs.resolve_sensor_def("new_media_sensor").name == "new_media_sensor"


def test_asset_graph_puts_media_upstream_of_every_stage_from_the_registry() -> None:
    """Every registry stage is an asset keyed by its job type, below media and its upstream stages."""
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(MEDIA)).partitions_def.name == MEDIA_PARTITIONS_NAME
    for stage in STAGES.values():
        node = graph.get(AssetKey(stage.job_type))
        assert AssetKey(MEDIA) in node.parent_keys
        assert {AssetKey(u) for u in stage.upstream} <= set(node.parent_keys)
        assert node.group_name == stage.group
        assert node.code_version == stage.code_version
        assert node.partitions_def.name == MEDIA_PARTITIONS_NAME
        assert all(key in (node.description or "") for key in stage.writes)
        checks = {key.name for key in graph.get_check_keys_for_assets({node.key})}
        assert checks == {schema_check_name(stage), degenerate_check_name(stage)}
    assert AssetKey(CAPTION) in graph.get(AssetKey("ollama_title")).parent_keys


@pytest.fixture(params=["sqlite", "postgres", "dagster_sqlite"])
def any_instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DagsterInstance]:
    """The shipped SQLite instance, the documented PostgreSQL instance (a database made and dropped
    here), and Dagster's own SQLite storage: per-item outcomes must be the same on each."""
    from ollama_pipeline.bench.harness import dagster_home

    if request.param == "sqlite":
        yield request.getfixturevalue("instance")
        return
    if request.param == "postgres":
        request.getfixturevalue("pg_database")  # PostgreSQL is there
    kind = "postgres" if request.param == "postgres" else "sqlite"
    with dagster_home(tmp_path, kind, plain=request.param == "dagster_sqlite") as home:
        inst = DagsterInstance.from_config(str(home))
        try:
            yield inst
        finally:
            inst.dispose()


def test_one_run_over_six_items_materializes_four_and_fails_naming_the_two(
        library: tuple[Settings, Engine, list[int]], any_instance: DagsterInstance, emulator: Any) -> None:
    """A corrupt and a missing file fail only their partitions; the run's Failure names channel/code."""
    instance = any_instance
    settings, engine, ids = library
    corrupt, missing = ids[1], ids[3]
    (settings.media_root / _media_path(engine, corrupt)).write_bytes(b"not an image at all")
    (settings.media_root / _media_path(engine, missing)).unlink()

    summary = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")

    good = {str(i) for i in ids if i not in (corrupt, missing)}
    bad = {str(corrupt), str(missing)}
    assert len(summary.runs) == 1 and not summary.ok
    for asset in (MEDIA, CAPTION):
        assert set(instance.get_materialized_partitions(AssetKey(asset))) == good
        assert _failed_partitions(instance, asset) == bad
    assert summary.counts[CAPTION] == {"written": 4, "unchanged": 0, "skipped": 0, "failed": 2}
    assert summary.counts[MEDIA]["failed"] == 2
    failure = summary.runs[0].failure or ""
    assert "validation/validation.image_corrupt" in failure and "validation/validation.file_missing" in failure
    assert emulator.stats()["model_calls"] == 4
    with engine.connect() as conn:
        indexed = set(conn.execute(select(OllamaMediaIndex.media_id)).scalars())
        results = {row.media_id: row.status for row in conn.execute(
            select(OllamaStageResult.media_id, OllamaStageResult.status).where(OllamaStageResult.stage == CAPTION))}
        to_fix = {row.media_id: row.error_code for row in conn.execute(
            select(OllamaStageResult.media_id, OllamaStageResult.error_code).where(OllamaStageResult.stage == MEDIA))}
    assert indexed == {int(k) for k in good}
    assert results == {int(k): "ok" for k in good}  # blocked items were never sent to the model
    assert to_fix == {corrupt: "validation.image_corrupt", missing: "validation.file_missing"}  # the list to fix

    run = instance.get_run_by_id(summary.runs[0].run_id)
    assert run is not None and run.tags["dagster/asset_partition_range_start"] == str(ids[0])
    step_failure = next(e for e in instance.all_logs(run.run_id) if e.dagster_event
                        and e.dagster_event.is_step_failure)
    metadata = step_failure.dagster_event.step_failure_data.user_failure_data.metadata
    assert metadata["failed_items"].value == 2
    assert metadata["failed_by_asset_and_code"].value["media"] == {
        "validation/validation.image_corrupt": 1, "validation/validation.file_missing": 1}


def test_rerun_of_unchanged_items_skips_the_model_but_still_materializes(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance, emulator: Any) -> None:
    """A second run finds every fingerprint unchanged: no model call, each partition reported 'skipped'."""
    settings, _, ids = library
    first = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")
    calls = emulator.stats()["model_calls"]
    second = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")
    assert first.ok and second.ok
    assert first.counts[CAPTION]["written"] == 6
    assert second.counts[CAPTION] == {"written": 0, "unchanged": 0, "skipped": 6, "failed": 0}
    assert second.counts[MEDIA]["skipped"] == 6
    assert emulator.stats()["model_calls"] == calls
    record = instance.get_latest_materialization_event(AssetKey(MEDIA))
    assert record is not None and len(record.asset_materialization.tags["dagster/data_version"]) == 64


def test_media_ids_not_contiguous_in_partition_order_run_as_ranges_of_exactly_them(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance) -> None:
    """Partitions 1..6 exist; asking for 1, 2 and 5 launches two range runs and touches nothing else."""
    settings, _, ids = library
    instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, [str(i) for i in ids])
    wanted = [ids[0], ids[1], ids[4]]
    summary = materialize_stages(settings, wanted, [CAPTION], instance, log_level="WARNING")
    assert summary.ok and len(summary.runs) == 2
    assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {str(i) for i in wanted}
    assert contiguous_ranges(["1", "2", "3", "4"], ["4", "1", "2"]) == [("1", "2"), ("4", "4")]


def _insert_media_rows(engine: Engine, count: int) -> None:
    now = datetime(2025, 1, 1)
    rows = [{"path": f"bulk/{i:05d}.png", "type": "image", "status": "active", "has_nsfw": False,
             "created_at": now, "updated_at": now} for i in range(count)]
    with engine.begin() as conn:
        conn.execute(insert(Media), rows)


def test_sensor_registers_ten_thousand_new_rows_in_one_tick_with_one_range_run(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """10,000 new media rows -> 10,000 partitions and one run over their range; the next tick adds none."""
    settings = settings_factory(sqlite_url)
    engine = make_engine(settings.database.url)
    init_db(engine)
    _insert_media_rows(engine, 10_000)
    resources = {"pipeline": PipelineResource.for_settings(settings)}
    context = build_sensor_context(instance=instance, definitions=defs, resources=resources)

    started = time.perf_counter()
    result = new_media_sensor(context)
    elapsed = time.perf_counter() - started
    print(f"\nnew_media_sensor: 10,000 new media rows registered in {elapsed:.2f} s (one tick)")

    assert isinstance(result, SensorResult) and result.skip_reason is None
    assert len(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME)) == 10_000
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.tags == {"dagster/asset_partition_range_start": "1",
                            "dagster/asset_partition_range_end": "10000"}
    assert request.run_key == "new-media-1-10000"
    assert set(request.asset_selection) == {AssetKey(MEDIA), *(AssetKey(s) for s in STAGES)}
    assert result.cursor == "10000"

    again = new_media_sensor(build_sensor_context(instance=instance, definitions=defs, resources=resources,
                                                  cursor=result.cursor))
    assert isinstance(again, SensorResult) and not again.run_requests and again.skip_reason is not None
    assert len(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME)) == 10_000


def test_sensor_skips_with_a_reason_when_ollama_is_down(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """Ollama unreachable: partitions are still registered, no run, the cursor stays for the next tick."""
    settings = settings_factory(sqlite_url, ollama__base_url=f"http://127.0.0.1:{_closed_port()}")
    engine = make_engine(settings.database.url)
    init_db(engine)
    _insert_media_rows(engine, 3)
    context = build_sensor_context(instance=instance, definitions=defs,
                                   resources={"pipeline": PipelineResource.for_settings(settings)})
    result = new_media_sensor(context)
    assert isinstance(result, SensorResult) and not result.run_requests and result.cursor is None
    message = result.skip_reason.skip_message if result.skip_reason else ""
    assert "is not reachable: network.connect" in message and "127.0.0.1" in message
    assert instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME) == ["1", "2", "3"]


def _answers(engine: Engine, captions: list[str | None]) -> None:
    """Media rows whose last caption run succeeded, with the given stored caption JSON texts."""
    _insert_media_rows(engine, len(captions))
    now = datetime(2025, 1, 2)
    with engine.begin() as conn:
        ids = list(conn.execute(select(Media.id).order_by(Media.id)).scalars())
        conn.execute(insert(OllamaStageResult), [
            {"media_id": i, "stage": CAPTION, "status": "ok", "updated_at": now} for i in ids])
        conn.execute(insert(MediaMeta), [
            {"media_id": i, "key": key, "value": text if key == "ollama.caption" else json.dumps({"text": f"d{i}"}),
             "updated_at": now}
            for i, text in zip(ids, captions, strict=True) for key in ("ollama.caption", "ollama.description")])


def _run_caption_checks(settings: Settings, instance: DagsterInstance) -> dict[str, Any]:
    """Execute only the caption asset's checks (as "Execute checks" in the UI does) in process."""
    stage = STAGES[CAPTION]
    keys = [AssetCheckKey(AssetKey(CAPTION), schema_check_name(stage)),
            AssetCheckKey(AssetKey(CAPTION), degenerate_check_name(stage))]
    run_defs = Definitions(assets=all_assets, jobs=[define_asset_job("caption_checks", AssetSelection.checks(*keys))],
                           resources={"pipeline": PipelineResource.for_settings(settings)},
                           executor=in_process_executor)
    result = run_defs.resolve_job_def("caption_checks").execute_in_process(instance=instance)
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_caption_checks_pass_on_distinct_answers(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """Six different captions: the schema and degeneracy checks both pass, run alone from the asset."""
    settings = settings_factory(sqlite_url)
    engine = make_engine(settings.database.url)
    init_db(engine)
    _answers(engine, [json.dumps({"text": f"A red fox number {i} in snow."}) for i in range(6)])
    results = _run_caption_checks(settings, instance)
    assert results[schema_check_name(STAGES[CAPTION])].passed
    assert results[degenerate_check_name(STAGES[CAPTION])].passed


def test_caption_checks_fail_on_degenerate_and_unparsable_answers(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """Five identical captions out of six, one of them not JSON and one empty: both checks fail."""
    settings = settings_factory(sqlite_url)
    engine = make_engine(settings.database.url)
    init_db(engine)
    same = json.dumps({"text": "An image."})
    _answers(engine, [same, same, same, same, "Sure! Here is a caption", json.dumps({"text": " "})])
    results = _run_caption_checks(settings, instance)
    schema = results[schema_check_name(STAGES[CAPTION])]
    assert not schema.passed and schema.metadata["invalid_values"].value == 2
    degenerate = results[degenerate_check_name(STAGES[CAPTION])]
    assert not degenerate.passed and "4 of 6 items share one answer" in (degenerate.description or "")


def test_digit_only_tags_fail_the_not_degenerate_check() -> None:
    """A tag made only of digits in a stored tags value makes the not-degenerate check fail."""
    from ollama_pipeline.defs.checks import StoredAnswers, degenerate_result

    stage = next((s for s in STAGES.values() if any("tags" in k for k in s.writes)), None)
    if stage is None:  # the tags stage is not in the registry yet: the same check on a tags-writing stage
        stage = replace(STAGES[CAPTION], job_type="ollama_tags_normalize", writes=("ollama.tags_normalized",))
    key = next(k for k in stage.writes if "tags" in k)
    values = [(i, json.dumps([{"name": f"fox {i}"}, {"name": "1234" if i == 5 else f"snow {i}"}]))
              for i in range(6)]
    ok = degenerate_result(stage, StoredAnswers(ok_items=5, values={key: values[:5]}))
    bad = degenerate_result(stage, StoredAnswers(ok_items=6, values={key: values}))
    assert ok.passed
    assert not bad.passed and "1234" in (bad.description or "")


def test_documented_postgres_instance_block_of_dagster_yaml_runs_the_stages(
        library: tuple[Settings, Engine, list[int]], pg_database: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, emulator: Any) -> None:
    """The commented PostgreSQL blocks of dagster.yaml, used as README says, make a working instance."""
    import uuid

    import yaml
    from sqlalchemy import create_engine, text

    text_yaml = (REPO / "dagster.yaml").read_text()
    block = text_yaml[text_yaml.index("# run_storage:"):]
    config = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                                      for line in block.splitlines()))
    assert config["event_log_storage"]["class"] == "BatchedPostgresEventLogStorage"
    admin_url = pg_database.rsplit("/", 1)[0] + "/postgres"
    name = f"dagster_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_PG_URL", admin_url.rsplit("/", 1)[0] + f"/{name}")
    try:
        instance = DagsterInstance.from_config(str(home))
        settings, _, ids = library
        summary = materialize_stages(settings, ids[:3], [CAPTION], instance, log_level="WARNING")
        assert summary.ok and summary.counts[CAPTION]["written"] == 3
        assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {str(i) for i in ids[:3]}
        instance.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_register_partitions_adds_new_keys_and_finds_positions_page_by_page(
        instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """New keys go after all others in the given order; positions of known keys are read in pages."""
    from ollama_pipeline.defs import partitions

    monkeypatch.setattr(partitions, "SCAN_PAGE", 2)
    instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, ["1", "2", "3", "7"])
    position, added = partitions.register_partitions(instance, ["3", "9", "1", "8"])
    assert list(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME)) == ["1", "2", "3", "7", "9", "8"]
    assert position == {"1": 0, "3": 2, "9": 4, "8": 5} and added == ["9", "8"]
    assert contiguous_ranges(position, ["3", "9", "8", "1"]) == [("1", "1"), ("3", "3"), ("9", "8")]
    assert partitions.register_partitions(instance, ["10", "11"]).positions == {"10": 0, "11": 1}  # relative
