"""LocalSupervisor's own `jobs` table as the queue: the second implementation of the queue's operations
(`models.JobTable`), next to the pipeline's own `ollama_jobs` in `store`. Every public function of `store`
(enqueue, claim, leases, finish, retry, cancel, counts) hands over to the function of the same name here
when the library's gallery has such a table (`uses_gallery_queue`), so the worker (`process`), the Dagster
sensor and its runs, the CLI and the web UI all work LocalSupervisor's queue on one code path; the buttons
of its dashboard and its `SCRIPTS/ollama_enqueue_cli.php` drive this pipeline.

Everything here follows LocalSupervisor's own queue code (`SCRIPTS/ollama_jobs.php`, `SCRIPTS/operations.php`
of github noliv3/LocalSupervisor), so both sides agree on every row:

- job types `ollama_caption`, `ollama_title`, `ollama_tags_normalize`, `ollama_quality`, `ollama_prompt_recon`,
  `ollama_prompt_eval` (here: the score stage, whose prompt adherence it shows) and `ollama_nsfw_classify`
  (here: the policy stage); `ollama_duplicate_assist` is the data contract's name for the duplicate stage.
  Types this pipeline has no stage for (`ollama_embed`, and every non-Ollama type) are never claimed.
  A `Job` read from this table carries the pipeline's stage name as its `job_type`;
- statuses `queued`/`pending` (waiting), `running`, `done`, `error`, `cancelled`; a `Job` shows them in the
  queue's vocabulary (`queued`, `running`, `done`, `failed`, `cancelled`). `not_before` delays a retry;
  `payload_json` is `{media_id, mode, created_at, ...}` (`force`, `model` honoured) and, as LocalSupervisor's
  worker keeps it, `attempts`; this pipeline adds `lease_s` (the lease of its claim);
- dedupe: a job of the same type and media in `pending`, `running` or `queued` is returned instead of a new
  row (`sv_enqueue_ollama_job`); limits: `queue_max_total`, `queue_max_per_type_default`,
  `queue_max_per_type` and `queue_max_per_media` over the statuses `queued`, `pending`, `created`
  (`sv_enforce_job_queue_capacity`; `library.jobs` in this configuration holds the same numbers);
- claim: `UPDATE jobs SET status = 'running' ... WHERE id = ? AND status IN ('pending', 'queued')` with
  `not_before` due (`sv_ollama_claim_pending_job`): one guarded update, so LocalSupervisor's PHP worker
  and this pipeline can never both claim one job; heartbeat, worker and error fields are written as its
  worker writes them (`heartbeat_at`, `started_at`, `worker_owner` = `ollama_pipeline:<worker>`,
  `worker_pid`, `stage`, `last_error_code`, `error_message`);
- leases: a claim's lease is `heartbeat_at + lease_s`; the worker's LeaseKeeper, the Dagster tick (while a
  run waits) and the run renew `heartbeat_at`, which also keeps LocalSupervisor's stale-job watchdog
  (`sv_ollama_watchdog_stale_running`) off the job. Only jobs whose `worker_owner` is this pipeline's are
  ever requeued here; a finishing write is fenced on (id, running, worker_owner, started_at).

Timestamps are written as ISO-8601 text (PHP's `date('c')`, here in UTC) and compared after parsing, so
rows LocalSupervisor wrote with its server's offset compare correctly. This module must not import Dagster.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, MetaData, Table, func, insert, inspect, select, update

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.gallery import LOCALSUPERVISOR, require_gallery
from ollama_pipeline.core.errors import PersistenceError, QueueLimitError, ValidationError
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.queue.models import JOB_STATUSES, EnqueueResult, Job, QueueCounts, validate_payload

# LocalSupervisor job type -> this pipeline's stage (job type of the seed)
TYPE_TO_STAGE = {
    "ollama_caption": "ollama_caption",
    "ollama_title": "ollama_title",
    "ollama_tags_normalize": "ollama_tags_normalize",
    "ollama_quality": "ollama_quality",
    "ollama_prompt_recon": "ollama_prompt_recon",
    "ollama_prompt_eval": "ollama_score_multi",
    "ollama_nsfw_classify": "ollama_policy_flags",
    "ollama_duplicate_assist": "ollama_duplicate_assist",
}
STAGE_TO_TYPE = {stage: job_type for job_type, stage in TYPE_TO_STAGE.items()}
MODES = {t: t.removeprefix("ollama_") for t in TYPE_TO_STAGE}
WAITING = ("queued", "pending")
ACTIVE = ("pending", "running", "queued")  # dedupe (sv_enqueue_ollama_job)
COUNTED = ("queued", "pending", "created")  # limits (SV_JOB_QUEUE_STATUSES)
OWNER_PREFIX = "ollama_pipeline:"
# LocalSupervisor's status -> the queue's vocabulary, and back (for filters)
STATUS_IN = {"queued": "queued", "pending": "queued", "created": "queued", "running": "running", "done": "done",
             "error": "failed", "cancelled": "cancelled", "canceled": "cancelled"}
STATUS_OUT: dict[str, tuple[str, ...]] = {
    "queued": ("queued", "pending", "created"), "running": ("running",), "done": ("done",), "failed": ("error",),
    "cancelled": ("cancelled", "canceled")}
_EXPIRED = "1970-01-01T00:00:00+00:00"  # a heartbeat that ended the lease (a killed Dagster run's claims)
_MAX_BACKOFF_S = 60.0

_tables_lock = threading.Lock()


class GalleryJobOutcome(BaseModel):
    """One processed job of `gallery-jobs process`, in LocalSupervisor's words (status done/error/queued)."""

    job_id: int
    media_id: MediaId
    job_type: str
    status: str  # done | error | queued (retry later)
    item_status: str | None = None
    error_code: str | None = None
    changed_keys: list[str] = []


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat()  # e.g. 2026-01-20T10:00:00+00:00, as PHP's date('c')


def _parse(text: Any) -> datetime | None:
    """An ISO timestamp of the jobs table as an aware datetime (naive text is taken as UTC)."""
    if not text:
        return None
    try:
        ts = datetime.fromisoformat(str(text).replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _naive(ts: datetime | None) -> datetime | None:
    return ts.astimezone(UTC).replace(tzinfo=None) if ts is not None else None


def _owner(worker: str) -> str:
    return f"{OWNER_PREFIX}{worker}"[:255]


# ---- which queue --------------------------------------------------------------------------------


def jobs_table(engine: Engine) -> Table:
    """LocalSupervisor's `jobs` table, reflected; a validation error when the gallery has none."""
    table = _gallery_table(engine)
    if table is None:
        raise ValidationError("the gallery has no jobs table of its own (LocalSupervisor's queue)",
                              code="validation.config")
    return table


def _gallery_table(engine: Engine) -> Table | None:
    """The reflected `jobs` table of a LocalSupervisor gallery, kept on the discovered gallery (so it is
    looked at again whenever the gallery is, e.g. after init-db); None for every other gallery."""
    gallery = require_gallery(engine)
    found = getattr(gallery, "_ollama_jobs_table", False)
    if found is not False:
        return found
    table = None
    schema = getattr(getattr(engine, "_ollama_library", None), "schema_name", None)
    if gallery.profile == LOCALSUPERVISOR and inspect(engine).has_table("jobs", schema=schema):
        table = Table("jobs", MetaData(), autoload_with=engine, schema=schema)
    with _tables_lock:
        gallery._ollama_jobs_table = table  # type: ignore[attr-defined]
    return table


def uses_gallery_queue(pipeline: Any) -> bool:
    """True when the library's gallery keeps a job queue of its own (LocalSupervisor's `jobs`): then every
    queue operation works on it instead of `ollama_jobs`."""
    return _gallery_table(pipeline.engine) is not None


# ---- rows as Jobs -------------------------------------------------------------------------------


def _payload(row: Any) -> dict[str, Any]:
    try:
        loaded = json.loads(row["payload_json"]) if row.get("payload_json") else {}
    except (TypeError, ValueError):
        loaded = {}
    return loaded if isinstance(loaded, dict) else {}


def _options(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as the queue's Job reads it: `force` as a boolean (PHP writes 0/1 and "1" too)."""
    out = dict(payload)
    if "force" in out and not isinstance(out["force"], bool):
        out["force"] = str(out["force"]).strip().lower() in ("1", "true", "yes", "on")
    if "priority" in out and not isinstance(out["priority"], int):
        out.pop("priority")
    return out


def _lease_s(pipeline: Any, payload: dict[str, Any]) -> float:
    value = payload.get("lease_s")
    return float(value) if isinstance(value, int | float) and value > 0 else \
        float(pipeline.settings.pipeline.queue.lease_seconds)


def _job(pipeline: Any, row: Any) -> Job:
    return _job_of(row, float(pipeline.settings.pipeline.queue.lease_seconds),
                   pipeline.settings.ollama.retry.max_attempts)


def _job_of(row: Any, lease_default: float, max_attempts: int) -> Job:
    """One row as the queue's Job (stage name as job_type, the queue's status words, attempts from the payload)."""
    row = dict(row)
    payload = _payload(row)
    status = STATUS_IN.get(str(row["status"]), str(row["status"]))
    heartbeat = _parse(row.get("heartbeat_at"))
    if status == "running":
        lease_s = payload.get("lease_s")
        lease_s = float(lease_s) if isinstance(lease_s, int | float) and lease_s > 0 else lease_default
        lease = heartbeat + timedelta(seconds=lease_s) if heartbeat else None
    else:
        lease = _parse(row.get("not_before")) if status == "queued" else None
    owner = row.get("worker_owner") or None
    error = row.get("last_error_code") if status in ("failed", "queued") else None
    return Job(id=int(row["id"]), job_type=TYPE_TO_STAGE.get(row["type"], row["type"]), media_id=int(row["media_id"]),
               payload=_options(payload), status=status, priority=int(payload.get("priority") or 0)
               if isinstance(payload.get("priority"), int) else 0,
               attempts=int(payload.get("attempts") or 0), max_attempts=max_attempts,
               lease_until=_naive(lease),
               worker=owner.removeprefix(OWNER_PREFIX) if owner else None,
               error_channel=str(error).split(".", 1)[0] if error else None, error_code=error,
               error_message=row.get("error_message") if error else None,
               created_at=_naive(_parse(row.get("created_at"))), updated_at=_naive(_parse(row.get("updated_at"))),
               started_at=_naive(_parse(row.get("started_at"))),
               finished_at=_naive(_parse(row.get("updated_at"))) if status in ("done", "failed", "cancelled")
               else None)


def _fence(jobs: Table, job: Job) -> list[Any]:
    """The claim a finishing write must still hold: running, under this worker, since this start."""
    conds = [jobs.c.id == job.id, jobs.c.status == "running", jobs.c.worker_owner == _owner(job.worker or "")]
    if job.started_at is not None:
        conds.append(jobs.c.started_at == _iso(job.started_at.replace(tzinfo=UTC)))
    return conds


def _dump(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _retries(pipeline: Any) -> int:
    return pipeline.settings.database.lock_retries


def _types(job_types: Iterable[str] | None) -> list[str]:
    """LocalSupervisor's type names of the given stages (every type this pipeline has a stage for: None)."""
    if job_types is None:
        return list(TYPE_TO_STAGE)
    return [STAGE_TO_TYPE.get(t, t) for t in job_types if STAGE_TO_TYPE.get(t, t) in TYPE_TO_STAGE]


# ---- enqueue ------------------------------------------------------------------------------------


def enqueue_ollama(pipeline: Any, job_type: str, media_id: int, payload: dict[str, Any] | None = None, *,
                   run_id: str | None = None) -> EnqueueResult:
    """Queue a row in LocalSupervisor's jobs table, deduplicated and limited as its own code does."""
    stage = TYPE_TO_STAGE.get(job_type, job_type)
    kind = STAGE_TO_TYPE.get(stage)
    if kind is None:
        raise ValidationError(f"unknown job type {job_type!r}; known: {', '.join(STAGE_TO_TYPE)}",
                              code="validation.job_type")
    parsed = validate_payload(stage, payload)
    if isinstance(media_id, bool) or not isinstance(media_id, int) or media_id < 1:
        raise ValidationError(f"media_id must be a positive integer, got {media_id!r}", code="validation.payload")
    jobs = jobs_table(pipeline.engine)
    m = require_gallery(pipeline.engine)["media"]
    limits = pipeline.settings.library.jobs

    def work(conn: Connection) -> tuple[int, bool]:
        now = _now()
        if conn.execute(select(m.c("id")).where(m.c("id") == media_id)).first() is None:
            raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
        found = conn.execute(select(jobs.c.id).where(jobs.c.media_id == media_id, jobs.c.type == kind,
                                                     jobs.c.status.in_(ACTIVE)).order_by(jobs.c.id.desc())
                             .limit(1)).scalar()
        if found is not None:
            return int(found), False

        def count(*conds: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(jobs)
                                    .where(jobs.c.status.in_(COUNTED), *conds)).scalar_one())

        per_type = limits.queue_max_per_type.get(kind, limits.queue_max_per_type_default)
        for limit, what, conds in ((limits.queue_max_total, "total", ()),
                                   (per_type, kind, (jobs.c.type == kind,)),
                                   (limits.queue_max_per_media, f"{kind} for media {media_id}",
                                    (jobs.c.type == kind, jobs.c.media_id == media_id))):
            used = count(*conds)
            if limit > 0 and used >= limit:
                raise QueueLimitError(f"job queue limit reached ({what}: {used} of {limit}; library.jobs)",
                                      code="queue_limit.overflow", details={"limit": what, "value": limit})
        body = {**parsed.model_dump(exclude_defaults=True), "media_id": media_id, "mode": MODES[kind],
                "created_at": _iso(now)}
        new_id = conn.execute(insert(jobs).values(
            media_id=media_id, prompt_id=None, type=kind, status="queued", created_at=_iso(now), updated_at=_iso(now),
            payload_json=_dump(body))).inserted_primary_key[0]
        return int(new_id), True

    job_id, created = repository.with_retry(pipeline.engine, work, retries=_retries(pipeline),
                                            what=f"enqueue {kind} for media {media_id}")
    return EnqueueResult(job_id=job_id, status="queued" if created else "deduplicated", job_type=stage,
                         media_id=media_id)


# ---- leases and claims --------------------------------------------------------------------------


def _expire_leases(pipeline: Any, conn: Connection, jobs: Table, now: datetime) -> list[tuple[str, Job]]:
    """This pipeline's running jobs whose lease ran out go back to queued, or to error once out of attempts."""
    rows = conn.execute(select(jobs).where(jobs.c.status == "running", jobs.c.type.in_(list(TYPE_TO_STAGE)),
                                           jobs.c.worker_owner.startswith(OWNER_PREFIX, autoescape=True))
                        ).mappings().all()
    events: list[tuple[str, Job]] = []
    for row in rows:
        job = _job(pipeline, row)
        if job.lease_until is None or job.lease_until >= _naive(now):
            continue
        again = job.attempts < job.max_attempts
        values = {"status": "queued" if again else "error", "updated_at": _iso(now), "heartbeat_at": _iso(now),
                  "last_error_code": "internal.lease_expired",
                  "error_message": "the worker's lease ran out (worker stopped or was killed)"}
        if again:
            values.update(worker_owner=None, started_at=None)
        if conn.execute(update(jobs).where(*_fence(jobs, job)).values(**values)).rowcount == 1:
            events.append(("requeued" if again else "failed",
                           job.model_copy(update={"status": "queued" if again else "failed",
                                                  "error_code": "internal.lease_expired"})))
    return events


def requeue_expired(pipeline: Any) -> list[tuple[str, Job]]:
    jobs = jobs_table(pipeline.engine)
    return repository.with_retry(pipeline.engine, lambda conn: _expire_leases(pipeline, conn, jobs, _now()),
                                 retries=_retries(pipeline), what="requeue expired leases")


def _claimable(pipeline: Any, conn: Connection, jobs: Table, now: datetime, types: list[str],
               only: int | None = None) -> list[dict[str, Any]]:
    """Waiting rows of these types whose not_before is due and whose upstream stage has no active job for
    the same item (a title waits for its caption's job), oldest first."""
    from ollama_pipeline.core.queue.store import upstream_closure

    q = select(jobs).where(jobs.c.type.in_(types), jobs.c.status.in_(WAITING), jobs.c.cancel_requested == 0)
    if only is not None:
        q = q.where(jobs.c.id == only)
    rows = [dict(r) for r in conn.execute(q.order_by(jobs.c.id)).mappings()]
    if not rows:
        return []
    active = {(int(r[0]), str(r[1]), int(r[2])) for r in conn.execute(
        select(jobs.c.media_id, jobs.c.type, jobs.c.id).where(jobs.c.status.in_(ACTIVE),
                                                              jobs.c.type.in_(list(TYPE_TO_STAGE)),
                                                              jobs.c.media_id.in_({r["media_id"] for r in rows})))}
    by_item: dict[tuple[int, str], set[int]] = {}
    for media_id, kind, job_id in active:
        by_item.setdefault((media_id, kind), set()).add(job_id)
    out = []
    for row in rows:
        due = _parse(row.get("not_before"))
        if only is None and due is not None and due > now:
            continue
        ups = [STAGE_TO_TYPE[s] for s in upstream_closure(TYPE_TO_STAGE[row["type"]]) if s in STAGE_TO_TYPE]
        if any(by_item.get((int(row["media_id"]), up), set()) - {row["id"]} for up in ups):
            continue
        out.append(row)
    return out


def _take(pipeline: Any, conn: Connection, jobs: Table, row: dict[str, Any], worker: str, now: datetime,
          lease_s: float | None = None) -> Job | None:
    """The guarded claim of one waiting row (`WHERE id = ? AND status IN ('pending', 'queued')`)."""
    payload = _payload(row)
    payload["attempts"] = int(payload.get("attempts") or 0) + 1
    payload["lease_s"] = lease_s or float(pipeline.settings.pipeline.queue.lease_seconds)
    values = {"status": "running", "heartbeat_at": _iso(now), "started_at": _iso(now), "not_before": None,
              "updated_at": _iso(now), "worker_owner": _owner(worker), "worker_pid": os.getpid(),
              "stage": "ollama_pipeline", "stage_changed_at": _iso(now), "payload_json": _dump(payload),
              "last_error_code": None, "error_message": None}
    values = {k: v for k, v in values.items() if k in jobs.c}
    claimed = conn.execute(update(jobs).where(jobs.c.id == row["id"], jobs.c.status.in_(WAITING),
                                              jobs.c.cancel_requested == 0).values(**values)).rowcount
    return _job(pipeline, {**row, **values}) if claimed == 1 else None


def claim_jobs(pipeline: Any, worker: str, limit: int,
               job_types: Iterable[str] | None = None) -> tuple[list[tuple[str, Job]], list[Job]]:
    """Claim up to limit due waiting jobs (oldest first); expired leases of this pipeline are requeued first."""
    jobs = jobs_table(pipeline.engine)
    types = _types(job_types)

    def work(conn: Connection) -> tuple[list[tuple[str, Job]], list[Job]]:
        now = _now()
        events = _expire_leases(pipeline, conn, jobs, now)
        claimed: list[Job] = []
        for row in _claimable(pipeline, conn, jobs, now, types):
            if len(claimed) >= limit:
                break
            job = _take(pipeline, conn, jobs, row, worker, now)
            if job is not None:
                claimed.append(job)
        return events, claimed

    if limit <= 0 or not types:
        return [], []
    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="claim jobs")


def claim_one(pipeline: Any, job_id: int, worker: str) -> tuple[list[tuple[str, Job]], Job | None, Job | None]:
    """Claim one specific waiting job, ignoring its not_before; (events, claimed job, or None and the row)."""
    jobs = jobs_table(pipeline.engine)

    def work(conn: Connection) -> tuple[list[tuple[str, Job]], Job | None, Job | None]:
        now = _now()
        events = _expire_leases(pipeline, conn, jobs, now)
        for row in _claimable(pipeline, conn, jobs, now, list(TYPE_TO_STAGE), only=job_id):
            job = _take(pipeline, conn, jobs, row, worker, now)
            if job is not None:
                return events, job, None
        current = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return events, None, _job(pipeline, current) if current is not None else None

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"claim job {job_id}")


def _requeue_values(now: datetime, payload: dict[str, Any]) -> dict[str, Any]:
    """Back to waiting as if never claimed: the attempt is not counted."""
    payload = {**payload, "attempts": max(0, int(payload.get("attempts") or 0) - 1)}
    payload.pop("lease_s", None)
    return {"status": "queued", "worker_owner": None, "started_at": None, "updated_at": _iso(now),
            "heartbeat_at": _iso(now), "payload_json": _dump(payload)}


def assign_claims(pipeline: Any, worker: str, assignments: dict[str, list[int]], *, lease_seconds: float,
                  release: Iterable[int] = ()) -> list[Job]:
    """Hand jobs claimed by `worker` on to other worker names (one per Dagster run) with a new lease, and put
    the `release` ones back as if never claimed; one transaction, fenced on (running, worker)."""
    jobs = jobs_table(pipeline.engine)
    released_ids = set(release)
    owner_of = {job_id: name for name, ids in assignments.items() for job_id in ids}

    def work(conn: Connection) -> list[Job]:
        now = _now()
        mine = (jobs.c.status == "running") & (jobs.c.worker_owner == _owner(worker))
        back: list[Job] = []
        wanted = list(owner_of) + list(released_ids)
        for start in range(0, len(wanted), 900):
            for row in conn.execute(select(jobs).where(mine, jobs.c.id.in_(wanted[start : start + 900]))).mappings():
                payload = _payload(row)
                if row["id"] in released_ids:
                    values = _requeue_values(now, payload)
                else:
                    values = {"worker_owner": _owner(owner_of[row["id"]]), "heartbeat_at": _iso(now),
                              "updated_at": _iso(now), "payload_json": _dump({**payload, "lease_s": lease_seconds})}
                conn.execute(update(jobs).where(jobs.c.id == row["id"], mine).values(**values))
                if row["id"] in released_ids:
                    back.append(_job(pipeline, {**row, **values}))
        return back

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="assign claims")


def release_claims(pipeline: Any, claimed: Iterable[Job]) -> int:
    """Put claimed jobs back in the queue untried (their attempt is not counted), fenced on the claim."""
    jobs = jobs_table(pipeline.engine)
    todo = list(claimed)

    def work(conn: Connection) -> int:
        now = _now()
        done = 0
        for job in todo:
            row = conn.execute(select(jobs).where(*_fence(jobs, job))).mappings().first()
            if row is not None:
                done += conn.execute(update(jobs).where(*_fence(jobs, job))
                                     .values(**_requeue_values(now, _payload(row)))).rowcount
        return done

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="release claims") \
        if todo else 0


def claimed_by_worker(pipeline: Any, worker: str) -> list[Job]:
    """The running jobs claimed under exactly this worker name (a Dagster run's batch), by id."""
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(jobs).where(jobs.c.status == "running", jobs.c.worker_owner == _owner(worker))
                            .order_by(jobs.c.id)).mappings().all()
    return [_job(pipeline, r) for r in rows]


def claimed_by(pipeline: Any, worker_prefix: str) -> list[Job]:
    """Running jobs whose worker name starts with worker_prefix (e.g. the claims of Dagster runs), by id."""
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(jobs).where(jobs.c.status == "running", jobs.c.worker_owner.startswith(
            _owner(worker_prefix), autoescape=True)).order_by(jobs.c.id)).mappings().all()
    return [_job(pipeline, r) for r in rows]


def expire_claims(pipeline: Any, worker: str) -> int:
    """End the leases of a dead worker's jobs now, so the next claim requeues them (a killed Dagster run)."""
    jobs = jobs_table(pipeline.engine)

    def work(conn: Connection) -> int:
        return conn.execute(update(jobs).where(jobs.c.status == "running", jobs.c.worker_owner == _owner(worker))
                            .values(heartbeat_at=_EXPIRED)).rowcount

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="expire claims")


def renew_claims(pipeline: Any, claimed: Iterable[Job], lease_seconds: float) -> int:
    """Renew the leases of claimed jobs (heartbeat now, lease `lease_seconds`), fenced on the claim."""
    jobs = jobs_table(pipeline.engine)
    todo = list(claimed)

    def work(conn: Connection) -> int:
        now = _now()
        renewed = 0
        for job in todo:
            values: dict[str, Any] = {"heartbeat_at": _iso(now)}
            if _lease_s(pipeline, job.payload) != float(lease_seconds):
                row = conn.execute(select(jobs.c.payload_json).where(*_fence(jobs, job))).mappings().first()
                if row is None:
                    continue
                values["payload_json"] = _dump({**_payload(row), "lease_s": lease_seconds})
            renewed += conn.execute(update(jobs).where(*_fence(jobs, job)).values(**values)).rowcount
        return renewed

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="renew claims") \
        if todo else 0


def renew_leases(pipeline: Any, running: dict[int, int]) -> None:
    """The worker's LeaseKeeper: a new heartbeat for the jobs it runs (id -> attempt), this pipeline's only."""
    jobs = jobs_table(pipeline.engine)

    def work(conn: Connection) -> None:
        conn.execute(update(jobs).where(jobs.c.id.in_(list(running)), jobs.c.status == "running",
                                        jobs.c.worker_owner.startswith(OWNER_PREFIX, autoescape=True))
                     .values(heartbeat_at=_iso(_now())))

    repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what="renew leases")


# ---- finishing ----------------------------------------------------------------------------------


def finish(pipeline: Any, job: Job, error: dict[str, Any] | None) -> tuple[str | None, datetime | None]:
    """Record done / queued-for-retry (not_before = backoff) / error, fenced on the claim, in LocalSupervisor's
    columns; returns the queue's status (None: the claim was lost) and the retry's not-before."""
    jobs = jobs_table(pipeline.engine)
    retry = bool(error and error.get("retryable")) and job.attempts < job.max_attempts
    backoff = min(_MAX_BACKOFF_S, pipeline.settings.ollama.retry.backoff_ms / 1000.0 * (2 ** max(0, job.attempts - 1)))

    def work(conn: Connection) -> tuple[str | None, datetime | None]:
        now = _now()
        row = conn.execute(select(jobs.c.payload_json).where(*_fence(jobs, job))).mappings().first()
        if row is None:
            return None, None
        payload = _payload(row)
        payload.pop("lease_s", None)
        values: dict[str, Any] = {"heartbeat_at": _iso(now), "updated_at": _iso(now), "payload_json": _dump(payload)}
        not_before = None
        if error is None:
            status, ls_status = "done", "done"
            values.update(last_error_code=None, error_message=None, progress_bits=1, progress_bits_total=1)
        else:
            values.update(last_error_code=str(error.get("code") or "internal.error")[:255],
                          error_message=str(error.get("message") or "")[:2000])
            if retry:
                status, ls_status = "queued", "queued"
                not_before = now + timedelta(seconds=backoff)
                values.update(not_before=_iso(not_before), worker_owner=None)
            else:
                status, ls_status = "failed", "error"
        values = {k: v for k, v in values.items() if k in jobs.c}
        if conn.execute(update(jobs).where(*_fence(jobs, job)).values(status=ls_status, **values)).rowcount != 1:
            return None, None
        return status, _naive(not_before)

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"finish job {job.id}")


# ---- management ---------------------------------------------------------------------------------


def get_job(pipeline: Any, job_id: int) -> Job:
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
    if row is None:
        raise ValidationError(f"no job with id {job_id}", code="validation.payload")
    return _job(pipeline, row)


def retry_job(pipeline: Any, job_id: int) -> Job:
    """Put an error or cancelled job back in the queue with its attempts reset (no queue limits apply)."""
    jobs = jobs_table(pipeline.engine)

    def work(conn: Connection) -> Job:
        now = _now()
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise ValidationError(f"no job with id {job_id}", code="validation.payload")
        if STATUS_IN.get(row["status"]) not in ("failed", "cancelled"):
            raise ValidationError(f"job {job_id} is {STATUS_IN.get(row['status'], row['status'])}; only failed or "
                                  f"cancelled jobs can be retried", code="validation.payload")
        other = conn.execute(select(jobs.c.id, jobs.c.status).where(
            jobs.c.type == row["type"], jobs.c.media_id == row["media_id"], jobs.c.status.in_(ACTIVE),
            jobs.c.id != job_id)).first()
        if other is not None:
            raise PersistenceError(f"job {job_id} cannot be requeued: job {other[0]} ({row['type']} for media "
                                   f"{row['media_id']}) is already {other[1]}", code="persistence.constraint")
        payload = {**_payload(row), "attempts": 0}
        values = {"status": "queued", "not_before": None, "worker_owner": None, "started_at": None,
                  "last_error_code": None, "error_message": None, "cancel_requested": 0, "cancelled_at": None,
                  "updated_at": _iso(now), "payload_json": _dump(payload)}
        values = {k: v for k, v in values.items() if k in jobs.c}
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
        return _job(pipeline, {**row, **values})

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"retry job {job_id}")


def cancel_job(pipeline: Any, job_id: int) -> Job:
    """Cancel a waiting job as LocalSupervisor's cancel does (running jobs finish; others stay)."""
    jobs = jobs_table(pipeline.engine)

    def work(conn: Connection) -> Job:
        now = _now()
        values = {"status": "cancelled", "cancel_requested": 1, "cancelled_at": _iso(now),
                  "last_error_code": "cancelled", "updated_at": _iso(now)}
        values = {k: v for k, v in values.items() if k in jobs.c}
        if conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(WAITING))
                        .values(**values)).rowcount == 1:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one()
            return _job(pipeline, row)
        current = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if current is None:
            raise ValidationError(f"no job with id {job_id}", code="validation.payload")
        raise ValidationError(f"job {job_id} is {STATUS_IN.get(current, current)}; only queued jobs can be "
                              f"cancelled", code="validation.payload")

    return repository.with_retry(pipeline.engine, work, retries=_retries(pipeline), what=f"cancel job {job_id}")


def list_jobs(pipeline: Any, status: str | None = None, job_type: str | None = None, media_id: Any = None,
              limit: int = 50) -> list[Job]:
    """The newest jobs of the types this pipeline runs first, filtered like the queue's list."""
    from ollama_pipeline.core.selection import MediaSelection

    jobs = jobs_table(pipeline.engine)
    if status is not None and status not in JOB_STATUSES:
        raise ValidationError(f"unknown job status {status!r}; known: {', '.join(JOB_STATUSES)}",
                              code="validation.payload")
    q = select(jobs).where(jobs.c.type.in_(_types([job_type] if job_type else None))) \
        .order_by(jobs.c.id.desc()).limit(max(1, limit))
    if status is not None:
        q = q.where(jobs.c.status.in_(STATUS_OUT[status]))
    if isinstance(media_id, MediaSelection):
        q = q.where(media_id.where(jobs.c.media_id))
    elif media_id is not None:
        q = q.where(jobs.c.media_id == media_id)
    with pipeline.engine.connect() as conn:
        return [_job(pipeline, r) for r in conn.execute(q).mappings()]


def queue_counts(pipeline: Any) -> QueueCounts:
    """Jobs per status (the queue's vocabulary), overall and per stage, over the types this pipeline runs."""
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.type, jobs.c.status, func.count()).where(
            jobs.c.type.in_(list(TYPE_TO_STAGE))).group_by(jobs.c.type, jobs.c.status)).all()
    total = dict.fromkeys(JOB_STATUSES, 0)
    by_type: dict[str, dict[str, int]] = {}
    for kind, raw, count in rows:
        status = STATUS_IN.get(raw, raw)
        total[status] = total.get(status, 0) + int(count)
        stage = by_type.setdefault(TYPE_TO_STAGE[kind], dict.fromkeys(JOB_STATUSES, 0))
        stage[status] = stage.get(status, 0) + int(count)
    return QueueCounts(total=total, by_type=dict(sorted(by_type.items())))


def media_jobs(engine: Engine, media_id: int, *, limit: int = 100, lease_default: float = 300.0,
               max_attempts: int = 3) -> list[Job] | None:
    """The jobs of one item in the gallery's own queue, newest first (the web UI's item page); None when
    the gallery has no queue of its own."""
    jobs = _gallery_table(engine)
    if jobs is None:
        return None
    with engine.connect() as conn:
        rows = conn.execute(select(jobs).where(jobs.c.media_id == media_id, jobs.c.type.in_(list(TYPE_TO_STAGE)))
                            .order_by(jobs.c.id.desc()).limit(limit)).mappings().all()
    return [_job_of(r, lease_default, max_attempts) for r in rows]


def next_due(pipeline: Any, job_types: list[str] | None) -> datetime | None:
    """When the earliest waiting job in backoff becomes claimable (None: no such job)."""
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        texts = conn.execute(select(jobs.c.not_before).where(jobs.c.status.in_(WAITING), jobs.c.type.in_(
            _types(job_types)), jobs.c.not_before.is_not(None), jobs.c.cancel_requested == 0)).scalars().all()
    due = [t for t in (_parse(x) for x in texts) if t is not None]
    return _naive(min(due)) if due else None


def count_queued(pipeline: Any, job_types: list[str] | None) -> int:
    jobs = jobs_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs).where(
            jobs.c.status.in_(WAITING), jobs.c.type.in_(_types(job_types)))).scalar() or 0)


# ---- `gallery-jobs process` ---------------------------------------------------------------------


def process_gallery_jobs(pipeline: Any, *, limit: int = 100) -> list[GalleryJobOutcome]:
    """`gallery-jobs process`: the queue's worker (`process_jobs`, the code path of `process` and of the
    Dagster runs) over LocalSupervisor's jobs table, up to limit jobs; the outcomes in its words."""
    from ollama_pipeline.core.queue.worker import process_jobs

    jobs_table(pipeline.engine)
    outcomes: list[GalleryJobOutcome] = []

    def record(outcome: Any, _done: int, _total: int) -> None:
        status = {"failed": "error"}.get(outcome.status, outcome.status)
        outcomes.append(GalleryJobOutcome(
            job_id=outcome.job_id, media_id=outcome.media_id or 0,
            job_type=STAGE_TO_TYPE.get(outcome.job_type or "", outcome.job_type or ""), status=status,
            item_status=outcome.item_status, error_code=(outcome.error or {}).get("code"),
            changed_keys=outcome.changed_keys))

    process_jobs(pipeline, limit=limit, concurrency=1, progress=record, wait_for_retries=False)
    return sorted(outcomes, key=lambda o: o.job_id)
