"""Enqueue jobs for a whole media selection (`ollama-pipeline enqueue TYPE 1-20000000`, `all`).

The selection is resolved in SQL page by page (never a list of every id in memory). Each page is one
transaction per page and job type set: one multi-row `INSERT … ON CONFLICT DO NOTHING` per job type,
then the queue limits, as `enqueue_ollama` checks them. When a limit refuses a page, the page is rolled
back and redone job by job, so the jobs queued before the limit stay queued and the report says exactly
how far it got: every selected item up to `last_media_id` has its jobs (queued or already active), none
after it. This module must not import Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.models import OllamaJob
from ollama_pipeline.core.errors import OllamaPipelineError, QueueLimitError
from ollama_pipeline.core.jsontext import canonical_json
from ollama_pipeline.core.queue import store
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.selection import MediaSelection

PAGE = 500
OnResult = Callable[[store.EnqueueResult], None]


class BulkEnqueueReport(BaseModel):
    """What an enqueue over a selection did, and where it stopped if it stopped."""

    selection: str
    job_types: list[str]
    queued: int = 0
    deduplicated: int = 0
    items: int = 0
    last_media_id: int | None = None  # every selected item up to this one has its jobs; none after it
    partial_media_id: int | None = None  # the item the error hit after some of its job types were queued
    error: dict[str, Any] | None = None

    def render(self) -> str:
        line = f"enqueue: {self.queued} queued, {self.deduplicated} deduplicated"
        if self.error is None:
            return line
        done = (f"every selected item up to media {self.last_media_id} has its job(s), nothing after it was queued"
                if self.last_media_id is not None else "no item got its job(s)")
        if self.partial_media_id is not None:
            done += f" but {self.partial_media_id}'s first job type(s)"
        return f"{line}; stopped by [{self.error['channel']}/{self.error['code']}]: {done}"


def enqueue_selection(pipeline: Pipeline, job_types: Iterable[str], selection: MediaSelection,
                      payload: dict[str, Any] | None = None, *, page: int = PAGE,
                      on_result: OnResult | None = None) -> BulkEnqueueReport:
    """Queue one job per job type for every media item of the selection (validated first: listed ids the
    library lacks raise `validation.media_missing` before anything is queued). A typed error part-way is
    returned in the report (`error`), with the counts of what was queued before it."""
    types = list(job_types)
    parsed = {t: store.validate_payload(t, payload) for t in types}
    selection.check(pipeline.engine)
    report = BulkEnqueueReport(selection=selection.text, job_types=types)
    gallery = store._gallery(pipeline) is not None  # the gallery's own jobs table: its enqueue, job by job
    for ids in selection.iter_pages(pipeline.engine, page=page):
        if gallery:
            results, failure = _enqueue_one_by_one(pipeline, types, payload, ids)
            _account(report, results, on_result)
            if failure is not None:
                report.error = failure.to_dict()
                return report
            continue
        try:
            results = _enqueue_page(pipeline, types, parsed, payload, ids)
        except QueueLimitError as exc:
            results, error = _enqueue_one_by_one(pipeline, types, payload, ids)
            _account(report, results, on_result)
            report.error = (error or exc).to_dict()
            return report
        except OllamaPipelineError as exc:  # the page rolled back as a whole
            report.error = exc.to_dict()
            return report
        _account(report, results, on_result)
    return report


def _account(report: BulkEnqueueReport, results: list[store.EnqueueResult], on_result: OnResult | None) -> None:
    per_item: dict[int, int] = {}
    for result in results:
        if result.status == "queued":
            report.queued += 1
        else:
            report.deduplicated += 1
        per_item[result.media_id] = per_item.get(result.media_id, 0) + 1
        if on_result is not None:
            on_result(result)
    for media_id, count in per_item.items():  # in selection order
        if count == len(report.job_types):
            report.items += 1
            report.last_media_id = media_id
        else:
            report.partial_media_id = media_id


def _enqueue_page(pipeline: Pipeline, types: list[str], parsed: dict[str, store.JobPayload],
                  payload: dict[str, Any] | None, ids: list[int]) -> list[store.EnqueueResult]:
    """One transaction: every job type for every id of the page, limits checked before the commit."""
    started = time.perf_counter()
    max_attempts = pipeline.settings.ollama.retry.max_attempts

    def work(conn: Connection) -> list[tuple[str, int, int, str | None]]:
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(literal(store._ENQUEUE_LOCK_KEY))))
        out: list[tuple[str, int, int, str | None]] = []  # (job type, media, job, status of the job found)
        for job_type in types:
            now = store._now()
            options = parsed[job_type]
            rows = [{"job_type": job_type, "media_id": m, "payload": canonical_json(options.model_dump()),
                     "status": "queued", "priority": options.priority, "attempts": 0,
                     "max_attempts": max_attempts, "run_id": None, "created_at": now, "updated_at": now}
                    for m in ids]
            ins = pg_insert(OllamaJob) if conn.dialect.name == "postgresql" else sqlite_insert(OllamaJob)
            stmt = ins.values(rows).on_conflict_do_nothing(
                index_elements=["job_type", "media_id"], index_where=store._ACTIVE_WHERE,
            ).returning(OllamaJob.id, OllamaJob.media_id)
            created = {int(m): int(j) for j, m in conn.execute(stmt).all()}
            if created:
                store._check_limits(pipeline, conn, job_type, now)
            rest = [m for m in ids if m not in created]
            existing: dict[int, tuple[int, str]] = {}
            if rest:
                existing = {int(m): (int(j), str(s)) for j, m, s in conn.execute(
                    select(OllamaJob.id, OllamaJob.media_id, OllamaJob.status).where(
                        OllamaJob.job_type == job_type, OllamaJob.media_id.in_(rest),
                        OllamaJob.status.in_(store.ACTIVE_STATUSES))).all()}
            for m in ids:
                if m in created:
                    out.append((job_type, m, created[m], None))
                elif m in existing:
                    out.append((job_type, m, existing[m][0], existing[m][1]))
                else:  # its active job finished between the insert and the select: one job by itself
                    raise _Conflict(m)
        return out

    try:
        rows = repository.with_retry(pipeline.engine, work, retries=store._retries(pipeline),
                                     what=f"enqueue of {len(ids)} media item(s)")
    except _Conflict:
        results, error = _enqueue_one_by_one(pipeline, types, payload, ids)
        if error is not None:
            raise error from None
        return results
    duration = (time.perf_counter() - started) * 1000.0 / max(1, len(rows))
    results = []
    by_media: dict[int, list[store.EnqueueResult]] = {}
    for job_type, media_id, job_id, state in rows:
        model = store._model_for(pipeline, job_type, parsed[job_type])
        if state is None:
            store._log(pipeline, "enqueued", job_id=job_id, media_id=media_id, job_type=job_type, model=model,
                       attempt=0, duration_ms=duration, priority=parsed[job_type].priority,
                       force=parsed[job_type].force, run_id=None)
        else:
            store._log(pipeline, "deduplicated", job_id=job_id, media_id=media_id, job_type=job_type,
                       model=model, attempt=0, duration_ms=duration, existing_status=state)
        by_media.setdefault(media_id, []).append(store.EnqueueResult(
            job_id=job_id, status="queued" if state is None else "deduplicated", job_type=job_type,
            media_id=media_id))
    for media_id in ids:
        results.extend(by_media.get(media_id, []))
    return results


class _Conflict(Exception):
    """An active job ended inside the page's transaction; the page is redone job by job."""


def _enqueue_one_by_one(pipeline: Pipeline, types: list[str], payload: dict[str, Any] | None,
                        ids: list[int]) -> tuple[list[store.EnqueueResult], OllamaPipelineError | None]:
    """The page job by job, in order, up to the first typed error (returned, not raised)."""
    results: list[store.EnqueueResult] = []
    for media_id in ids:
        item: list[store.EnqueueResult] = []
        try:
            for job_type in types:
                item.append(store.enqueue_ollama(pipeline, job_type, media_id, payload))
        except OllamaPipelineError as exc:
            results.extend(item)
            return results, exc
        results.extend(item)
    return results, None
