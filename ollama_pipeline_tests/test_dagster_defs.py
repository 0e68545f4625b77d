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
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaStageResult
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.definitions import defs
from ollama_pipeline.defs.assets import ASSET_GROUP, FAMILY_TAG, MEDIA, all_assets
from ollama_pipeline.defs.checks import degenerate_check_name, schema_check_name
from ollama_pipeline.defs.launch import materialize_stages
from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME, contiguous_ranges
from ollama_pipeline.defs.resources import PipelineResource
from ollama_pipeline.defs.sensors import new_media_sensor
from ollama_pipeline.emulator.server import Fault

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
        assert node.group_name == ASSET_GROUP and node.tags[FAMILY_TAG] == stage.group
        assert node.code_version == stage.code_version
        assert node.partitions_def.name == MEDIA_PARTITIONS_NAME
        assert all(key in (node.description or "") for key in stage.writes)
        checks = {key.name for key in graph.get_check_keys_for_assets({node.key})}
        assert checks == {schema_check_name(stage), degenerate_check_name(stage)}
    assert AssetKey(CAPTION) in graph.get(AssetKey("ollama_title")).parent_keys


@pytest.fixture(params=["sqlite", "postgres"])
def any_instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DagsterInstance]:
    """Dagster's own SQLite storage (as shipped) and the documented PostgreSQL instance (a database made and
    dropped here): per-partition outcomes must be the same on each."""
    from ollama_pipeline.bench.harness import dagster_home

    if request.param == "sqlite":
        yield request.getfixturevalue("instance")
        return
    request.getfixturevalue("pg_database")  # PostgreSQL is there
    with dagster_home(tmp_path, "postgres") as home:
        inst = DagsterInstance.from_config(str(home))
        try:
            yield inst
        finally:
            inst.dispose()


def _sized(settings: Settings, size: int) -> Settings:
    """The settings with `pipeline.partition_size` = size (six items in three partitions of two)."""
    return settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update={"partition_size": size})})


def _latest(instance: DagsterInstance, asset: str, partition: str) -> dict[str, Any]:
    """The metadata values of the latest materialization of one partition."""
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1).records
    assert records, f"{asset} {partition} was never materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_items_that_failed_for_good_leave_their_partitions_materialized_with_the_counts(
        library: tuple[Settings, Engine, list[int]], any_instance: DagsterInstance, emulator: Any) -> None:
    """A corrupt and a missing file fail for good: every partition (blocks of two) is materialized, and
    its metadata counts what was written and what failed with which code."""
    instance = any_instance
    settings, engine, ids = library
    settings = _sized(settings, 2)
    corrupt, missing = ids[1], ids[3]
    (settings.media_root / _media_path(engine, corrupt)).write_bytes(b"not an image at all")
    (settings.media_root / _media_path(engine, missing)).unlink()

    summary = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")

    assert summary.partitions == 3 and len(summary.runs) == 1 and summary.ok
    for asset in (MEDIA, CAPTION):
        assert set(instance.get_materialized_partitions(AssetKey(asset))) == {"1-2", "3-4", "5-6"}
        assert _failed_partitions(instance, asset) == set()
    assert summary.counts[CAPTION] == {"written": 4, "unchanged": 0, "skipped": 0, "failed": 2, "untouched": 0}
    assert summary.counts[MEDIA]["failed"] == 2
    first = _latest(instance, CAPTION, "1-2")
    assert (first["items"], first["written"], first["failed"], first["model_calls"]) == (2, 1, 1, 1)
    assert first["failed_by_code"] == {"blocked/upstream_failed.media": 1}
    assert first["prompt_tokens"] > 0 and first["output_tokens"] > 0 and "model_time_s" in first
    assert _latest(instance, MEDIA, "3-4")["failed_by_code"] == {"validation/validation.file_missing": 1}
    assert emulator.stats()["model_calls"] == 4
    with engine.connect() as conn:
        results = {row.media_id: row.status for row in conn.execute(
            select(OllamaStageResult.media_id, OllamaStageResult.status).where(OllamaStageResult.stage == CAPTION))}
        to_fix = {row.media_id: row.error_code for row in conn.execute(
            select(OllamaStageResult.media_id, OllamaStageResult.error_code).where(OllamaStageResult.stage == MEDIA))}
    assert results == {i: "ok" for i in ids if i not in (corrupt, missing)}  # blocked items: no model call
    assert to_fix == {corrupt: "validation.image_corrupt", missing: "validation.file_missing"}  # the list to fix


def test_a_retryable_failure_fails_its_partition_and_the_retry_pays_only_for_that_item(
        library: tuple[Settings, Engine, list[int]], any_instance: DagsterInstance, emulator: Any) -> None:
    """HTTP 500 on the first item's calls: only its partition fails (Failure names it), the others are
    materialized; re-running the partitions costs exactly one model call, for the failed item."""
    instance = any_instance
    settings, engine, ids = library
    settings = _sized(settings, 2)
    emulator.set_faults([Fault(kind="http_500", count=settings.ollama.retry.max_attempts)])

    summary = materialize_stages(settings, ids, [CAPTION], instance, include_media=False, concurrency=1,
                                 log_level="WARNING")

    assert not summary.ok
    assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {"3-4", "5-6"}
    assert _failed_partitions(instance, CAPTION) == {"1-2"}
    failure = summary.runs[0].failure or ""
    assert "1 of 3 partition(s) failed (network/network.server_error x1)" in failure
    run = instance.get_run_by_id(summary.runs[0].run_id)
    step_failure = next(e for e in instance.all_logs(run.run_id) if e.dagster_event
                        and e.dagster_event.is_step_failure)
    metadata = step_failure.dagster_event.step_failure_data.user_failure_data.metadata
    assert metadata["failed_partitions"].value == f"{CAPTION}:1-2"

    calls = emulator.stats()["model_calls"]
    retry = materialize_stages(settings, None, [CAPTION], instance, include_media=False, log_level="WARNING")
    assert retry.ok and emulator.stats()["model_calls"] - calls == 1
    assert retry.counts[CAPTION] == {"written": 1, "unchanged": 0, "skipped": 5, "failed": 0, "untouched": 0}
    assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {"1-2", "3-4", "5-6"}


def test_rerun_of_unchanged_items_skips_the_model_and_keeps_tokens_and_model_time_visible(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance, emulator: Any) -> None:
    """A second run finds every fingerprint unchanged: no model call, and the new materialization still
    shows the tokens and model time the partition's stored answers cost."""
    settings, _, ids = library
    first = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")
    calls = emulator.stats()["model_calls"]
    before = _latest(instance, CAPTION, "1-1000")
    second = materialize_stages(settings, ids, [CAPTION], instance, log_level="WARNING")
    assert first.ok and second.ok
    assert first.counts[CAPTION]["written"] == 6
    assert second.counts[CAPTION] == {"written": 0, "unchanged": 0, "skipped": 6, "failed": 0, "untouched": 0}
    assert second.counts[MEDIA]["skipped"] == 6
    assert emulator.stats()["model_calls"] == calls
    after = _latest(instance, CAPTION, "1-1000")
    assert (after["skipped"], after["model_calls"], after["prompt_tokens"]) == (6, 0, 0)
    assert after["stored_ok"] == 6 and after["stored_prompt_tokens"] == before["stored_prompt_tokens"] > 0
    assert after["stored_output_tokens"] == before["stored_output_tokens"] > 0
    assert after["stored_model_time_s"] == before["stored_model_time_s"]


def test_selected_items_in_partitions_apart_run_as_two_ranges_that_touch_only_them(
        library: tuple[Settings, Engine, list[int]], instance: DagsterInstance) -> None:
    """Partitions 1-2, 3-4, 5-6 exist; asking for items 1 and 5 launches two range runs, materializes
    their two partitions and touches no other item."""
    settings, engine, ids = library
    settings = _sized(settings, 2)
    instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, ["1-2", "3-4", "5-6"])
    wanted = [ids[0], ids[4]]
    summary = materialize_stages(settings, wanted, [CAPTION], instance, log_level="WARNING")
    assert summary.ok and len(summary.runs) == 2
    assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {"1-2", "5-6"}
    with engine.connect() as conn:
        touched = set(conn.execute(select(OllamaStageResult.media_id)).scalars())
    assert touched == set(wanted)
    assert contiguous_ranges(["1", "2", "3", "4"], ["4", "1", "2"]) == [("1", "2"), ("4", "4")]


def test_partition_keys_are_id_blocks_and_hash_buckets_for_text_ids() -> None:
    """Integer ids fall in fixed blocks; text and UUID ids in stable hash buckets."""
    scheme = Partitioning(size=1000)
    assert [scheme.key_of(i) for i in (1, 1000, 1001, 2_000_000)] == ["1-1000", "1-1000", "1001-2000",
                                                                       "1999001-2000000"]
    assert scheme.keys_of([3, 1500, 7, 2999]) == ["1-1000", "1001-2000", "2001-3000"]
    uuid_key = scheme.key_of("0b8f6a1e-5d2c-4c7e-9a51-2f0d3b7c9e11")
    assert uuid_key.startswith("h") and uuid_key == scheme.key_of("0b8f6a1e-5d2c-4c7e-9a51-2f0d3b7c9e11")
    buckets = {scheme.key_of(f"img-{n}") for n in range(5000)}
    assert len(buckets) > 900 and all(len(k) == 5 for k in buckets)
    assert Partitioning.block_range("1001-2000") == (1001, 2000) and Partitioning.block_range("h0042") is None


def _insert_media_rows(engine: Engine, count: int) -> None:
    now = datetime(2025, 1, 1)
    rows = [{"path": f"bulk/{i:05d}.png", "type": "image", "status": "active", "has_nsfw": False,
             "created_at": now, "updated_at": now} for i in range(count)]
    with engine.begin() as conn:
        conn.execute(insert(Media), rows)


def test_sensor_registers_ten_thousand_new_rows_in_one_tick_with_one_range_run(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """10,000 new media rows -> ten partitions of 1,000 and one run over their range for exactly those
    items; the next tick adds none."""
    settings = settings_factory(sqlite_url)
    engine = make_engine(settings.database.url)
    init_db(engine)
    _insert_media_rows(engine, 10_000)
    resources = {"pipeline": PipelineResource.for_settings(settings)}
    with build_sensor_context(instance=instance, definitions=defs, resources=resources) as context:
        started = time.perf_counter()
        result = new_media_sensor(context)
        elapsed = time.perf_counter() - started
    print(f"\nnew_media_sensor: 10,000 new media rows registered in {elapsed:.2f} s (one tick)")

    assert isinstance(result, SensorResult) and result.skip_reason is None
    assert len(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME)) == 10
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.tags == {"dagster/asset_partition_range_start": "1-1000",
                            "dagster/asset_partition_range_end": "9001-10000"}
    assert request.run_key == "new-media-1-10000"
    assert request.run_config["ops"]["ollama_library"]["config"]["media_ids"] == list(range(1, 10_001))
    assert set(request.asset_selection) == {AssetKey(MEDIA), *(AssetKey(s) for s in STAGES)}
    assert result.cursor == "10000"

    with build_sensor_context(instance=instance, definitions=defs, resources=resources,
                              cursor=result.cursor) as context:
        again = new_media_sensor(context)
    assert isinstance(again, SensorResult) and not again.run_requests and again.skip_reason is not None
    assert len(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME)) == 10


def test_sensor_skips_with_a_reason_when_ollama_is_down(
        sqlite_url: str, settings_factory: Callable[..., Settings], instance: DagsterInstance) -> None:
    """Ollama unreachable: partitions are still registered, no run, the cursor stays for the next tick."""
    settings = settings_factory(sqlite_url, ollama__base_url=f"http://127.0.0.1:{_closed_port()}")
    engine = make_engine(settings.database.url)
    init_db(engine)
    _insert_media_rows(engine, 3)
    with build_sensor_context(instance=instance, definitions=defs,
                              resources={"pipeline": PipelineResource.for_settings(settings)}) as context:
        result = new_media_sensor(context)
    assert isinstance(result, SensorResult) and not result.run_requests and result.cursor is None
    message = result.skip_reason.skip_message if result.skip_reason else ""
    assert "is not reachable: network.connect" in message and "127.0.0.1" in message
    assert instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME) == ["1-1000"]


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
    """The commented PostgreSQL block of dagster.yaml (Dagster's own `storage: postgres`), used as README
    says, makes a working instance."""
    import uuid

    import yaml
    from sqlalchemy import create_engine, text

    text_yaml = (REPO / "dagster.yaml").read_text()
    block = text_yaml[text_yaml.index("# storage:"):]
    config = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                                      for line in block.splitlines()))
    assert config == {"storage": {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}}
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
        assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {"1-1000"}
        assert type(instance.event_log_storage).__module__.startswith("dagster_postgres")
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
