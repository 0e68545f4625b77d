"""The job queue in Dagster on real SQLite/PostgreSQL libraries, a real Dagster instance and the emulator:
queued jobs become batched range runs, each run processes its jobs and records their end states, leases of
waiting runs are kept, the refresh schedule re-runs stale and retryable-failed items, and every error code is
documented."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    ScheduleEvaluationContext,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    in_process_executor,
)
from PIL import Image
from sqlalchemy import insert, select, update

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaJob, OllamaStageResult, Prompt
from ollama_pipeline.core.errors import ERROR_CODES
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.definitions import defs
from ollama_pipeline.defs.assets import all_assets
from ollama_pipeline.defs.job_sensors import (
    BATCH_TAG,
    JOB_COUNT_TAG,
    JOB_IDS_TAG,
    JOB_TYPE_TAG,
    REFRESH_TAG,
    ollama_refresh_schedule,
    queued_jobs_sensor,
    queued_jobs_tick,
)
from ollama_pipeline.defs.launch import materialize_stages
from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME, RANGE_END_TAG, RANGE_START_TAG
from ollama_pipeline.defs.resources import PipelineResource

PACKAGE = Path(__file__).resolve().parents[1] / "ollama_pipeline"
README = PACKAGE.parent / "README.md"
CAPTION, TITLE = "ollama_caption", "ollama_title"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


class Library:
    """A library database with media files, the resource the sensors get, and helpers to drive ticks."""

    def __init__(self, settings: Settings, instance: DagsterInstance, count: int) -> None:
        self.settings = settings
        self.instance = instance
        self.resource = PipelineResource.for_settings(settings)
        self.core: Pipeline = self.resource.pipeline()
        init_db(self.core.engine)
        self.ids = self._add_media(count)

    def _add_media(self, count: int) -> list[int]:
        """Distinct small PNGs; generation prompts carry a token (zq<n>x) that emulator faults can match."""
        root = self.settings.media_root
        root.mkdir(parents=True, exist_ok=True)
        ids = []
        with self.core.engine.begin() as conn:
            for n in range(1, count + 1):
                Image.new("RGB", (32, 24), ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256)).save(root / f"{n}.png")
                media_id = conn.execute(insert(Media).values(path=f"{n}.png", type="image", width=32, height=24)
                                        .returning(Media.id)).scalar_one()
                conn.execute(insert(Prompt).values(media_id=media_id, prompt=f"a lighthouse zq{n}x at dusk",
                                                   model="sdxl"))
                ids.append(int(media_id))
        return ids

    def register_all(self) -> None:
        """The partitions of all media, in id order (what new_media_sensor does)."""
        scheme = Partitioning(size=self.settings.pipeline.partition_size)
        self.instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, scheme.keys_of(self.ids))

    def enqueue(self, job_type: str, media_ids: list[int], payload: dict[str, Any] | None = None) -> list[int]:
        return [jobs.enqueue_ollama(self.core, job_type, m, payload).job_id for m in media_ids]

    def tick(self) -> SensorResult:
        with build_sensor_context(instance=self.instance, definitions=defs,
                                  resources={"pipeline": self.resource}) as context:
            result = queued_jobs_sensor(context)
        assert isinstance(result, SensorResult)
        return result

    def schedule_context(self) -> ScheduleEvaluationContext:
        """A context for ollama_refresh_schedule; enter it (`with`). Given a persistent instance, a schedule
        context opens its own DagsterInstance from the instance's ref on first use, and that instance makes
        its defs-state storage Dagster's current one (a ContextVar) until the context is closed. Left open,
        the GC closes it some time later - possibly in another test - and the ContextVar is then reset to
        this test's long-disposed instance: "Attempted to resolve undefined DagsterInstance weakref"."""
        return build_schedule_context(instance=self.instance, resources={"pipeline": self.resource},
                                      scheduled_execution_time=datetime(2026, 1, 2, 3, 0))

    def execute(self, requests: list[RunRequest]) -> list[bool]:
        """Run the requested runs in process, as the daemon would launch them: same selection, config, tags."""
        run_defs = Definitions(assets=all_assets, resources={"pipeline": self.resource},
                               executor=in_process_executor)
        job = run_defs.resolve_implicit_global_asset_job_def()
        outcomes = []
        for request in requests:
            result = job.execute_in_process(instance=self.instance, asset_selection=list(request.asset_selection or []),
                                            run_config={**(request.run_config or {}), **QUIET},
                                            tags=dict(request.tags), raise_on_error=False)
            outcomes.append(result.success)
        return outcomes

    def job(self, job_id: int) -> jobs.Job:
        return jobs.get_job(self.core, job_id)

    def meta(self, key: str) -> dict[int, Any]:
        with self.core.engine.connect() as conn:
            rows = conn.execute(select(MediaMeta.media_id, MediaMeta.value).where(MediaMeta.key == key)).all()
        return {int(m): json.loads(v) for m, v in rows}

    def log_events(self) -> list[dict[str, Any]]:
        path = self.settings.logs_dir / "ollama_jobs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def library_for(instance: DagsterInstance, settings_factory: Callable[..., Settings]) -> Callable[..., Library]:
    def make(db_url: str, count: int, **overrides: Any) -> Library:
        return Library(settings_factory(db_url, **overrides), instance, count)

    return make


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _by_type_and_range(requests: list[RunRequest]) -> dict[tuple[str, str, str], RunRequest]:
    return {(r.tags[JOB_TYPE_TAG], r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]): r for r in requests}


# ---- queued_jobs_sensor + job_runs_sensor ----------------------------------------------------------


def test_queued_jobs_run_as_batched_runs_that_record_their_jobs_end_states(
        db_url: str, library_for: Callable[..., Library], emulator: Any) -> None:
    """Jobs of two types over six items (one partition): the tick requests one run per (type, force, model),
    titles only after their captions' jobs ended; each run processes its claimed jobs and writes their end
    states itself, so after the runs every job is done and media_meta holds exactly those items."""
    lib = library_for(db_url, 6)
    lib.register_all()
    m = lib.ids
    caption_jobs = lib.enqueue(CAPTION, [m[0], m[1], m[2], m[4]])
    forced_title_jobs = lib.enqueue(TITLE, [m[0], m[1]], {"force": True})
    other_model_job = lib.enqueue(TITLE, [m[5]], {"model": "qwen3:4b"})

    result = lib.tick()

    assert result.skip_reason is None
    runs = {(r.tags[JOB_TYPE_TAG], r.tags[JOB_IDS_TAG]): r for r in result.run_requests or []}
    # the titles of m0 and m1 wait for their caption jobs (queue order); m5 has no caption job
    assert set(runs) == {(CAPTION, ",".join(map(str, caption_jobs))), (TITLE, str(other_model_job[0]))}
    first = runs[(CAPTION, ",".join(map(str, caption_jobs)))]
    assert (first.tags[RANGE_START_TAG], first.tags[RANGE_END_TAG], first.tags[JOB_COUNT_TAG]) == (
        "1-1000", "1-1000", "4")
    assert first.asset_selection == [AssetKey(CAPTION)]
    config = first.run_config["ops"]["ollama_library"]["config"]
    assert config == {"force": False, "batch": first.tags[BATCH_TAG]}
    assert runs[(TITLE, str(other_model_job[0]))].run_config["ops"]["ollama_library"]["config"]["model"] == "qwen3:4b"
    assert {lib.job(i).status for i in forced_title_jobs} == {"queued"}
    for request in runs.values():  # each run's jobs are claimed under the run's own batch name
        ids = [int(i) for i in request.tags[JOB_IDS_TAG].split(",")]
        assert {lib.job(i).worker for i in ids} == {request.tags[BATCH_TAG]}
        assert all(lib.job(i).status == "running" for i in ids)
    assert lib.execute(list(runs.values())) == [True] * 2
    assert {lib.job(i).status for i in caption_jobs + other_model_job} == {"done"}

    titles = list(lib.tick().run_requests or [])
    assert [r.tags[JOB_IDS_TAG] for r in titles] == [",".join(map(str, forced_title_jobs))]
    assert titles[0].run_config["ops"]["ollama_library"]["config"]["force"] is True
    assert lib.execute(titles) == [True]

    all_jobs = caption_jobs + forced_title_jobs + other_model_job
    assert {lib.job(i).status for i in all_jobs} == {"done"}
    assert set(lib.meta("ollama.caption")) == {m[0], m[1], m[2], m[4]}
    assert set(lib.meta("ollama.title")) == {m[0], m[1], m[5]}
    assert lib.meta("ollama.model")[m[5]][TITLE] == "qwen3:4b"
    assert set(lib.instance.get_materialized_partitions(AssetKey(CAPTION))) == {"1-1000"}
    succeeded = {e["job_id"]: e for e in lib.log_events() if e["event"] == "succeeded"}
    assert set(succeeded) == set(all_jobs)
    assert all(e["item_status"] == "written" for e in succeeded.values())
    run_ids = {r.run_id for r in lib.instance.get_runs()}
    assert {lib.job(i).run_id for i in all_jobs} <= {None}  # the job row keeps the enqueuer's run id
    with lib.core.engine.connect() as conn:
        recorded = set(conn.execute(select(OllamaStageResult.run_id)).scalars())
    assert recorded <= run_ids  # every stored result names the Dagster run that produced it
    again = lib.tick()
    assert again.skip_reason is not None and "no queued jobs" in again.skip_reason.skip_message


def test_runs_beyond_the_per_tick_cap_go_back_to_the_queue_unspent(
        db_url: str, library_for: Callable[..., Library]) -> None:
    """Three scattered items make three ranges; with room for one run, the highest-priority job's run is
    requested and the other two jobs are queued again with their attempt given back, for the next tick."""
    lib = library_for(db_url, 5, pipeline__partition_size=1)
    lib.register_all()
    ids = lib.enqueue(CAPTION, [lib.ids[0], lib.ids[2]]) + lib.enqueue(CAPTION, [lib.ids[4]], {"priority": 50})

    first = queued_jobs_tick(lib.instance, lib.core, max_runs=1)

    assert len(first.run_requests or []) == 1  # the priority job's run comes first, with the queue priority
    assert first.run_requests[0].tags[JOB_IDS_TAG] == str(ids[2])
    assert first.run_requests[0].tags["dagster/priority"] == "50"
    assert [(lib.job(i).status, lib.job(i).attempts) for i in ids] == [("queued", 0), ("queued", 0), ("running", 1)]
    requeued = [e for e in lib.log_events() if e["event"] == "requeued"]
    assert {e["job_id"] for e in requeued} == set(ids[:2]) and {e["reason"] for e in requeued} == {"not_launched"}
    second = queued_jobs_tick(lib.instance, lib.core, max_runs=5)
    assert [r.tags[JOB_IDS_TAG] for r in second.run_requests or []] == [str(ids[0]), str(ids[1])]
    assert all("dagster/priority" not in r.tags for r in second.run_requests or [])


def test_a_job_whose_stored_payload_no_longer_parses_fails_without_a_run(
        sqlite_url: str, library_for: Callable[..., Library]) -> None:
    """A stored payload that breaks the payload model fails that job with validation.payload; the others run."""
    lib = library_for(sqlite_url, 2)
    good, bad = lib.enqueue(CAPTION, lib.ids)
    with lib.core.engine.begin() as conn:
        conn.execute(update(OllamaJob).where(OllamaJob.id == bad).values(payload='{"force": "yes"}'))

    result = lib.tick()

    assert [r.tags[JOB_IDS_TAG] for r in result.run_requests or []] == [str(good)]
    job = lib.job(bad)
    assert (job.status, job.error_code) == ("failed", "validation.payload")
    assert any(e["event"] == "failed" and e.get("job_id") == bad for e in lib.log_events())


def test_failed_items_fail_or_requeue_their_jobs_with_the_stage_error_code(
        sqlite_url: str, library_for: Callable[..., Library], emulator: Any) -> None:
    """One run over three title jobs: prose for item 2 fails its job (not retryable), 503 for item 3 requeues
    its job with network.busy, both recorded by the run; once Ollama answers again the next tick runs only
    item 3 and it is done."""
    lib = library_for(sqlite_url, 3)
    ids = lib.enqueue(TITLE, lib.ids)
    emulator.set_faults([{"kind": "prose", "match": "zq2x"}, {"kind": "http_503", "match": "zq3x"}])
    result = lib.tick()
    assert len(result.run_requests or []) == 1  # partitions registered by the tick: one partition

    assert lib.execute(list(result.run_requests or [])) == [False]  # a retryable failure fails the partition

    done, failed, retried = (lib.job(i) for i in ids)
    assert done.status == "done"
    assert (failed.status, failed.error_channel, failed.error_code) == (
        "failed", "invalid_response_format", "invalid_response_format.not_json")
    assert (retried.status, retried.error_code, retried.retryable, retried.attempts) == (
        "queued", "network.busy", True, 1)
    events = {(e["event"], e.get("job_id")): e for e in lib.log_events()}
    assert events[("failed", ids[1])]["code"] == "invalid_response_format.not_json"
    assert events[("retried", ids[2])]["code"] == "network.busy"

    emulator.set_faults([])
    deadline = datetime.now() + timedelta(seconds=5)
    while not (retry := lib.tick()).run_requests and datetime.now() < deadline:
        pass  # the retry's backoff (ollama.retry.backoff_ms) has to pass first
    assert [r.tags[JOB_IDS_TAG] for r in retry.run_requests or []] == [str(ids[2])]
    assert lib.execute(list(retry.run_requests or [])) == [True]
    assert lib.job(ids[2]).status == "done" and lib.job(ids[2]).attempts == 2
    assert set(lib.meta("ollama.title")) == {lib.ids[0], lib.ids[2]}


def test_jobs_of_a_waiting_run_keep_their_lease_and_a_run_that_ended_without_them_hands_them_back(
        db_url: str, library_for: Callable[..., Library], emulator: Any) -> None:
    """While the run waits in Dagster's run queue, the tick renews its jobs' leases (no other worker can take
    them); when that run ends without processing them, the tick ends their leases and the next claim
    hands them out again, unspent by any model call."""
    lib = library_for(db_url, 2)
    ids = lib.enqueue(CAPTION, lib.ids)
    request = (lib.tick().run_requests or [])[0]
    run = DagsterRun(job_name="__ASSET_JOB", run_id="a1b2c3d4-0000-4000-8000-000000000001",
                     tags=dict(request.tags), status=DagsterRunStatus.NOT_STARTED)
    lib.instance.add_run(run)
    soon = datetime.now() + timedelta(seconds=1)
    with lib.core.engine.begin() as conn:  # a lease about to run out
        conn.execute(update(OllamaJob).where(OllamaJob.id.in_(ids)).values(lease_until=soon))

    lib.tick()

    assert all(lib.job(i).lease_until > datetime.now() + timedelta(seconds=100) for i in ids)
    assert jobs.claim_jobs(lib.core, "another-worker", 10) == []
    lib.instance.report_run_canceled(run)
    again = lib.tick()  # ends the leases; the claim in the same tick requeues and hands them out again
    assert [r.tags[JOB_IDS_TAG] for r in again.run_requests or []] == [",".join(map(str, ids))]
    assert {lib.job(i).worker for i in ids} == {again.run_requests[0].tags[BATCH_TAG]}
    assert lib.execute(list(again.run_requests or [])) == [True]
    assert {lib.job(i).status for i in ids} == {"done"}
    assert emulator.stats()["model_calls"] == 2


def test_sensor_and_schedule_skip_when_ollama_is_down_and_claim_nothing(
        sqlite_url: str, library_for: Callable[..., Library]) -> None:
    """Ollama unreachable: a skip reason naming the redacted base URL and network.connect; jobs stay queued."""
    port = _closed_port()
    lib = library_for(sqlite_url, 2, ollama__base_url=f"http://gallery:s3cret@127.0.0.1:{port}")
    ids = lib.enqueue(CAPTION, lib.ids)

    result = lib.tick()

    message = result.skip_reason.skip_message if result.skip_reason else ""
    assert not result.run_requests
    assert f"127.0.0.1:{port}" in message and "network.connect" in message and "s3cret" not in message
    assert {lib.job(i).status for i in ids} == {"queued"}
    assert not [e for e in lib.log_events() if e["event"] == "claimed"]
    with lib.schedule_context() as context:
        skipped = ollama_refresh_schedule(context)
    assert isinstance(skipped, SkipReason) and "network.connect" in (skipped.skip_message or "")


# ---- ollama_refresh_schedule ----------------------------------------------------------------------


def test_refresh_schedule_reruns_stale_and_retryable_failed_items_only(
        sqlite_url: str, library_for: Callable[..., Library], emulator: Any) -> None:
    """After a title run (item 3: 503, item 5: prose), item 2's stored version and item 1's model are made
    older and item 4 gets a queued job: the schedule requests one run over 1..3 (two stale, one retryable),
    which calls the model three times; then nothing is left to refresh."""
    lib = library_for(sqlite_url, 5)
    m = lib.ids
    emulator.set_faults([{"kind": "http_503", "match": "zq3x"}, {"kind": "prose", "match": "zq5x"}])
    materialize_stages(lib.settings, m, [TITLE], lib.instance, include_media=False, log_level="WARNING")
    emulator.set_faults([])
    version = STAGES[TITLE].version
    with lib.core.engine.begin() as conn:  # as if produced by an older prompt version / another model
        conn.execute(update(OllamaStageResult).where(OllamaStageResult.media_id == m[1])
                     .values(version=version.replace("title-v1", "title-v0"), fingerprint="0" * 64))
        conn.execute(update(OllamaStageResult).where(OllamaStageResult.media_id.in_([m[0], m[3]]))
                     .values(model="llama3.1:8b", fingerprint="1" * 64))
    lib.enqueue(TITLE, [m[3]])  # stale too, but its queued job will handle it
    emulator.reset_stats()

    with lib.schedule_context() as context:
        requests = ollama_refresh_schedule(context)

    assert isinstance(requests, list) and len(requests) == 1
    request = requests[0]
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("1-1000", "1-1000")
    assert request.run_config["ops"]["ollama_library"]["config"]["media_ids"] == m[:3]
    assert request.tags[REFRESH_TAG] == "stale=2,retryable_failed=1" and request.tags[JOB_TYPE_TAG] == TITLE
    assert request.asset_selection == [AssetKey(TITLE)]
    assert lib.execute(requests) == [True]
    assert emulator.stats()["model_calls"] == 3
    with lib.core.engine.connect() as conn:
        rows = {r.media_id: r for r in conn.execute(select(OllamaStageResult))}
    for item in m[:3]:
        assert (rows[item].status, rows[item].version, rows[item].model) == ("ok", version, "llama3.2:3b")
    assert rows[m[4]].status == "failed" and rows[m[4]].error_code == "invalid_response_format.not_json"
    with lib.schedule_context() as context:
        again = ollama_refresh_schedule(context)
    assert isinstance(again, SkipReason) and "nothing to refresh" in (again.skip_message or "")


# ---- definitions and error codes ------------------------------------------------------------------


def test_definitions_work_the_queue_with_one_running_sensor_and_a_stopped_refresh_schedule() -> None:
    """The code location works the queue with one sensor, running by default; the schedule starts stopped."""
    assert defs.resolve_sensor_def("queued_jobs_sensor").default_status == DefaultSensorStatus.RUNNING
    assert {s.name for s in defs.sensors} - {"ollama_downstream_automation"} == {"queued_jobs_sensor", "new_media_sensor"}
    schedule = defs.resolve_schedule_def("ollama_refresh_schedule")
    assert schedule.default_status == DefaultScheduleStatus.STOPPED and schedule.cron_schedule == "0 3 * * *"


_CODE = re.compile(r"""(?:\bcode\s*=\s*|["']code["']\s*:\s*|\berror_code\s*=\s*|\bdefault_code\s*=\s*)"""
                   r"""(f?)(["'])([a-z_]+\.[^"'\n]+)\2""")


def test_every_error_code_used_in_the_package_is_documented_in_errors_and_readme() -> None:
    """Each code= / "code": / error_code= string in the sources is in ERROR_CODES (an f-string code by its
    `<...>` pattern entry), and the README's generated error table lists every documented code."""
    used: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for match in _CODE.finditer(path.read_text(encoding="utf-8")):
            used.setdefault(match.group(1) + match.group(3), set()).add(str(path.relative_to(PACKAGE)))
    assert {"internal.lease_expired", "network.connect", "network.circuit_open"} <= set(used)
    missing = []
    for code, where in sorted(used.items()):
        if code.startswith("f"):
            prefix = code[1:].split("{", 1)[0]
            ok = any(k.startswith(prefix) and "<" in k for k in ERROR_CODES)
        else:
            ok = code in ERROR_CODES
        if not ok:
            missing.append(f"{code} ({', '.join(sorted(where))})")
    assert not missing, "codes missing from errors.ERROR_CODES: " + "; ".join(missing)
    table = README.read_text(encoding="utf-8").split("<!-- generated:errors -->", 1)[1].split("<!--", 1)[0]
    assert all(f"`{code}`" in table for code in ERROR_CODES), "run: ollama-pipeline docs --write README.md"
