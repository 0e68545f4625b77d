"""Tests of the job API (§3): dedupe and exactly-once claims under concurrent processes, leases after a
killed worker, queue limits, validation and persistence errors, retries, the CLI, and clean logs (§5)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image
from sqlalchemy import Engine, func, insert, select, update

from ollama_pipeline.core import api
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaJob, Prompt
from ollama_pipeline.core.errors import PersistenceError, QueueLimitError, ValidationError
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline_tests.conftest import make_settings

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.runner import Pipeline

config, go, action, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
pipeline = Pipeline.from_settings(load_settings(config))
print("ready", flush=True)
deadline = time.monotonic() + 120
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("the go file never appeared")
    time.sleep(0.002)
if action == "enqueue":
    results = [jobs.enqueue_ollama(pipeline, "ollama_caption", m).model_dump() for m in json.loads(arg)]
    print(json.dumps(results), flush=True)
else:
    summary = jobs.process_jobs(pipeline, arg, concurrency=4)
    print(json.dumps(summary.model_dump()), flush=True)
"""


# ---- helpers -------------------------------------------------------------------------------------


def _pipeline(settings: Settings) -> Pipeline:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    return pipeline


def _add_media(engine: Engine, root: Path, count: int, prompt: str = "a lighthouse on a cliff at dusk") -> list[int]:
    """Small distinct PNG files plus media and prompts rows; returns the media ids."""
    root.mkdir(parents=True, exist_ok=True)
    with engine.begin() as conn:
        start = int(conn.execute(select(func.count()).select_from(Media)).scalar() or 0)
        ids = []
        for i in range(start, start + count):
            name = f"item_{i:04d}.png"
            Image.new("RGB", (32, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(root / name)
            media_id = conn.execute(insert(Media).values(path=name, type="image", width=32, height=24)
                                    .returning(Media.id)).scalar_one()
            conn.execute(insert(Prompt).values(media_id=media_id, prompt=f"{prompt} #{i}", model="sdxl"))
            ids.append(int(media_id))
    return ids


def _write_config(path: Path, settings: Settings) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def _job_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(OllamaJob).order_by(OllamaJob.id)).mappings()]


def _log_lines(settings: Settings, name: str = "ollama_jobs.jsonl") -> list[dict[str, Any]]:
    path = settings.logs_dir / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _meta_keys(engine: Engine, media_id: int) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(select(MediaMeta.key).where(MediaMeta.media_id == media_id))}


def _spawn(tmp_path: Path, config: Path, go: Path, action: str, arg: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(config), str(go), action, arg], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_together(procs: list[subprocess.Popen[str]], go: Path) -> None:
    """Wait until every child has imported everything, then release them at once."""
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"child did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    go.touch()


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 60) -> list[Any]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture
def offline_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for tests that never call a model (Ollama points at a closed port)."""

    def factory(db_url: str, **overrides: Any) -> Settings:
        return make_settings(db_url=db_url, media_root=tmp_path / "media", logs_dir=tmp_path / "LOGS",
                             base_url="http://127.0.0.1:9", **overrides)

    return factory


@pytest.fixture
def default_pipeline_reset() -> Iterator[None]:
    yield
    api.set_default_pipeline(None)


# ---- dedupe and claims under concurrency ---------------------------------------------------------


def test_eight_processes_enqueueing_the_same_jobs_create_each_job_once(
        db_url: str, offline_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Eight processes enqueueing the same ten jobs at once leave exactly ten jobs, one per media item."""
    settings = offline_settings(db_url)
    pipeline = _pipeline(settings)
    media_ids = _add_media(pipeline.engine, settings.media_root, 10)
    config, go = _write_config(tmp_path / "config.yaml", settings), tmp_path / "go"
    procs = [_spawn(tmp_path, config, go, "enqueue", json.dumps(media_ids)) for _ in range(8)]
    _start_together(procs, go)
    results = [r for batch in _finish(procs) for r in batch]

    rows = _job_rows(pipeline.engine)
    assert len(rows) == 10
    assert sorted(r["media_id"] for r in rows) == media_ids
    by_media: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_media.setdefault(r["media_id"], []).append(r)
    for media_id, row in zip(media_ids, rows, strict=True):
        statuses = Counter(r["status"] for r in by_media[media_id])
        assert statuses == {"queued": 1, "deduplicated": 7}
        assert {r["job_id"] for r in by_media[media_id]} == {row["id"]}
    events = Counter(line["event"] for line in _log_lines(settings))
    assert events["enqueued"] == 10 and events["deduplicated"] == 70


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_worker_processes_drain_200_jobs_each_exactly_once_on_postgresql(
        db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    """Two worker processes draining 200 queued jobs on PostgreSQL claim and finish every job exactly once."""
    settings = settings_factory(db_url)
    pipeline = _pipeline(settings)
    media_ids = _add_media(pipeline.engine, settings.media_root, 200)
    for media_id in media_ids:
        jobs.enqueue_ollama(pipeline, "ollama_title", media_id)
    config, go = _write_config(tmp_path / "config.yaml", settings), tmp_path / "go"
    procs = [_spawn(tmp_path, config, go, "process", f"worker-{i}") for i in range(2)]
    _start_together(procs, go)
    started = time.perf_counter()
    summaries = _finish(procs)
    elapsed = time.perf_counter() - started

    rows = _job_rows(pipeline.engine)
    assert len(rows) == 200
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    claimed = Counter(line["job_id"] for line in _log_lines(settings) if line["event"] == "claimed")
    assert set(claimed) == {r["id"] for r in rows} and set(claimed.values()) == {1}
    assert sum(s["processed"] for s in summaries) == 200 and all(s["processed"] > 0 for s in summaries)
    assert all("ollama.title" in _meta_keys(pipeline.engine, m) for m in media_ids[::20])
    print(f"\n200 jobs drained by 2 worker processes in {elapsed:.1f}s ({200 / elapsed:.0f} jobs/s)")


def test_claims_run_higher_priority_first_then_oldest(db_url: str, offline_settings: Callable[..., Settings]) -> None:
    """claim_jobs hands out the highest priority first, then the oldest, and never the same job twice."""
    settings = offline_settings(db_url)
    pipeline = _pipeline(settings)
    a, b, c = _add_media(pipeline.engine, settings.media_root, 3)
    low = jobs.enqueue_ollama(pipeline, "ollama_title", a).job_id
    high = jobs.enqueue_ollama(pipeline, "ollama_title", b, {"priority": 90}).job_id
    mid = jobs.enqueue_ollama(pipeline, "ollama_caption", c, {"priority": 40}).job_id
    first = jobs.claim_jobs(pipeline, "w1", 2)
    second = jobs.claim_jobs(pipeline, "w2", 5)
    assert [j.id for j in first] == [high, mid] and [j.id for j in second] == [low]
    assert all(j.status == "running" and j.attempts == 1 for j in first + second)
    assert jobs.claim_jobs(pipeline, "w3", 5) == []


def _hanging_in_the_model_call(emulator: Any) -> bool:
    """The emulator holds one model call open under its hang fault (counted, fault picked, not answered)."""
    held = emulator.stats()["inflight"] == 1
    return held and len(httpx.get(emulator.base_url + "/_emulator/requests", timeout=10).json()["requests"]) == 1


def test_killed_worker_leaves_no_partial_write_and_its_job_completes_after_the_lease(
        db_url: str, settings_factory: Callable[..., Settings], emulator: Any, tmp_path: Path) -> None:
    """A worker killed with SIGKILL mid-call writes nothing; after its lease runs out another worker finishes."""
    settings = settings_factory(db_url, pipeline__queue={"lease_seconds": 2}, ollama__timeout_ms=30_000)
    pipeline = _pipeline(settings)
    (media_id,) = _add_media(pipeline.engine, settings.media_root, 1)
    job_id = jobs.enqueue_ollama(pipeline, "ollama_title", media_id).job_id
    emulator.set_faults(["hang"])
    config, go = _write_config(tmp_path / "config.yaml", settings), tmp_path / "go"
    (proc,) = procs = [_spawn(tmp_path, config, go, "process", "doomed")]
    _start_together(procs, go)
    deadline = time.monotonic() + 20
    while not _hanging_in_the_model_call(emulator):  # the call is held by the hang fault: mid-call for sure
        assert time.monotonic() < deadline, "the worker never reached the model call"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    emulator.set_faults([])

    (row,) = _job_rows(pipeline.engine)
    assert row["status"] == "running" and row["worker"] == "doomed" and row["attempts"] == 1
    assert _meta_keys(pipeline.engine, media_id) == set()
    assert jobs.process_jobs(pipeline, "rescuer", wait_for_retries=False).processed == 0  # lease still valid
    deadline = time.monotonic() + settings.pipeline.queue.lease_seconds + 60
    while _job_rows(pipeline.engine)[0]["lease_until"] >= jobs._now():
        assert time.monotonic() < deadline, "the killed worker's lease never ran out"
        time.sleep(0.1)
    summary = jobs.process_jobs(pipeline, "rescuer")
    assert summary.succeeded == 1
    (row,) = _job_rows(pipeline.engine)
    assert (row["status"], row["attempts"], row["worker"]) == ("done", 2, "rescuer")
    assert "ollama.title" in _meta_keys(pipeline.engine, media_id)
    events = [(line["event"], line.get("reason")) for line in _log_lines(settings) if line["job_id"] == job_id]
    assert ("requeued", "lease_expired") in events and events[-1] == ("succeeded", None)


# ---- queue limits --------------------------------------------------------------------------------


def test_queue_overflow_refuses_the_next_job_and_names_max_queued(
        db_url: str, offline_settings: Callable[..., Settings]) -> None:
    """With max_queued=2 the third queued job is refused with queue_limit.overflow naming the limit."""
    settings = offline_settings(db_url, pipeline__queue={"max_queued": 2})
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 3)
    jobs.enqueue_ollama(pipeline, "ollama_caption", ids[0])
    jobs.enqueue_ollama(pipeline, "ollama_title", ids[1])
    with pytest.raises(QueueLimitError) as caught:
        jobs.enqueue_ollama(pipeline, "ollama_caption", ids[2])
    assert caught.value.code == "queue_limit.overflow"
    assert "max_queued=2" in caught.value.message
    assert jobs.enqueue_ollama(pipeline, "ollama_caption", ids[0]).status == "deduplicated"
    assert len(_job_rows(pipeline.engine)) == 2
    (error,) = _log_lines(settings, "ollama_errors.jsonl")
    assert error["code"] == "queue_limit.overflow" and error["media_id"] == ids[2]


def test_per_type_overflow_refuses_only_that_job_type(db_url: str, offline_settings: Callable[..., Settings]) -> None:
    """With max_queued_per_type=2 a third caption job is refused while a title job is still accepted."""
    settings = offline_settings(db_url, pipeline__queue={"max_queued_per_type": 2})
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 3)
    jobs.enqueue_ollama(pipeline, "ollama_caption", ids[0])
    jobs.enqueue_ollama(pipeline, "ollama_caption", ids[1])
    with pytest.raises(QueueLimitError) as caught:
        jobs.enqueue_ollama(pipeline, "ollama_caption", ids[2])
    assert caught.value.code == "queue_limit.overflow_job_type"
    assert "max_queued_per_type=2" in caught.value.message and "ollama_caption" in caught.value.message
    assert jobs.enqueue_ollama(pipeline, "ollama_title", ids[2]).status == "queued"


def test_rate_limit_counts_enqueues_of_the_last_minute(db_url: str, offline_settings: Callable[..., Settings]) -> None:
    """With max_enqueues_per_minute=3 the fourth enqueue within a minute is refused even after cancels."""
    settings = offline_settings(db_url, pipeline__queue={"max_enqueues_per_minute": 3})
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 4)
    for media_id in ids[:3]:
        jobs.cancel_job(pipeline, jobs.enqueue_ollama(pipeline, "ollama_caption", media_id).job_id)
    with pytest.raises(QueueLimitError) as caught:
        jobs.enqueue_ollama(pipeline, "ollama_caption", ids[3])
    assert caught.value.code == "queue_limit.rate"
    assert "max_enqueues_per_minute=3" in caught.value.message
    with pipeline.engine.begin() as conn:  # a minute later the window is free again
        conn.execute(update(OllamaJob).values(created_at=jobs._now().replace(year=2020)))
    assert jobs.enqueue_ollama(pipeline, "ollama_caption", ids[3]).status == "queued"


# ---- validation and persistence errors -----------------------------------------------------------


def test_validation_errors_name_the_job_type_media_and_payload_field(
        db_url: str, offline_settings: Callable[..., Settings]) -> None:
    """Unknown job types, missing media and bad payloads are refused with their code and create no job."""
    settings = offline_settings(db_url)
    pipeline = _pipeline(settings)
    (media_id,) = _add_media(pipeline.engine, settings.media_root, 1)
    cases = [
        (("ollama_haiku", media_id, None), "validation.job_type", "ollama_haiku"),
        (("ollama_caption", 4242, None), "validation.media_missing", "4242"),
        (("ollama_caption", media_id, {"priority": 500}), "validation.payload", "priority"),
        (("ollama_caption", media_id, {"colour": "red"}), "validation.payload", "colour"),
        (("ollama_caption", media_id, {"force": "yes"}), "validation.payload", "force"),
    ]
    for args, code, named in cases:
        with pytest.raises(ValidationError) as caught:
            jobs.enqueue_ollama(pipeline, *args)
        assert caught.value.code == code and named in caught.value.message
    assert _job_rows(pipeline.engine) == []


def test_locked_sqlite_database_becomes_persistence_locked_and_keeps_earlier_rows(
        sqlite_url: str, offline_settings: Callable[..., Settings]) -> None:
    """An enqueue against a database another connection holds locked fails as persistence.locked."""
    settings = offline_settings(sqlite_url, database={"url": sqlite_url, "busy_timeout_ms": 20, "lock_retries": 2})
    pipeline = _pipeline(settings)
    first, second = _add_media(pipeline.engine, settings.media_root, 2)
    earlier = jobs.enqueue_ollama(pipeline, "ollama_caption", first)
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE media SET rating = 5 WHERE id = ?", (second,))
        with pytest.raises(PersistenceError) as caught:
            jobs.enqueue_ollama(pipeline, "ollama_caption", second)
        assert caught.value.code == "persistence.locked" and caught.value.retryable
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rows = _job_rows(pipeline.engine)
    assert [(r["id"], r["media_id"], r["status"]) for r in rows] == [(earlier.job_id, first, "queued")]
    assert any(e["code"] == "persistence.locked" for e in _log_lines(settings, "ollama_errors.jsonl"))
    assert jobs.enqueue_ollama(pipeline, "ollama_caption", second).status == "queued"


# ---- retries, CLI, seed API ----------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    from ollama_pipeline.app.cli import main

    code = main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_retryable_failures_end_failed_after_max_attempts_and_jobs_retry_requeues(
        db_url: str, settings_factory: Callable[..., Settings], emulator: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """HTTP 500 on every call: the job is retried, then failed for good; `jobs retry` queues it again."""
    settings = settings_factory(db_url)
    pipeline = _pipeline(settings)
    (media_id,) = _add_media(pipeline.engine, settings.media_root, 1, prompt="[[fault:http_500]] a red fox")
    job_id = jobs.enqueue_ollama(pipeline, "ollama_title", media_id).job_id
    summary = jobs.process_jobs(pipeline, "w1")
    assert (summary.retried, summary.failed, summary.succeeded) == (1, 1, 0)
    (row,) = _job_rows(pipeline.engine)
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("failed", 2, 2)
    assert (row["error_channel"], row["error_code"], row["retryable"]) == ("network", "network.server_error", True)
    events = [line["event"] for line in _log_lines(settings) if line["job_id"] == job_id]
    assert events.count("claimed") == 2 and events.index("retried") < events.index("failed")
    assert _meta_keys(pipeline.engine, media_id) == set()

    config = _write_config(tmp_path / "config.yaml", settings)
    code, out, err = _cli(capsys, config, "jobs", "retry", str(job_id))
    assert code == 0 and f"job {job_id} requeued" in out
    (row,) = _job_rows(pipeline.engine)
    assert (row["status"], row["attempts"]) == ("queued", 0)
    code, out, err = _cli(capsys, config, "jobs", "retry", str(job_id))
    assert code == 2 and err.startswith("error [validation/validation.payload]: ") and "queued" in err
    with pipeline.engine.begin() as conn:
        conn.execute(update(Prompt).where(Prompt.media_id == media_id).values(prompt="a red fox"))
    code, out, err = _cli(capsys, config, "process", "--job", str(job_id))
    assert code == 0 and "-> done" in out
    assert "ollama.title" in _meta_keys(pipeline.engine, media_id)


def test_cli_enqueues_processes_lists_and_counts_with_plain_progress_lines(
        sqlite_url: str, settings_factory: Callable[..., Settings], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI queues a range, drains it with `processed n/N (rate, eta)` lines off a TTY, and reports."""
    settings = settings_factory(sqlite_url, pipeline__queue={"max_queued": 12})
    pipeline = _pipeline(settings)
    ids = _add_media(pipeline.engine, settings.media_root, 12)
    config = _write_config(tmp_path / "config.yaml", settings)
    code, out, _ = _cli(capsys, config, "enqueue", "ollama_title", f"{ids[0]}-{ids[-1]}", "--priority", "10")
    assert code == 0 and "enqueue: 12 queued, 0 deduplicated" in out
    code, out, err = _cli(capsys, config, "enqueue", "--all-stages", str(ids[0]), "--quiet")
    assert code == 2 and err.strip().startswith("error [queue_limit/queue_limit.overflow]: ")
    assert "max_queued=12" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _cli(capsys, config, "process", "--concurrency", "3")
    assert code == 0
    assert re.search(r"^processed 10/12 \(\d+\.\d/s, eta \d+s\)$", out, re.M)
    assert "processed 12 job(s)" in out and "12 done" in out
    code, out, _ = _cli(capsys, config, "jobs", "list", "--status", "done", "--json", "--limit", "100")
    listed = json.loads(out)
    assert code == 0 and len(listed) == 12 and {j["priority"] for j in listed} == {10}
    code, out, _ = _cli(capsys, config, "jobs", "counts", "--json")
    assert json.loads(out)["by_type"]["ollama_title"]["done"] == 12
    code, out, err = _cli(capsys, config, "jobs", "cancel", str(listed[0]["id"]))
    assert code == 2 and "only queued jobs can be cancelled" in err
    code, out, err = _cli(capsys, config, "enqueue", "ollama_caption", str(ids[0]), "--payload", '{"force": 1}')
    assert code == 2 and "field 'force'" in err


def test_seed_api_enqueues_processes_and_persists_through_the_default_pipeline(
        sqlite_url: str, settings_factory: Callable[..., Settings], default_pipeline_reset: None) -> None:
    """enqueue_ollama/process_ollama_job/persist_ollama_result work without passing a pipeline."""
    settings = settings_factory(sqlite_url)
    pipeline = _pipeline(settings)
    api.set_default_pipeline(pipeline)
    (media_id,) = _add_media(pipeline.engine, settings.media_root, 1)
    queued = api.enqueue_ollama("ollama_title", media_id, {"force": True})
    assert api.enqueue_ollama("ollama_title", media_id).status == "deduplicated"
    outcome = api.process_ollama_job(queued.job_id)
    assert (outcome.status, outcome.item_status, outcome.attempt) == ("done", "written", 1)
    assert outcome.eval_count > 0 and "ollama.title" in outcome.changed_keys
    assert api.process_ollama_job(queued.job_id).claimed is False
    succeeded = [line for line in _log_lines(settings) if line["event"] == "succeeded"]
    assert set(succeeded[0]) >= {"ts", "event", "job_id", "media_id", "job_type", "model", "attempt",
                                 "duration_ms", "prompt_eval_count", "eval_count"}
    result = {"stage": "ollama_title", "model": "m", "version": "v", "fingerprint": "f",
              "ran_at": "2025-01-01T00:00:00Z", "output": {"meta": {"ollama.title": {"text": "A fox, by hand"}}}}
    assert "ollama.title" in api.persist_ollama_result(media_id, result)["changed_keys"]
    with pytest.raises(ValidationError) as caught:
        api.persist_ollama_result(media_id, {**result, "output": {"meta": {"ollama.quality": {}}}})
    assert caught.value.code == "validation.payload" and "ollama.quality" in caught.value.message


def test_persist_ollama_result_refuses_invalid_values_and_provenance_keys_and_stores_nothing(
        sqlite_url: str, settings_factory: Callable[..., Settings], default_pipeline_reset: None) -> None:
    """persist_ollama_result validates every value against its stored schema and refuses ollama.model & co."""
    settings = settings_factory(sqlite_url)
    pipeline = _pipeline(settings)
    api.set_default_pipeline(pipeline)
    (media_id,) = _add_media(pipeline.engine, settings.media_root, 1)
    base = {"stage": "ollama_caption", "model": "m", "version": "v", "fingerprint": "f",
            "ran_at": "2025-01-01T00:00:00Z"}
    good = {"ollama.caption": {"text": "A fox."}, "ollama.description": {"text": "A red fox in snow."}}

    def meta_rows() -> list[tuple[str, str]]:
        with pipeline.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(MediaMeta.key, MediaMeta.value)
                                                   .where(MediaMeta.media_id == media_id).order_by(MediaMeta.key))]

    bad_outputs = [
        ({"meta": {**good, "ollama.caption": "NOT AN OBJECT"}}, "validation.stored_value", "ollama.caption"),
        ({"meta": {**good, "ollama.model": 5}}, "validation.payload", "ollama.model"),
        ({"meta": {**good, "ollama.last_run_at": {"ollama_caption": "x"}}}, "validation.payload",
         "ollama.last_run_at"),
        ({"meta": {**good, "ollama.description": {"text": ""}}}, "validation.stored_value", "ollama.description"),
    ]
    for output, code, named in bad_outputs:
        with pytest.raises(ValidationError) as caught:
            api.persist_ollama_result(media_id, {**base, "output": output})
        assert caught.value.code == code and named in caught.value.message
        assert meta_rows() == []
    quality = {"stage": "ollama_quality", **{k: v for k, v in base.items() if k != "stage"},
               "output": {"meta": {"ollama.quality": {"score": 0.5, "verdict": "ok", "issues": [], "summary": "s"}},
                          "quality": {"status": "great", "score": 7}}}
    with pytest.raises(ValidationError) as caught:
        api.persist_ollama_result(media_id, quality)
    assert caught.value.code == "validation.stored_value" and meta_rows() == []

    changed = api.persist_ollama_result(media_id, {**base, "output": {"meta": good}})["changed_keys"]
    assert sorted(changed) == sorted(set(changed))
    assert set(changed) == {"ollama.caption", "ollama.description", "ollama.model", "ollama.version",
                            "ollama.last_run_at"}
    stored = dict(meta_rows())
    assert json.loads(stored["ollama.caption"]) == {"text": "A fox."}
    assert json.loads(stored["ollama.model"]) == {"ollama_caption": "m"}


# ---- logs after a chaos run ----------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_logs_after_a_chaos_run_hold_no_secret_no_base64_and_only_whole_json_lines(
        db_url: str, settings_factory: Callable[..., Settings], emulator: Any, tmp_path: Path) -> None:
    """Faults, credentials in the Ollama and database URLs, two worker processes: every log line is clean JSON."""
    port = emulator.base_url.rsplit(":", 1)[1].strip("/")
    db_with_password = db_url.replace("postgres@", "postgres:dbs3cretpw@", 1)
    settings = settings_factory(db_with_password, ollama__base_url=f"http://user:s3cretpw@127.0.0.1:{port}",
                                ollama__retry={"max_attempts": 2, "backoff_ms": 5})
    pipeline = _pipeline(settings)
    faults = ["", "[[fault:http_500]] ", "[[fault:prose]] ", "", "[[fault:code_fence]] "]
    ids: list[int] = []
    for i in range(40):
        ids += _add_media(pipeline.engine, settings.media_root, 1, prompt=f"{faults[i % len(faults)]}a cat")
    for media_id in ids:
        jobs.enqueue_ollama(pipeline, "ollama_caption", media_id)
        jobs.enqueue_ollama(pipeline, "ollama_title", media_id)
    config, go = _write_config(tmp_path / "config.yaml", settings), tmp_path / "go"
    procs = [_spawn(tmp_path, config, go, "process", f"chaos-{i}") for i in range(2)]
    _start_together(procs, go)
    _finish(procs)
    jobs.process_jobs(pipeline, "sweeper")

    counts = jobs.queue_counts(pipeline)
    assert counts.total["queued"] == counts.total["running"] == 0 and counts.total["failed"] > 0
    assert counts.by_type["ollama_caption"]["done"] > 0 and counts.by_type["ollama_title"]["done"] > 0
    logs = sorted(settings.logs_dir.glob("*.jsonl"))
    assert {p.name for p in logs} == {"ollama_jobs.jsonl", "ollama_errors.jsonl"}
    secrets = ["s3cretpw", "dbs3cretpw", "dXNlcjpzM2NyZXRwdw"]  # the last: base64 of user:s3cretpw
    lines = 0
    for path in logs:
        raw = path.read_text(encoding="utf-8")
        assert not re.search(r"[A-Za-z0-9+/=]{101,}", raw)
        assert not [s for s in secrets if s in raw]
        for line in raw.splitlines():
            assert isinstance(json.loads(line), dict)
            lines += 1
    assert lines > 200
