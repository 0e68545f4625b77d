"""The job table (`ollama_jobs`) and all of its SQL: enqueue, claim, leases, finish, retry, cancel, counts.

The queue is split by concern: `models` (statuses, payloads, typed results, the `JobTable` interface),
`store` (this module: the one place that holds the table's SQL) and `worker` (running claimed jobs; its
names stay importable from here). A gallery job table of its own implements the same `JobTable` operations.

Invariants live in the database, not in Python (procrastinate style):

* **Dedupe**: the partial unique index `uq_ollama_jobs_active` on (job_type, media_id) WHERE status IN
  ('queued', 'running') makes a second active job impossible. `enqueue_ollama` inserts with
  `ON CONFLICT ... WHERE status IN (...) DO NOTHING` and, when nothing was inserted, returns the job that
  holds the slot ("deduplicated").
* **Exactly-once claims**: PostgreSQL claims with `SELECT ... FOR UPDATE SKIP LOCKED` then `UPDATE`;
  SQLite runs the same two statements inside `BEGIN IMMEDIATE` (the engine starts every transaction that
  way), which holds the write lock from the select to the commit.
* **Queue limits** are checked after the insert, in the same transaction, counting the new row; a refused
  enqueue rolls back. On PostgreSQL enqueues take a transaction-scoped advisory lock first so that
  concurrent enqueues cannot overshoot a limit together; on SQLite BEGIN IMMEDIATE already serialises them.
* **Leases**: a claimed job is `running` with `lease_until = now + pipeline.queue.lease_seconds`; the worker
  renews the lease while the job runs. A lease that ran out means the worker died: the next claim puts the
  job back to `queued` (or `failed` when it has used all attempts). Every finishing write is fenced on
  (id, status='running', attempts), so a worker that lost its lease cannot overwrite the new owner's state.
* **Dagster runs** claim through `claim_jobs` too, then `assign_claims` hands each run's jobs to a worker
  name of their own; the Dagster layer renews those leases (`renew_claims`) while the run is queued or
  running and records each outcome with `finish_claimed`, fenced and logged like a worker's.
* **Backoff**: a `queued` job has no lease, so `lease_until` on a queued job means "not before": a retried
  job is claimable again only after its backoff (ollama.retry.backoff_ms doubled per attempt, at most 60 s).

Results reach `media_meta` only through `runner.run_item`, which persists through the one write path.
Every jobs-log line written here carries ts, event, job_id, media_id, job_type, model, attempt,
duration_ms, prompt_eval_count and eval_count. This module must not import Dagster.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.db.models import OllamaJob
from ollama_pipeline.core.errors import (
    OllamaPipelineError,
    PersistenceError,
    QueueLimitError,
    ValidationError,
)
from ollama_pipeline.core.jsontext import canonical_json
from ollama_pipeline.core.queue.models import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    PAYLOAD_MODELS,
    EnqueueResult,
    Job,
    JobOutcome,
    JobPayload,
    JobStatus,
    ProcessSummary,
    ProgressCallback,
    QueueCounts,
    payload_model,
    tally_outcome,
    validate_payload,
)
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.selection import MediaSelection
from ollama_pipeline.core.stages import STAGES

_WORKER_NAMES = ("LeaseKeeper", "process_claimed", "process_ollama_job", "process_jobs", "run_claimed")
__all__ = ["ACTIVE_STATUSES", "JOB_STATUSES", "PAYLOAD_MODELS", "EnqueueResult", "Job", "JobOutcome", "JobPayload",
           "JobStatus", "ProcessSummary", "ProgressCallback", "QueueCounts", "payload_model", "tally_outcome",
           "validate_payload", *_WORKER_NAMES]


def __getattr__(name: str) -> Any:
    """The worker's functions, reachable here as before the split (imported on first use: no cycle)."""
    if name in _WORKER_NAMES:
        from ollama_pipeline.core.queue import worker

        return getattr(worker, name)
    raise AttributeError(name)

_ACTIVE_WHERE = text("status IN ('queued', 'running')")
_ENQUEUE_LOCK_KEY = 0x6F6C6C616D61  # "ollama": the advisory lock that serialises enqueues on PostgreSQL
_MAX_BACKOFF_S = 60.0


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def default_worker() -> str:
    """A worker name that is unique per host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- logging helpers ------------------------------------------------------------------------------


def _model_for(pipeline: Pipeline, job_type: str, payload: dict[str, Any] | JobPayload | None) -> str | None:
    override = payload.model if isinstance(payload, JobPayload) else (payload or {}).get("model")
    if isinstance(override, str) and override:
        return override
    stage = STAGES.get(job_type)
    return pipeline.model_for(stage) if stage is not None else None


def _log(pipeline: Pipeline, event: str, *, job_id: int, media_id: int, job_type: str, model: str | None,
         attempt: int, duration_ms: float = 0.0, prompt_eval_count: int = 0, eval_count: int = 0,
         **extra: Any) -> None:
    """One jobs-log line with the fields every job event carries."""
    pipeline.logs.job_event(event, job_id=job_id, media_id=media_id, job_type=job_type, model=model,
                            attempt=attempt, duration_ms=round(duration_ms, 1),
                            prompt_eval_count=prompt_eval_count, eval_count=eval_count, **extra)


def _log_job(pipeline: Pipeline, event: str, job: Job, **fields: Any) -> None:
    _log(pipeline, event, job_id=job.id, media_id=job.media_id, job_type=job.job_type,
         model=_model_for(pipeline, job.job_type, job.payload), attempt=job.attempts, **fields)


def _retries(pipeline: Pipeline) -> int:
    return pipeline.settings.database.lock_retries


def _gallery(pipeline: Pipeline) -> Any | None:
    """The gallery's own queue (LocalSupervisor's `jobs`, module `gallery_jobs`) when it has one, else None:
    then every operation below works on that table, on the same code path."""
    from ollama_pipeline.core.queue import gallery_jobs

    return gallery_jobs if gallery_jobs.uses_gallery_queue(pipeline) else None


# ---- enqueue -------------------------------------------------------------------------------------


def _insert_job(conn: Connection, values: dict[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT (job_type, media_id) WHERE active DO NOTHING; the new id, or None on conflict."""
    ins = pg_insert(OllamaJob) if conn.dialect.name == "postgresql" else sqlite_insert(OllamaJob)
    stmt = ins.values(**values).on_conflict_do_nothing(
        index_elements=["job_type", "media_id"], index_where=_ACTIVE_WHERE).returning(OllamaJob.id)
    return conn.execute(stmt).scalar()


def _check_limits(pipeline: Pipeline, conn: Connection, job_type: str, now: datetime) -> None:
    """Refuse the enqueue (the caller's transaction rolls back) when a queue limit is exceeded."""
    q = pipeline.settings.pipeline.queue
    since = now - timedelta(minutes=1)
    queued = OllamaJob.status == "queued"
    row = conn.execute(select(
        func.coalesce(func.sum(case((queued, 1), else_=0)), 0),
        func.coalesce(func.sum(case((queued & (OllamaJob.job_type == job_type), 1), else_=0)), 0),
        func.coalesce(func.sum(case((OllamaJob.created_at >= since, 1), else_=0)), 0),
    ).where(queued | (OllamaJob.created_at >= since))).one()
    total, per_type, last_minute = (int(v) for v in row)
    if total > q.max_queued:
        raise QueueLimitError(
            f"queue full: {total - 1} jobs already queued, pipeline.queue.max_queued={q.max_queued}",
            code="queue_limit.overflow", details={"limit": "max_queued", "value": q.max_queued})
    if per_type > q.max_queued_per_type:
        raise QueueLimitError(
            f"queue full for {job_type}: {per_type - 1} jobs of this type already queued, "
            f"pipeline.queue.max_queued_per_type={q.max_queued_per_type}",
            code="queue_limit.overflow_job_type",
            details={"limit": "max_queued_per_type", "value": q.max_queued_per_type})
    if last_minute > q.max_enqueues_per_minute:
        raise QueueLimitError(
            f"rate limit reached: more than pipeline.queue.max_enqueues_per_minute={q.max_enqueues_per_minute} "
            f"enqueues in the last minute; try again later", code="queue_limit.rate",
            details={"limit": "max_enqueues_per_minute", "value": q.max_enqueues_per_minute})


def enqueue_ollama(pipeline: Pipeline, job_type: str, media_id: int, payload: dict[str, Any] | None = None,
                   *, run_id: str | None = None) -> EnqueueResult:
    """Queue one job (§3); an active job for the same (job_type, media_id) is returned as deduplicated."""
    started = time.perf_counter()
    gallery = _gallery(pipeline)
    if gallery is not None:
        try:
            result: EnqueueResult = gallery.enqueue_ollama(pipeline, job_type, media_id, payload, run_id=run_id)
        except OllamaPipelineError as exc:
            pipeline.logs.error(exc, job_type=job_type, media_id=media_id, operation="enqueue")
            raise
        _log(pipeline, "enqueued" if result.status == "queued" else "deduplicated", job_id=result.job_id,
             media_id=media_id, job_type=result.job_type, model=_model_for(pipeline, result.job_type, payload),
             attempt=0, duration_ms=(time.perf_counter() - started) * 1000.0, queue="gallery")
        return result
    started = time.perf_counter()
    parsed = validate_payload(job_type, payload)
    gallery = require_gallery(pipeline.engine)
    media = gallery["media"]
    if gallery.integer_ids:
        if isinstance(media_id, bool) or not isinstance(media_id, int) or media_id < 1:
            raise ValidationError(f"media_id must be a positive integer, got {media_id!r}", code="validation.payload")
    elif not isinstance(media_id, str) or not media_id:
        raise ValidationError(f"media_id must be a text id of this library, got {media_id!r}",
                              code="validation.payload")
    model = _model_for(pipeline, job_type, parsed)
    max_attempts = pipeline.settings.ollama.retry.max_attempts

    def work(conn: Connection) -> tuple[int, bool, str]:
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(literal(_ENQUEUE_LOCK_KEY))))
        if conn.execute(select(media.c("id")).where(media.c("id") == media_id)).first() is None:
            raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
        # The active job can finish between a refused insert and the select: then insert again.
        for _ in range(5):
            now = _now()
            new_id = _insert_job(conn, {
                "job_type": job_type, "media_id": media_id, "payload": canonical_json(parsed.model_dump()),
                "status": "queued", "priority": parsed.priority, "attempts": 0, "max_attempts": max_attempts,
                "run_id": run_id, "created_at": now, "updated_at": now})
            if new_id is not None:
                _check_limits(pipeline, conn, job_type, now)
                return int(new_id), True, "queued"
            existing = conn.execute(select(OllamaJob.id, OllamaJob.status).where(
                OllamaJob.job_type == job_type, OllamaJob.media_id == media_id,
                OllamaJob.status.in_(ACTIVE_STATUSES))).first()
            if existing is not None:
                return int(existing[0]), False, str(existing[1])
        raise PersistenceError(f"enqueue of {job_type} for media {media_id} kept conflicting with a finishing job",
                               code="persistence.constraint")

    try:
        job_id, created, state = repository.with_retry(pipeline.engine, work, retries=_retries(pipeline),
                                                       what=f"enqueue {job_type} for media {media_id}")
    except OllamaPipelineError as exc:
        pipeline.logs.error(exc, job_type=job_type, media_id=media_id, model=model, operation="enqueue")
        raise
    duration = (time.perf_counter() - started) * 1000.0
    if created:
        _log(pipeline, "enqueued", job_id=job_id, media_id=media_id, job_type=job_type, model=model, attempt=0,
             duration_ms=duration, priority=parsed.priority, force=parsed.force, run_id=run_id)
    else:
        _log(pipeline, "deduplicated", job_id=job_id, media_id=media_id, job_type=job_type, model=model,
             attempt=0, duration_ms=duration, existing_status=state)
    return EnqueueResult(job_id=job_id, status="queued" if created else "deduplicated", job_type=job_type,
                         media_id=media_id)


def enqueue_many(pipeline: Pipeline, job_types: Iterable[str], media_ids: Iterable[int],
                 payload: dict[str, Any] | None = None) -> list[EnqueueResult]:
    """Enqueue every (job type, media id) pair in order; stops at the first typed error."""
    types = list(job_types)
    return [enqueue_ollama(pipeline, t, m, payload) for m in media_ids for t in types]


# ---- leases and claims ---------------------------------------------------------------------------


def _expire_leases(conn: Connection, now: datetime) -> list[tuple[str, Job]]:
    """Running jobs whose lease ran out go back to queued, or to failed once out of attempts."""
    expired = (OllamaJob.status == "running") & (OllamaJob.lease_until < now)
    events: list[tuple[str, Job]] = []
    requeued = conn.execute(update(OllamaJob).where(expired, OllamaJob.attempts < OllamaJob.max_attempts).values(
        status="queued", lease_until=None, worker=None, updated_at=now).returning(*OllamaJob.__table__.c))
    events.extend(("requeued", Job.from_row(r)) for r in requeued.mappings())
    failed = conn.execute(update(OllamaJob).where(expired, OllamaJob.attempts >= OllamaJob.max_attempts).values(
        status="failed", lease_until=None, finished_at=now, updated_at=now, error_channel="internal",
        error_code="internal.lease_expired", retryable=False,
        error_message="the worker's lease ran out on the last attempt (worker stopped or was killed)",
    ).returning(*OllamaJob.__table__.c))
    events.extend(("failed", Job.from_row(r)) for r in failed.mappings())
    return events


def _log_expired(pipeline: Pipeline, events: list[tuple[str, Job]]) -> None:
    for event, job in events:
        if event == "requeued":
            _log_job(pipeline, "requeued", job, reason="lease_expired")
        else:
            _log_job(pipeline, "failed", job, reason="lease_expired", channel=job.error_channel,
                     code=job.error_code, retryable=False)


def requeue_expired(pipeline: Pipeline) -> int:
    """Put jobs of dead workers (lease ran out) back in the queue; returns how many changed."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        gallery_events = gallery.requeue_expired(pipeline)
        _log_expired(pipeline, gallery_events)
        return len(gallery_events)
    events = repository.with_retry(pipeline.engine, lambda conn: _expire_leases(conn, _now()),
                                   retries=_retries(pipeline), what="requeue expired leases")
    _log_expired(pipeline, events)
    return len(events)


def upstream_closure(job_type: str) -> tuple[str, ...]:
    """Every stage a job type depends on (registry `upstream`, transitively), nearest first."""
    found: list[str] = []
    todo = list(STAGES[job_type].upstream) if job_type in STAGES else []
    while todo:
        name = todo.pop(0)
        if name not in found:
            found.append(name)
            todo.extend(STAGES[name].upstream if name in STAGES else ())
    return tuple(found)


def _waits_for_upstream() -> ColumnElement[bool]:
    """True for a job whose upstream stage has a queued or running job for the same item: it is not
    claimable until that job ends (a title is made from the caption, so it waits for the caption job)."""
    upstream = aliased(OllamaJob)
    pairs = [and_(OllamaJob.job_type == job_type, upstream.job_type.in_(ups))
             for job_type in STAGES if (ups := upstream_closure(job_type))]
    if not pairs:
        return false()
    return exists(select(upstream.id).where(upstream.media_id == OllamaJob.media_id,
                                            upstream.status.in_(ACTIVE_STATUSES), upstream.id != OllamaJob.id,
                                            or_(*pairs)))


def _claim_values(pipeline: Pipeline, worker: str, now: datetime) -> dict[str, Any]:
    return {"status": "running", "attempts": OllamaJob.attempts + 1, "worker": worker[:128],
            "lease_until": now + timedelta(seconds=pipeline.settings.pipeline.queue.lease_seconds),
            "started_at": now, "updated_at": now}


def claim_jobs(pipeline: Pipeline, worker: str, limit: int, job_types: Iterable[str] | None = None) -> list[Job]:
    """Atomically claim up to limit due queued jobs (priority desc, id); expired leases are requeued first."""
    if limit <= 0:
        return []
    types = list(job_types) if job_types is not None else None
    started = time.perf_counter()

    def work(conn: Connection) -> tuple[list[tuple[str, Job]], list[Job]]:
        now = _now()
        events = _expire_leases(conn, now)
        q = (select(OllamaJob.id)
             .where(OllamaJob.status == "queued",
                    (OllamaJob.lease_until.is_(None)) | (OllamaJob.lease_until <= now), ~_waits_for_upstream())
             .order_by(OllamaJob.priority.desc(), OllamaJob.id).limit(limit)
             .with_for_update(skip_locked=True))  # rendered on PostgreSQL; SQLite holds BEGIN IMMEDIATE
        if types is not None:
            q = q.where(OllamaJob.job_type.in_(types))
        ids = [r[0] for r in conn.execute(q)]
        if not ids:
            return events, []
        rows = conn.execute(update(OllamaJob).where(OllamaJob.id.in_(ids), OllamaJob.status == "queued")
                            .values(**_claim_values(pipeline, worker, now))
                            .returning(*OllamaJob.__table__.c)).mappings()
        jobs = sorted((Job.from_row(r) for r in rows), key=lambda j: (-j.priority, j.id))
        return events, jobs

    gallery = _gallery(pipeline)
    if gallery is not None:
        events, jobs = gallery.claim_jobs(pipeline, worker, limit, types)
    else:
        events, jobs = repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="claim jobs")
    _log_expired(pipeline, events)
    duration = (time.perf_counter() - started) * 1000.0
    for job in jobs:
        waited = (job.started_at - job.created_at).total_seconds() * 1000.0 if job.started_at and job.created_at \
            else None
        _log_job(pipeline, "claimed", job, duration_ms=duration, worker=worker, queued_ms=waited)
    return jobs


def _claim_one(pipeline: Pipeline, job_id: int, worker: str) -> tuple[Job | None, Job | None]:
    """Claim one specific queued job, ignoring its backoff; (claimed job, or None and the current row)."""

    def work(conn: Connection) -> tuple[list[tuple[str, Job]], Job | None, Job | None]:
        now = _now()
        events = _expire_leases(conn, now)
        row = conn.execute(update(OllamaJob).where(OllamaJob.id == job_id, OllamaJob.status == "queued",
                                                   ~_waits_for_upstream())
                           .values(**_claim_values(pipeline, worker, now))
                           .returning(*OllamaJob.__table__.c)).mappings().first()
        if row is not None:
            return events, Job.from_row(row), None
        current = conn.execute(select(OllamaJob).where(OllamaJob.id == job_id)).mappings().first()
        return events, None, Job.from_row(current) if current is not None else None

    gallery = _gallery(pipeline)
    if gallery is not None:
        events, claimed, current = gallery.claim_one(pipeline, job_id, worker)
    else:
        events, claimed, current = repository.with_retry(pipeline.engine, work, retries=_retries(pipeline),
                                                         what=f"claim job {job_id}")
    _log_expired(pipeline, events)
    if claimed is None and current is None:
        raise ValidationError(f"no job with id {job_id}", code="validation.payload")
    if claimed is not None:
        _log_job(pipeline, "claimed", claimed, worker=worker)
    return claimed, current


def assign_claims(pipeline: Pipeline, worker: str, assignments: dict[str, list[int]], *, lease_seconds: float,
                  release: Iterable[int] = ()) -> list[Job]:
    """Hand jobs claimed by `worker` on to other worker names (one per Dagster run) with a new lease, and put
    the `release` ones back in the queue as if never claimed; one transaction, fenced on (running, worker).

    Returns the released jobs (each logged as `requeued`, reason `not_launched`).
    """
    released_ids = list(release)

    def work(conn: Connection) -> list[Job]:
        now = _now()
        mine = (OllamaJob.status == "running") & (OllamaJob.worker == worker[:128])
        for name, ids in assignments.items():
            for start in range(0, len(ids), 900):
                conn.execute(update(OllamaJob).where(mine, OllamaJob.id.in_(ids[start : start + 900]))
                             .values(worker=name[:128], lease_until=now + timedelta(seconds=lease_seconds),
                                     updated_at=now))
        back: list[Job] = []
        for start in range(0, len(released_ids), 900):
            rows = conn.execute(update(OllamaJob).where(mine, OllamaJob.id.in_(released_ids[start : start + 900]))
                                .values(status="queued", attempts=OllamaJob.attempts - 1, worker=None,
                                        lease_until=None, started_at=None, updated_at=now)
                                .returning(*OllamaJob.__table__.c)).mappings()
            back.extend(Job.from_row(r) for r in rows)
        return back

    gallery = _gallery(pipeline)
    if gallery is not None:
        released = gallery.assign_claims(pipeline, worker, assignments, lease_seconds=lease_seconds,
                                         release=released_ids)
    else:
        released = repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="assign claims")
    for job in released:
        _log_job(pipeline, "requeued", job, reason="not_launched", worker=worker)
    return released


def release_claims(pipeline: Pipeline, claimed: Iterable[Job]) -> int:
    """Put claimed jobs back in the queue untried (their attempt is not counted), fenced on the claim."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.release_claims(pipeline, claimed)
    fences = [(job.id, job.attempts) for job in claimed]

    def work(conn: Connection) -> int:
        now = _now()
        return sum(conn.execute(update(OllamaJob).where(
            OllamaJob.id == job_id, OllamaJob.status == "running", OllamaJob.attempts == attempt)
            .values(status="queued", attempts=OllamaJob.attempts - 1, worker=None, lease_until=None,
                    started_at=None, updated_at=now)).rowcount for job_id, attempt in fences)

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="release claims") if fences else 0


def claimed_by_worker(pipeline: Pipeline, worker: str) -> list[Job]:
    """The running jobs claimed under exactly this worker name (a Dagster run's batch), by id."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.claimed_by_worker(pipeline, worker)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(OllamaJob).where(OllamaJob.status == "running",
                                                    OllamaJob.worker == worker[:128]).order_by(OllamaJob.id)).mappings()
        return [Job.from_row(r) for r in rows]


def expire_claims(pipeline: Pipeline, worker: str) -> int:
    """End the leases of a dead worker's jobs now, so the next claim requeues them (a killed Dagster run)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.expire_claims(pipeline, worker)

    def work(conn: Connection) -> int:
        return conn.execute(update(OllamaJob).where(OllamaJob.status == "running", OllamaJob.worker == worker[:128])
                            .values(lease_until=_now() - timedelta(seconds=1))).rowcount

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="expire claims")


def claimed_by(pipeline: Pipeline, worker_prefix: str) -> list[Job]:
    """Running jobs whose worker name starts with worker_prefix (e.g. the claims of Dagster runs), by id."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.claimed_by(pipeline, worker_prefix)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(OllamaJob).where(OllamaJob.status == "running",
                                                    OllamaJob.worker.startswith(worker_prefix, autoescape=True))
                            .order_by(OllamaJob.id)).mappings()
        return [Job.from_row(r) for r in rows]


def renew_claims(pipeline: Pipeline, jobs: Iterable[Job], lease_seconds: float) -> int:
    """Extend the leases of claimed jobs, fenced on (id, running, attempts, worker); returns how many."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.renew_claims(pipeline, jobs, lease_seconds)
    claims = [(job.id, job.attempts, job.worker) for job in jobs]
    if not claims:
        return 0

    def work(conn: Connection) -> int:
        until = _now() + timedelta(seconds=lease_seconds)
        renewed = 0
        for job_id, attempt, worker in claims:
            renewed += conn.execute(update(OllamaJob).where(
                OllamaJob.id == job_id, OllamaJob.status == "running", OllamaJob.attempts == attempt,
                OllamaJob.worker == worker).values(lease_until=until)).rowcount
        return renewed

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="renew claims")


def renew_leases(pipeline: Pipeline, running: dict[int, int], lease_seconds: float) -> None:
    """The worker's LeaseKeeper: extend the leases of the jobs it runs (id -> claimed attempt, the fence)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        gallery.renew_leases(pipeline, running)
        return

    def work(conn: Connection) -> None:
        until = _now() + timedelta(seconds=lease_seconds)
        for job_id, attempt in running.items():
            conn.execute(update(OllamaJob).where(OllamaJob.id == job_id, OllamaJob.status == "running",
                                                 OllamaJob.attempts == attempt).values(lease_until=until))

    repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="renew leases")


def next_due(pipeline: Pipeline, job_types: list[str] | None) -> datetime | None:
    """When the earliest queued job in backoff becomes claimable (None: no such job)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.next_due(pipeline, job_types)
    with pipeline.engine.connect() as conn:
        q = select(func.min(OllamaJob.lease_until)).where(OllamaJob.status == "queued",
                                                          OllamaJob.lease_until.is_not(None))
        if job_types is not None:
            q = q.where(OllamaJob.job_type.in_(job_types))
        return conn.execute(q).scalar()


def count_queued(pipeline: Pipeline, job_types: list[str] | None) -> int:
    """Queued jobs (of these types)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.count_queued(pipeline, job_types)
    with pipeline.engine.connect() as conn:
        q = select(func.count()).select_from(OllamaJob).where(OllamaJob.status == "queued")
        if job_types is not None:
            q = q.where(OllamaJob.job_type.in_(job_types))
        return int(conn.execute(q).scalar() or 0)


# ---- processing ----------------------------------------------------------------------------------


def _backoff_s(pipeline: Pipeline, attempt: int) -> float:
    base = pipeline.settings.ollama.retry.backoff_ms / 1000.0
    return min(_MAX_BACKOFF_S, base * (2 ** max(0, attempt - 1)))


def _finish(pipeline: Pipeline, job: Job, error: dict[str, Any] | None) -> tuple[str | None, datetime | None]:
    """Record done / queued-for-retry / failed, fenced on the claim; (new status or None if lease lost, not-before)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.finish(pipeline, job, error)
    retry = bool(error and error.get("retryable")) and job.attempts < job.max_attempts

    def work(conn: Connection) -> tuple[str | None, datetime | None]:
        now = _now()
        if error is None:
            status, values = "done", {"lease_until": None, "finished_at": now, "error_channel": None,
                                      "error_code": None, "error_message": None, "retryable": None}
        else:
            values = {"error_channel": str(error.get("channel") or "internal")[:32],
                      "error_code": str(error.get("code") or "internal.error")[:64],
                      "error_message": str(error.get("message") or "")[:2000],
                      "retryable": bool(error.get("retryable"))}
            if retry:
                status = "queued"
                values.update(lease_until=now + timedelta(seconds=_backoff_s(pipeline, job.attempts)), worker=None)
            else:
                status = "failed"
                values.update(lease_until=None, finished_at=now)
        result = conn.execute(update(OllamaJob).where(
            OllamaJob.id == job.id, OllamaJob.status == "running", OllamaJob.attempts == job.attempts)
            .values(status=status, updated_at=now, **values))
        if result.rowcount != 1:
            return None, None
        return status, values.get("lease_until") if status == "queued" else None

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"finish job {job.id}")


def _report(pipeline: Pipeline, job: Job, status: str | None, not_before: datetime | None, *,
            error: dict[str, Any] | None, model: str | None, duration_ms: float, item_status: str | None,
            changed_keys: list[str], prompt_eval_count: int, eval_count: int, calls: int,
            model_ms: float = 0.0, **extra: Any) -> JobOutcome:
    """The JobOutcome of a finished claim and its one jobs-log line (succeeded, retried, failed, lease_lost)."""
    common = {"job_id": job.id, "media_id": job.media_id, "job_type": job.job_type, "model": model,
              "attempt": job.attempts, "duration_ms": duration_ms, "prompt_eval_count": prompt_eval_count,
              "eval_count": eval_count}
    result = JobOutcome(claimed=True, status=status or "running", item_status=item_status,
                        changed_keys=changed_keys, error=error, lease_lost=status is None,
                        next_attempt_at=not_before, calls=calls, model_ms=model_ms, **common)
    err_fields = {"channel": error.get("channel"), "code": error.get("code"), "retryable": error.get("retryable"),
                  "message": error.get("message")} if error else {}
    if status is None:
        _log(pipeline, "lease_lost", **common, **err_fields, **extra)
    elif status == "done":
        _log(pipeline, "succeeded", **common, item_status=result.item_status, changed_keys=result.changed_keys,
             calls=calls, **extra)
    elif status == "queued":
        _log(pipeline, "retried", **common, **err_fields, max_attempts=job.max_attempts,
             next_attempt_at=not_before.isoformat(timespec="milliseconds") + "Z" if not_before else None, **extra)
    else:
        _log(pipeline, "failed", **common, **err_fields, max_attempts=job.max_attempts, **extra)
    return result


def finish_claimed(pipeline: Pipeline, job: Job, error: dict[str, Any] | None, *, item_status: str | None = None,
                   model: str | None = None, duration_ms: float = 0.0, prompt_eval_count: int = 0,
                   eval_count: int = 0, changed_keys: Iterable[str] = (), calls: int = 0,
                   **extra: Any) -> JobOutcome:
    """Record the outcome of a claimed job that ran elsewhere (a Dagster run), exactly as a worker records it.

    error None means done; a retryable error requeues the job with backoff while attempts remain, any other
    error fails it. The write is fenced on the claim (id, running, attempts), and one jobs-log line is written.
    """
    model = model or _model_for(pipeline, job.job_type, job.payload)
    status, not_before = _finish(pipeline, job, error)
    return _report(pipeline, job, status, not_before, error=error, model=model, duration_ms=duration_ms,
                   item_status=item_status, changed_keys=list(changed_keys), prompt_eval_count=prompt_eval_count,
                   eval_count=eval_count, calls=calls, **extra)


# ---- management ----------------------------------------------------------------------------------


def get_job(pipeline: Pipeline, job_id: int) -> Job:
    """One job row (validation.payload when there is none)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.get_job(pipeline, job_id)
    with pipeline.engine.connect() as conn:
        row = conn.execute(select(OllamaJob).where(OllamaJob.id == job_id)).mappings().first()
    if row is None:
        raise ValidationError(f"no job with id {job_id}", code="validation.payload")
    return Job.from_row(row)


def retry_job(pipeline: Pipeline, job_id: int) -> Job:
    """Put a failed or cancelled job back in the queue with its attempts reset (no queue limits apply)."""

    def work(conn: Connection) -> Job:
        now = _now()
        current = conn.execute(select(OllamaJob).where(OllamaJob.id == job_id)).mappings().first()
        if current is None:
            raise ValidationError(f"no job with id {job_id}", code="validation.payload")
        try:
            with conn.begin_nested():  # the partial unique index decides, in a savepoint
                row = conn.execute(update(OllamaJob).where(OllamaJob.id == job_id,
                                                           OllamaJob.status.in_(("failed", "cancelled")))
                                   .values(status="queued", attempts=0, lease_until=None, worker=None,
                                           finished_at=None, started_at=None, updated_at=now)
                                   .returning(*OllamaJob.__table__.c)).mappings().first()
        except IntegrityError:
            other = conn.execute(select(OllamaJob.id, OllamaJob.status).where(
                OllamaJob.job_type == current["job_type"], OllamaJob.media_id == current["media_id"],
                OllamaJob.status.in_(ACTIVE_STATUSES))).first()
            raise PersistenceError(
                f"job {job_id} cannot be requeued: job {other[0] if other else '?'} "
                f"({current['job_type']} for media {current['media_id']}) is already "
                f"{other[1] if other else 'active'}", code="persistence.constraint") from None
        if row is None:
            raise ValidationError(f"job {job_id} is {current['status']}; only failed or cancelled jobs can be "
                                  f"retried", code="validation.payload")
        return Job.from_row(row)

    gallery = _gallery(pipeline)
    job = gallery.retry_job(pipeline, job_id) if gallery is not None else \
        repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"retry job {job_id}")
    _log_job(pipeline, "requeued", job, reason="manual_retry")
    return job


def cancel_job(pipeline: Pipeline, job_id: int) -> Job:
    """Cancel a queued job (running jobs finish; done/failed jobs stay as they are)."""

    def work(conn: Connection) -> Job:
        now = _now()
        row = conn.execute(update(OllamaJob).where(OllamaJob.id == job_id, OllamaJob.status == "queued")
                           .values(status="cancelled", lease_until=None, finished_at=now, updated_at=now)
                           .returning(*OllamaJob.__table__.c)).mappings().first()
        if row is not None:
            return Job.from_row(row)
        current = conn.execute(select(OllamaJob.status).where(OllamaJob.id == job_id)).scalar()
        if current is None:
            raise ValidationError(f"no job with id {job_id}", code="validation.payload")
        raise ValidationError(f"job {job_id} is {current}; only queued jobs can be cancelled",
                              code="validation.payload")

    gallery = _gallery(pipeline)
    job = gallery.cancel_job(pipeline, job_id) if gallery is not None else \
        repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"cancel job {job_id}")
    _log_job(pipeline, "cancelled", job)
    return job


def list_jobs(pipeline: Pipeline, status: str | None = None, job_type: str | None = None,
              media_id: int | MediaSelection | None = None, limit: int = 50) -> list[Job]:
    """The newest jobs first, filtered by status, job type and media id (or a media selection)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.list_jobs(pipeline, status, job_type, media_id, limit)
    if status is not None and status not in JOB_STATUSES:
        raise ValidationError(f"unknown job status {status!r}; known: {', '.join(JOB_STATUSES)}",
                              code="validation.payload")
    q = select(OllamaJob).order_by(OllamaJob.id.desc()).limit(max(1, limit))
    if status is not None:
        q = q.where(OllamaJob.status == status)
    if job_type is not None:
        q = q.where(OllamaJob.job_type == job_type)
    if isinstance(media_id, MediaSelection):
        q = q.where(media_id.where(OllamaJob.media_id))
    elif media_id is not None:
        q = q.where(OllamaJob.media_id == media_id)
    with pipeline.engine.connect() as conn:
        return [Job.from_row(r) for r in conn.execute(q).mappings()]


def queue_counts(pipeline: Pipeline) -> QueueCounts:
    """Jobs per status, overall and per job type (every status present, zeros included)."""
    gallery = _gallery(pipeline)
    if gallery is not None:
        return gallery.queue_counts(pipeline)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(OllamaJob.job_type, OllamaJob.status, func.count())
                            .group_by(OllamaJob.job_type, OllamaJob.status)).all()
    total = dict.fromkeys(JOB_STATUSES, 0)
    by_type: dict[str, dict[str, int]] = {}
    for job_type, status, count in rows:
        total[status] = total.get(status, 0) + int(count)
        by_type.setdefault(job_type, dict.fromkeys(JOB_STATUSES, 0))[status] = int(count)
    return QueueCounts(total=total, by_type=dict(sorted(by_type.items())))
