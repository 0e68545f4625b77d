"""The job queue's data: statuses, payload models and the typed results of every queue operation.

Plain pydantic models and constants, no database and no stage code at import (the CLI imports them to build
its parser). The SQL of the job table lives in `store`, running jobs in `worker`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.jsontext import loads_or_none

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATUSES: tuple[str, ...] = ("queued", "running")


# ---- payloads ------------------------------------------------------------------------------------


class JobPayload(BaseModel):
    """The payload every job type accepts: force a model call, override the model, set a priority."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    force: bool = Field(default=False, description="Call the model even when the inputs did not change.")
    model: str | None = Field(default=None, min_length=1, max_length=255,
                              description="Use this model instead of the configured one.")
    priority: int = Field(default=0, ge=0, le=100, description="Higher runs first (0..100).")


# Payload models of job types that need more than the common base (none yet): every other stage uses it.
PAYLOAD_MODELS: dict[str, type[JobPayload]] = {}


def payload_model(job_type: str) -> type[JobPayload]:
    """The payload model of a job type (validation.job_type for an unknown one)."""
    from ollama_pipeline.core.stages import get_stage

    get_stage(job_type)
    return PAYLOAD_MODELS.get(job_type, JobPayload)


def validate_payload(job_type: str, payload: dict[str, Any] | None) -> JobPayload:
    """Parse a job payload; the error message names every offending field."""
    model = payload_model(job_type)
    if payload is None:
        return model()
    if not isinstance(payload, dict):
        raise ValidationError(f"payload for {job_type} must be a JSON object, got {type(payload).__name__}",
                              code="validation.payload")
    try:
        return model.model_validate(payload)
    except PydanticValidationError as exc:
        parts = []
        for item in exc.errors():
            name = ".".join(str(p) for p in item["loc"]) or "payload"
            if item["type"] == "extra_forbidden":
                parts.append(f"field '{name}' is not allowed (allowed: {', '.join(model.model_fields)})")
            else:
                parts.append(f"field '{name}': {item['msg']} (got {item.get('input')!r})")
        raise ValidationError(f"invalid payload for {job_type}: {'; '.join(parts)}", code="validation.payload",
                              details={"fields": [".".join(str(p) for p in e["loc"]) for e in exc.errors()]}
                              ) from None


# ---- result models -------------------------------------------------------------------------------


class Job(BaseModel):
    """One row of `ollama_jobs`, payload parsed."""

    id: int
    job_type: str
    media_id: MediaId
    payload: dict[str, Any] = Field(default_factory=dict)
    status: str
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    lease_until: datetime | None = None
    worker: str | None = None
    run_id: str | None = None
    error_channel: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        data = dict(row)
        loaded = loads_or_none(data.get("payload"))
        data["payload"] = loaded if isinstance(loaded, dict) else {}
        return cls.model_validate(data)

    @property
    def options(self) -> JobPayload:
        """The stored payload as its model (unknown keys from older versions are dropped)."""
        model = PAYLOAD_MODELS.get(self.job_type, JobPayload)
        return model.model_validate({k: v for k, v in self.payload.items() if k in model.model_fields})


class EnqueueResult(BaseModel):
    """What `enqueue_ollama` did: a new queued job, or the id of the active job that already holds the slot."""

    job_id: int
    status: Literal["queued", "deduplicated"]
    job_type: str
    media_id: MediaId


class JobOutcome(BaseModel):
    """What `process_ollama_job` did with one job."""

    job_id: int
    media_id: MediaId | None = None
    job_type: str | None = None
    claimed: bool = Field(description="False when the job was not claimable (done, failed, running elsewhere).")
    status: str = Field(description="The job's status afterwards: done, queued (retry), failed, running, ...")
    item_status: str | None = Field(default=None, description="written | unchanged | skipped | failed")
    attempt: int = 0
    model: str | None = None
    duration_ms: float = 0.0
    prompt_eval_count: int = 0
    eval_count: int = 0
    calls: int = 0
    model_ms: float = 0.0
    changed_keys: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    lease_lost: bool = False
    next_attempt_at: datetime | None = None


class QueueCounts(BaseModel):
    """Jobs per status, overall and per job type."""

    total: dict[str, int]
    by_type: dict[str, dict[str, int]]


def tally_outcome(summary: BaseModel, outcome: JobOutcome) -> None:
    """Count one finished job on a summary with `succeeded`, `retried`, `failed` and `lease_lost` counters."""
    field = ("lease_lost" if outcome.lease_lost else "succeeded" if outcome.status == "done"
             else "retried" if outcome.status == "queued" else "failed")
    setattr(summary, field, getattr(summary, field) + 1)


class ProcessSummary(BaseModel):
    """What one `process_jobs` call did."""

    worker: str
    processed: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    lease_lost: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[JobOutcome, int, int], None]
"""progress(outcome, done, total) after each processed job; total grows when more jobs show up."""


class JobTable(Protocol):
    """What the queue needs from a job table (the pipeline's own `ollama_jobs`, implemented by `store`).

    A gallery with a job table of its own (LocalSupervisor's `jobs`) is another implementation of the same
    operations; the worker, the Dagster sensor and the CLI only call these. Every finishing write is fenced on
    (id, running, attempts)."""

    def enqueue_ollama(self, pipeline: Any, job_type: str, media_id: int, payload: dict[str, Any] | None = None,
                       *, run_id: str | None = None) -> EnqueueResult: ...

    def claim_jobs(self, pipeline: Any, worker: str, limit: int, job_types: Any = None) -> list[Job]: ...

    def finish_claimed(self, pipeline: Any, job: Job, error: dict[str, Any] | None, **fields: Any) -> JobOutcome: ...

    def renew_claims(self, pipeline: Any, jobs: Any, lease_seconds: float) -> int: ...

    def release_claims(self, pipeline: Any, claimed: Any) -> int: ...

    def expire_claims(self, pipeline: Any, worker: str) -> int: ...

    def get_job(self, pipeline: Any, job_id: int) -> Job: ...

    def queue_counts(self, pipeline: Any) -> QueueCounts: ...
