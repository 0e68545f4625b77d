"""Which items of a stage are worth running again: results of another stage version or model, and items
whose last attempt failed with a retryable error. Read by the Dagster refresh schedule.

A stored result is stale when `ollama_stage_results.version` differs from the stage's current version
(prompt template, answer schema, pipeline version) or its `model` differs from the configured model: both
are part of the fingerprint, so re-running such an item calls the model. Items that were never run are
not refresh candidates (new media are the new-media sensor's and the job queue's business), and items with
a queued or running job of the same type are left to that job. This module must not import Dagster.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import exists, or_, select

from ollama_pipeline.core.db.engine import read_connection
from ollama_pipeline.core.db.models import OllamaJob, OllamaStageResult
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.queue.store import ACTIVE_STATUSES
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages.base import Stage


class RefreshItems(BaseModel):
    """The refresh candidates of one stage, by reason (media ids, ascending)."""

    job_type: str
    version: str
    model: str
    stale: list[MediaId] = Field(default_factory=list, description="ok results of another stage version or model")
    retryable: list[MediaId] = Field(default_factory=list, description="last result failed with a retryable error")

    @property
    def media_ids(self) -> list[MediaId]:
        """Every candidate once, ascending."""
        return sorted({*self.stale, *self.retryable})


def _gallery_jobs(pipeline: Pipeline) -> Any:
    from ollama_pipeline.core.queue import gallery_jobs

    return gallery_jobs.jobs_table(pipeline.engine) if gallery_jobs.uses_gallery_queue(pipeline) else None


def refresh_items(pipeline: Pipeline, stage: Stage, *, limit: int) -> RefreshItems:
    """At most `limit` stale and `limit` retryable-failed items of one stage, lowest media ids first."""
    version, model = stage.version, pipeline.model_for(stage)
    result = OllamaStageResult
    gallery_jobs = _gallery_jobs(pipeline)
    if gallery_jobs is not None:  # the gallery's own queue (LocalSupervisor's jobs)
        from ollama_pipeline.core.queue.gallery_jobs import ACTIVE, STAGE_TO_TYPE

        active_job = exists(select(gallery_jobs.c.id).where(
            gallery_jobs.c.type == STAGE_TO_TYPE.get(stage.job_type, stage.job_type),
            gallery_jobs.c.media_id == result.media_id, gallery_jobs.c.status.in_(ACTIVE)))
    else:
        active_job = exists(select(OllamaJob.id).where(
            OllamaJob.job_type == stage.job_type, OllamaJob.media_id == result.media_id,
            OllamaJob.status.in_(ACTIVE_STATUSES)))
    base = select(result.media_id).where(result.stage == stage.job_type, ~active_job)
    stale_q = base.where(result.status == "ok", or_(result.version.is_(None), result.version != version,
                                                    result.model.is_(None), result.model != model))
    failed_q = base.where(result.status == "failed", result.retryable.is_(True))
    with read_connection(pipeline.engine) as conn:
        stale = list(conn.execute(stale_q.order_by(result.media_id).limit(limit)).scalars())
        retryable = list(conn.execute(failed_q.order_by(result.media_id).limit(limit)).scalars())
    return RefreshItems(job_type=stage.job_type, version=version, model=model, stale=stale, retryable=retryable)
