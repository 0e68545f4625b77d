"""Runs and jobs that stay correct when things go wrong, tested through the CLI, the job API and the
database (not through Dagster internals): queue order between dependent stages, `run` with Ollama down,
the circuit breaker, the model calls counted in failure logs, and killed runs (heartbeats)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from sqlalchemy import Engine, insert, select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import Media, OllamaJob, OllamaStageResult, Prompt
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline, run_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTION, TITLE = "ollama_caption", "ollama_title"


def _pipeline(settings: Settings) -> Pipeline:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    return pipeline


def _add_media(engine: Engine, root: Path, count: int) -> list[int]:
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    with engine.begin() as conn:
        for n in range(1, count + 1):
            Image.new("RGB", (32, 24), ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256)).save(root / f"{n}.png")
            media_id = conn.execute(insert(Media).values(path=f"{n}.png", type="image", width=32, height=24)
                                    .returning(Media.id)).scalar_one()
            conn.execute(insert(Prompt).values(media_id=media_id, prompt=f"a lighthouse zq{n}x at dusk", model="sdxl"))
            ids.append(int(media_id))
    return ids


def _write_config(path: Path, settings: Settings) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    from ollama_pipeline.app.cli import main

    code = main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _jobs_by(engine: Engine) -> dict[tuple[str, int], dict[str, Any]]:
    with engine.connect() as conn:
        return {(r["job_type"], r["media_id"]): dict(r) for r in conn.execute(select(OllamaJob)).mappings()}


def _results(engine: Engine, stage: str) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(OllamaStageResult).where(OllamaStageResult.stage == stage)).mappings()
        return {int(r["media_id"]): dict(r) for r in rows}


def _log(settings: Settings, name: str = "ollama_jobs.jsonl") -> list[dict[str, Any]]:
    path = settings.logs_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


# ---- queue order (issue 11 item 6) --------------------------------------------------------------------


def test_title_jobs_wait_for_the_caption_job_of_their_item(
        db_url: str, settings_factory: Callable[..., Settings], emulator: Any) -> None:
    """Titles queued before their captions are claimed only after the caption job ended, so every title
    is made from a stored caption."""
    settings = settings_factory(db_url)
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 8)
    for media_id in ids:  # the adversarial order: every title first
        jobs.enqueue_ollama(pipeline, TITLE, media_id)
    for media_id in ids:
        jobs.enqueue_ollama(pipeline, CAPTION, media_id)
    summary = jobs.process_jobs(pipeline, "w1", concurrency=4)
    assert (summary.succeeded, summary.failed) == (16, 0)
    claimed = [(e["job_type"], e["media_id"]) for e in _log(settings) if e["event"] == "claimed"]
    for media_id in ids:
        assert claimed.index((CAPTION, media_id)) < claimed.index((TITLE, media_id))
    # every title was made from the stored caption: a title run now finds nothing changed (before the fix,
    # a later `run --stages title` rewrote most titles)
    again = list(run_stage(pipeline, TITLE, ids))
    assert {o.status for o in again} == {"skipped"}


def test_a_title_job_whose_caption_failed_fails_as_upstream_failed_without_a_model_call(
        sqlite_url: str, settings_factory: Callable[..., Settings], emulator: Any) -> None:
    """One item's file is gone, so its caption fails: its title job fails with upstream_failed.ollama_caption
    and the text model is never asked for it; the other item's title is made."""
    settings = settings_factory(sqlite_url)
    pipeline = _pipeline(settings)
    bad, good = _add_media(pipeline.engine, settings.media_root, 2)
    (settings.media_root / "1.png").unlink()
    for media_id in (bad, good):
        jobs.enqueue_ollama(pipeline, CAPTION, media_id)
        jobs.enqueue_ollama(pipeline, TITLE, media_id)
    jobs.process_jobs(pipeline, "w1", concurrency=2)
    rows = _jobs_by(pipeline.engine)
    assert rows[(CAPTION, bad)]["status"] == "failed"
    title = rows[(TITLE, bad)]
    assert (title["status"], title["error_channel"], title["error_code"]) == (
        "failed", "blocked", "upstream_failed.ollama_caption")
    assert rows[(TITLE, good)]["status"] == "done"
    assert _results(pipeline.engine, TITLE)[bad]["error_code"] == "upstream_failed.ollama_caption"
    assert emulator.stats()["by_model"].get("llama3.2:3b", 0) == 1  # the good item's title only


# ---- Ollama down, circuit breaker, calls in failure logs (issue 11 item 10) -----------------------------


def test_run_with_ollama_down_stops_with_one_message_and_touches_nothing(
        sqlite_url: str, settings_factory: Callable[..., Settings], tmp_path: Path, dagster_home: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`run` asks Ollama for its health first: one line on stderr, exit 2, no stage result written."""
    settings = settings_factory(sqlite_url, ollama__base_url="http://127.0.0.1:9")
    pipeline = _pipeline(settings)
    _add_media(pipeline.engine, settings.media_root, 5)
    config = _write_config(tmp_path / "config.yaml", settings)
    code, out, err = _cli(capsys, config, "run", "--stages", "caption")
    assert code == 2
    assert err.strip().startswith("error [network/network.unavailable]: Ollama at http://127.0.0.1:9")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _results(pipeline.engine, CAPTION) == {}


def test_circuit_breaker_stops_the_run_and_leaves_untried_items_untouched(
        sqlite_url: str, settings_factory: Callable[..., Settings], emulator: Any, tmp_path: Path,
        dagster_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every model call answers 500: the run stops after pipeline.circuit_breaker failures in a row, the
    items it never tried have no stage result, and each failure log line counts the calls really made."""
    settings = settings_factory(sqlite_url, pipeline__circuit_breaker=3, pipeline__concurrency=2)
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 40)
    emulator.set_faults(["http_500"])
    config = _write_config(tmp_path / "config.yaml", settings)
    code, out, err = _cli(capsys, config, "run", "--stages", "caption,title")
    assert code == 1 and "STOPPED" in out and "circuit breaker" in out
    failed = _results(pipeline.engine, CAPTION)
    assert 3 <= len(failed) <= 3 + 2  # the breaker's count plus what was in flight when it opened
    assert all(r["status"] == "failed" and r["error_code"] == "network.server_error" for r in failed.values())
    assert _results(pipeline.engine, TITLE) == {}
    untouched = [i for i in ids if i not in failed]
    assert f"untouched {len(untouched)}" in out
    lines = [e for e in _log(settings) if e["event"] == "stage_failed"]
    assert {e["calls"] for e in lines} == {settings.ollama.retry.max_attempts}
    assert sum(e["calls"] for e in lines) == emulator.stats()["model_calls"]


# ---- killed runs (issue 11 item 5) ----------------------------------------------------------------------


def _heartbeats(engine: Engine) -> list[dict[str, Any]]:
    from ollama_pipeline.core.db.models import OllamaRunHeartbeat

    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(OllamaRunHeartbeat)).mappings()]


def _wait_for(what: str, check: Callable[[], Any], deadline_s: float = 60.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    """End a process started in its own session, and everything in its group (code server, run workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_killed_run_no_longer_blocks_the_queue_under_the_dagster_daemon(
        sqlite_url: str, settings_factory: Callable[..., Settings], emulator: Any, tmp_path: Path,
        dagster_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 of `ollama-pipeline run` leaves its Dagster run STARTED; with `max_concurrent_runs: 1`, jobs then
    queued over the same items are worked by a real `dagster-daemon`: a queued_jobs_sensor tick marks the
    orphan failed (its heartbeat stopped) with the reason, the queued run starts and completes, every job ends
    done and every item has its caption. Nobody marks the orphan by hand."""
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

    from ollama_pipeline.defs.job_sensors import BATCH_TAG

    settings = settings_factory(sqlite_url, pipeline__heartbeat_seconds=0.2, pipeline__concurrency=1)
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 12)
    config = _write_config(tmp_path / "config.yaml", settings)
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    assert yaml.safe_load((dagster_home / "dagster.yaml").read_text())["run_queue"]["max_concurrent_runs"] == 1
    emulator.set_faults(["latency:250"])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DAGSTER_HOME": str(dagster_home),
           "OLLAMA_PIPELINE_CONFIG": str(config), "DAGSTER_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), "run",
                             "--stages", "caption"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("the run's first result", lambda: _heartbeats(pipeline.engine) and _results(pipeline.engine, CAPTION))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    (orphan,) = _heartbeats(pipeline.engine)
    assert orphan["status"] == "running"
    with DagsterInstance.get() as instance:
        assert instance.get_run_by_id(orphan["run_id"]).status == DagsterRunStatus.STARTED
    emulator.set_faults([])

    code, out, err = _cli(capsys, config, "enqueue", CAPTION, f"{ids[0]}-{ids[-1]}")
    assert code == 0, err
    assert {j["status"] for j in _jobs_by(pipeline.engine).values()} == {"queued"} and len(_jobs_by(pipeline.engine)) == 12
    assert _heartbeats(pipeline.engine)[0]["status"] == "running"  # enqueueing does not touch the orphan

    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        # Its own session: the daemon, its code server and the run worker it launches stop together at the end.
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                   str(REPO_ROOT / "workspace.yaml")], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def all_jobs_ended() -> bool:
                assert daemon.poll() is None, log_path.read_text()[-3000:]
                return {j["status"] for j in _jobs_by(pipeline.engine).values()} <= {"done", "failed"}

            def queued_run_finished() -> list[Any]:
                with DagsterInstance.get() as instance:
                    runs = instance.get_runs(filters=RunsFilter(tags={BATCH_TAG: list({
                        j["worker"] for j in _jobs_by(pipeline.engine).values() if j["worker"]})}))
                    return runs if runs and all(r.is_finished for r in runs) else []

            # deadlines of the polls only: the daemon loads the code location, ticks, launches a run process
            _wait_for("the queued jobs to be worked by a Dagster run", all_jobs_ended, deadline_s=300)
            runs = _wait_for("the queued run to finish", queued_run_finished, deadline_s=120)
        finally:
            _stop_group(daemon)

    jobs_now = _jobs_by(pipeline.engine)
    assert {j["status"] for j in jobs_now.values()} == {"done"}, jobs_now
    assert {m for m, r in _results(pipeline.engine, CAPTION).items() if r["status"] == "ok"} == set(ids)
    (beat,) = [b for b in _heartbeats(pipeline.engine) if b["run_id"] == orphan["run_id"]]
    assert beat["status"] == "failed" and "killed or lost" in beat["reason"]
    with DagsterInstance.get() as instance:
        assert instance.get_run_by_id(orphan["run_id"]).status == DagsterRunStatus.FAILURE
        (failure,) = instance.all_logs(orphan["run_id"], of_type=DagsterEventType.RUN_FAILURE)
        assert "no heartbeat for" in failure.message
        assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS] * len(runs)
        for run in runs:  # launched through the run queue, which the orphan no longer holds
            assert instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_ENQUEUED)
