"""The code location on a `dagster.yaml` it did not write, as a platform team runs Dagster: PostgreSQL run,
event log and schedule storage (a database of its own per test run, dropped), the queued run coordinator
with limits, run monitoring, and the Dagster daemon. The new-media sensor's tick launches a partitioned
run that goes through the run queue and materializes every block of the library."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import Engine, create_engine, func, select, text

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline_tests.test_dagster_webserver import _stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CAPTION = "ollama_caption"


def _postgres_db(db_name: str) -> dict[str, Any]:
    return {"postgres_db": {"username": "postgres", "password": {"env": "DAGSTER_PG_PASSWORD"},
                            "hostname": "127.0.0.1", "db_name": db_name, "port": 5432}}


def platform_dagster_yaml(db_name: str, home: Path) -> dict[str, Any]:
    """A deployment's instance file in the shape of Dagster's Helm chart: nothing of this project in it."""
    storages = {"run_storage": ("dagster_postgres.run_storage", "PostgresRunStorage"),
                "event_log_storage": ("dagster_postgres.event_log", "PostgresEventLogStorage"),
                "schedule_storage": ("dagster_postgres.schedule_storage", "PostgresScheduleStorage")}
    config: dict[str, Any] = {key: {"module": module, "class": cls, "config": _postgres_db(db_name)}
                              for key, (module, cls) in storages.items()}
    config.update({
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"max_concurrent_runs": 4,
                                       "tag_concurrency_limits": [{"key": "dagster/backfill", "limit": 2}]}},
        "run_launcher": {"module": "dagster.core.launcher", "class": "DefaultRunLauncher"},
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "poll_interval_seconds": 5},
        "compute_logs": {"module": "dagster.core.storage.local_compute_log_manager",
                         "class": "LocalComputeLogManager", "config": {"base_dir": str(home / "compute_logs")}},
        "telemetry": {"enabled": False},
    })
    return config


@pytest.fixture
def dagster_pg_database(pg_database: str) -> Iterator[str]:
    """A PostgreSQL database for Dagster's instance, made for this test and dropped after it."""
    admin_url = pg_database.rsplit("/", 1)[0] + "/postgres"
    name = f"dagster_platform_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _run(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_sensor_tick_and_partitioned_run_work_on_a_platform_teams_postgres_queued_instance(
        library: tuple[Settings, Engine, list[int]], dagster_pg_database: str, tmp_path: Path,
        emulator: Any) -> None:
    """Daemon + QueuedRunCoordinator + run monitoring + PostgreSQL storage: the sensor's run is queued,
    dequeued, launched and materializes the three blocks of a six-item library."""
    settings, engine, ids = library
    config_file = tmp_path / "ollama_pipeline.yaml"
    data = settings.model_dump(mode="json", by_alias=True)
    data["pipeline"]["partition_size"] = 2
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    home = tmp_path / "platform_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(platform_dagster_yaml(dagster_pg_database, home)))
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
           "OLLAMA_PIPELINE_CONFIG": str(config_file), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    started = _run([str(BIN / "dagster"), "sensor", "start", "new_media_sensor", "-w", "workspace.yaml"], env)
    assert started.returncode == 0, started.stdout + started.stderr
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    previous = os.environ.get("DAGSTER_PG_PASSWORD")
    os.environ["DAGSTER_PG_PASSWORD"] = env["DAGSTER_PG_PASSWORD"]
    instance = DagsterInstance.from_config(str(home))
    try:
        deadline = time.monotonic() + 240
        runs = []
        while time.monotonic() < deadline:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            runs = instance.get_runs(RunsFilter(tags={"dagster/sensor_name": "new_media_sensor"}))
            if runs and runs[0].status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE,
                                           DagsterRunStatus.CANCELED):
                break
            time.sleep(0.5)
        assert runs, "the sensor launched no run within 240 s:\n" + (tmp_path / "daemon.log").read_text()[-3000:]
        run = runs[0]
        assert run.status == DagsterRunStatus.SUCCESS, (tmp_path / "daemon.log").read_text()[-3000:]
        assert run.tags["dagster/asset_partition_range_start"] == "1-2"
        assert run.tags["dagster/asset_partition_range_end"] == "5-6"
        kinds = [e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event]
        assert kinds.index(DagsterEventType.RUN_ENQUEUED) < kinds.index(DagsterEventType.RUN_STARTING)  # the queue
        assert set(instance.get_materialized_partitions(AssetKey(CAPTION))) == {"1-2", "3-4", "5-6"}
        with engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(OllamaStageResult)
                                .where(OllamaStageResult.stage == CAPTION,
                                       OllamaStageResult.status == "ok")).scalar_one()
        assert done == len(ids)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.event_log_storage).__module__.startswith("dagster_postgres")
    finally:
        instance.dispose()
        if previous is None:
            os.environ.pop("DAGSTER_PG_PASSWORD", None)
        else:
            os.environ["DAGSTER_PG_PASSWORD"] = previous
        _stop_group(daemon)
        log.close()
