"""LocalSupervisor's own `jobs` table as a queue: the buttons of its dashboard and its
`SCRIPTS/ollama_enqueue_cli.php` drive this pipeline.

Everything here follows LocalSupervisor's own queue code (`SCRIPTS/ollama_jobs.php`, `SCRIPTS/operations.php`
of github noliv3/LocalSupervisor), so both sides agree on every row:

- job types `ollama_caption`, `ollama_title`, `ollama_tags_normalize`, `ollama_quality`, `ollama_prompt_recon`,
  `ollama_prompt_eval` (here: the score stage, whose prompt adherence it shows) and `ollama_nsfw_classify`
  (here: the policy stage); `ollama_duplicate_assist` is the data contract's name for the duplicate stage.
  Types this pipeline has no stage for (`ollama_embed`, and every non-Ollama type) are never claimed;
- statuses `queued`/`pending` (waiting), `running`, `done`, `error`, `cancelled`; `not_before` delays a
  retry; `payload_json` is `{media_id, mode, created_at, ...}` (`force`, `model` honoured);
- dedupe: a job of the same type and media in `pending`, `running` or `queued` is returned instead of a new
  row (`sv_enqueue_ollama_job`); limits: `queue_max_total`, `queue_max_per_type_default`,
  `queue_max_per_type` and `queue_max_per_media` over the statuses `queued`, `pending`, `created`
  (`sv_enforce_job_queue_capacity`; `library.jobs` in this configuration holds the same numbers);
- claim: `UPDATE jobs SET status = 'running' ... WHERE id = ? AND status IN ('pending', 'queued')` with
  `not_before` due (`sv_ollama_claim_pending_job`): one guarded update, so LocalSupervisor's PHP worker
  and this pipeline can never both claim one job; heartbeat, worker and error fields are written as its
  worker writes them (`heartbeat_at`, `started_at`, `worker_owner`, `worker_pid`, `stage`,
  `last_error_code`, `error_message`).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, MetaData, Table, func, insert, select, update

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.errors import QueueLimitError, ValidationError

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
OWNER_PREFIX = "ollama_pipeline"


class GalleryJobOutcome(BaseModel):
    job_id: int
    media_id: int
    job_type: str
    status: str  # done | error | queued (retry later)
    item_status: str | None = None
    error_code: str | None = None
    changed_keys: list[str] = []


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(ts: datetime) -> str:
    return ts.isoformat()  # e.g. 2026-01-20T10:00:00+00:00, as PHP's date('c')


def jobs_table(engine: Engine) -> Table:
    """LocalSupervisor's `jobs` table, reflected; a validation error when the gallery has none."""
    require_gallery(engine)
    from sqlalchemy import inspect

    if not inspect(engine).has_table("jobs"):
        raise ValidationError("the gallery has no jobs table (LocalSupervisor's queue)", code="validation.config")
    return Table("jobs", MetaData(), autoload_with=engine)


def _owner() -> str:
    return f"{OWNER_PREFIX}:{socket.gethostname()}:{os.getpid()}"


def enqueue(engine: Engine, limits: Any, stage_or_type: str, media_id: int,
            payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """Queue a row in LocalSupervisor's jobs table, deduplicated and limited as its own code does."""
    job_type = STAGE_TO_TYPE.get(stage_or_type, stage_or_type)
    if job_type not in TYPE_TO_STAGE:
        raise ValidationError(f"unknown job type {stage_or_type!r}; known: {', '.join(TYPE_TO_STAGE)}",
                              code="validation.job_type")
    jobs = jobs_table(engine)
    g = require_gallery(engine)
    m = g["media"]
    now = _now()
    with engine.begin() as conn:
        if conn.execute(select(m.c("id")).where(m.c("id") == media_id)).first() is None:
            raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
        found = conn.execute(select(jobs.c.id).where(jobs.c.media_id == media_id, jobs.c.type == job_type,
                                                     jobs.c.status.in_(ACTIVE)).order_by(jobs.c.id.desc())
                             .limit(1)).scalar()
        if found is not None:
            return {"job_id": int(found), "deduped": True}

        def count(*conds: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(jobs)
                                    .where(jobs.c.status.in_(COUNTED), *conds)).scalar_one())

        per_type = limits.queue_max_per_type.get(job_type, limits.queue_max_per_type_default)
        for limit, used, what in ((limits.queue_max_total, count(), "total"),
                                  (per_type, count(jobs.c.type == job_type), job_type),
                                  (limits.queue_max_per_media, count(jobs.c.type == job_type,
                                                                     jobs.c.media_id == media_id), "media")):
            if limit > 0 and used >= limit:
                raise QueueLimitError(f"job queue limit reached ({what}: {used} of {limit})",
                                      code="queue_limit.overflow")
        body = {**(payload or {}), "media_id": media_id, "mode": MODES[job_type], "created_at": _iso(now)}
        job_id = conn.execute(insert(jobs).values(
            media_id=media_id, prompt_id=None, type=job_type, status="queued", created_at=_iso(now),
            updated_at=_iso(now), payload_json=json.dumps(body, ensure_ascii=False, separators=(",", ":")))
        ).inserted_primary_key[0]
    return {"job_id": int(job_id), "deduped": False}


def _claim(engine: Engine, jobs: Table, lease_seconds: int) -> dict[str, Any] | None:
    now = _now()
    with engine.begin() as conn:
        # A job of ours whose heartbeat stopped (its worker died) waits again.
        stale = _iso(now - timedelta(seconds=lease_seconds))
        conn.execute(update(jobs).where(jobs.c.status == "running", jobs.c.worker_owner.like(f"{OWNER_PREFIX}:%"),
                                        jobs.c.heartbeat_at < stale)
                     .values(status="queued", updated_at=_iso(now), last_error_code="internal.lease_expired"))
        for _ in range(5):
            row = conn.execute(select(jobs).where(
                jobs.c.type.in_(list(TYPE_TO_STAGE)), jobs.c.status.in_(WAITING), jobs.c.cancel_requested == 0,
                (jobs.c.not_before.is_(None)) | (jobs.c.not_before <= _iso(now))).order_by(jobs.c.id).limit(1)
            ).mappings().first()
            if row is None:
                return None
            claimed = conn.execute(update(jobs).where(jobs.c.id == row["id"], jobs.c.status.in_(WAITING)).values(
                status="running", heartbeat_at=_iso(now), started_at=_iso(now), not_before=None,
                updated_at=_iso(now), worker_owner=_owner(), worker_pid=os.getpid(), stage="ollama_pipeline",
                stage_changed_at=_iso(now))).rowcount
            if claimed == 1:
                return dict(row)
    return None


def process_gallery_jobs(pipeline: Any, *, limit: int = 100) -> list[GalleryJobOutcome]:
    """Claim and run waiting jobs of LocalSupervisor's jobs table, one at a time, up to limit."""
    from ollama_pipeline.core.runner import run_item
    from ollama_pipeline.core.stages import get_stage

    engine = pipeline.engine
    jobs = jobs_table(engine)
    settings = pipeline.settings
    outcomes: list[GalleryJobOutcome] = []
    while len(outcomes) < limit:
        row = _claim(engine, jobs, settings.pipeline.queue.lease_seconds)
        if row is None:
            break
        payload = json.loads(row["payload_json"] or "{}") if row.get("payload_json") else {}
        stage = get_stage(TYPE_TO_STAGE[row["type"]])
        media_id = int(row["media_id"])
        attempts = int(payload.get("attempts", 0)) + 1
        try:
            inputs = repository.load_inputs_many(engine, [media_id])
            if media_id not in inputs:
                raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
            batch = {media_id: inputs[media_id]}
            if stage.enrich is not None:
                stage.enrich(pipeline, batch)
            state = repository.stage_states(engine, stage.job_type, [media_id]).get(media_id)
            outcome = run_item(pipeline, stage, batch[media_id], state=state, force=bool(payload.get("force")),
                               model=payload.get("model") if isinstance(payload.get("model"), str) else None,
                               job_id=int(row["id"]))
            error = outcome.error
        except ValidationError as exc:
            outcome, error = None, exc.to_dict()
        now = _now()
        values: dict[str, Any] = {"heartbeat_at": _iso(now), "updated_at": _iso(now),
                                  "payload_json": json.dumps({**payload, "attempts": attempts}, ensure_ascii=False,
                                                             separators=(",", ":"))}
        if error is None:
            values.update(status="done", last_error_code=None, error_message=None, progress_bits=1,
                          progress_bits_total=1)
            status = "done"
        else:
            retry = bool(error.get("retryable")) and attempts < settings.ollama.retry.max_attempts
            backoff = settings.ollama.retry.backoff_ms / 1000 * (2 ** (attempts - 1))
            status = "queued" if retry else "error"
            values.update(status=status, last_error_code=error.get("code"),
                          error_message=str(error.get("message", ""))[:2000],
                          not_before=_iso(now + timedelta(seconds=backoff)) if retry else None)
        with engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == row["id"], jobs.c.status == "running").values(**values))
        outcomes.append(GalleryJobOutcome(job_id=int(row["id"]), media_id=media_id, job_type=row["type"],
                                          status=status, item_status=outcome.status if outcome else None,
                                          error_code=None if error is None else error.get("code"),
                                          changed_keys=outcome.changed_keys if outcome else []))
    return outcomes
