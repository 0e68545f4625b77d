"""Running jobs: the one code path from a claimed job to its recorded end state.

`process_ollama_job` (one job), `process_jobs` (drain the queue with a thread pool: `ollama-pipeline
process`) and `process_claimed` (the jobs a Dagster run was given by `queued_jobs_sensor`) all run
`run_claimed`: the stage through `runner.run_item` (which persists through the one write path), then the job's
end state through the store's fenced `_finish`, with the lease renewed by a `LeaseKeeper` while it runs.
This module must not import Dagster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait

from pydantic import ValidationError as PydanticValidationError

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.errors import OllamaPipelineError, PersistenceError, ValidationError
from ollama_pipeline.core.queue.models import Job, JobOutcome, ProcessSummary, ProgressCallback, tally_outcome
from ollama_pipeline.core.queue.store import (
    _claim_one,
    _finish,
    _model_for,
    _now,
    _report,
    claim_jobs,
    count_queued,
    default_worker,
    next_due,
    release_claims,
    renew_leases,
)
from ollama_pipeline.core.runner import CircuitBreaker, ItemOutcome, Pipeline, run_item, upstream_failures
from ollama_pipeline.core.stages import get_stage

_enrich_lock = threading.Lock()


class LeaseKeeper:
    """Renews the leases of the jobs a worker is running, so only a dead worker's jobs expire."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.interval = max(0.2, pipeline.settings.pipeline.queue.lease_seconds / 3.0)
        self._jobs: dict[int, int] = {}  # job id -> claimed attempt (the fence)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="ollama-lease-keeper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def track(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job.attempts

    def untrack(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def renew(self) -> None:
        with self._lock:
            jobs = dict(self._jobs)
        if not jobs:
            return
        try:
            renew_leases(self.pipeline, jobs, self.pipeline.settings.pipeline.queue.lease_seconds)
        except OllamaPipelineError as exc:  # the next renewal tries again; a lost lease is fenced at finish
            self.pipeline.logs.error(exc, operation="renew_leases", jobs=sorted(jobs))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew()



def run_claimed(pipeline: Pipeline, job: Job, keeper: LeaseKeeper | None = None, *, run_id: str | None = None,
                 breaker: CircuitBreaker | None = None) -> JobOutcome:
    """Run a claimed job's stage through the runner and record the job's new state (run_id: the Dagster run
    that processes it; breaker: a run-wide circuit breaker, open -> the job goes back to the queue untried)."""
    started = time.perf_counter()
    model = _model_for(pipeline, job.job_type, job.payload)
    outcome: ItemOutcome | None = None
    if keeper is not None:
        keeper.track(job)
    try:
        try:
            stage = get_stage(job.job_type)
            options = job.options
            inputs = repository.load_inputs(pipeline.engine, job.media_id)
            if stage.enrich is not None:
                with _enrich_lock:
                    stage.enrich(pipeline, {job.media_id: inputs})
            state = repository.stage_states(pipeline.engine, stage.job_type, [job.media_id]).get(job.media_id)
            blocked = upstream_failures(pipeline, stage, [job.media_id]).get(job.media_id)
            outcome = run_item(pipeline, stage, inputs, state=state, force=options.force, model=options.model,
                               job_id=job.id, run_id=run_id or job.run_id, blocked_by=blocked, breaker=breaker)
            if outcome.status == "untouched":
                release_claims(pipeline, [job])
                return JobOutcome(job_id=job.id, media_id=job.media_id, job_type=job.job_type, claimed=True,
                                  status="queued", item_status="untouched", attempt=job.attempts, model=model)
            error = outcome.error if outcome.status == "failed" else None
            model = outcome.model or model
        except OllamaPipelineError as exc:  # before the model call: unknown type, media gone, bad stored payload
            pipeline.logs.error(exc, job_id=job.id, media_id=job.media_id, job_type=job.job_type, model=model)
            error = exc.to_dict()
        except PydanticValidationError as exc:
            err = ValidationError(f"stored payload of job {job.id} is invalid: {exc.errors()[0]['msg']}",
                                  code="validation.payload")
            pipeline.logs.error(err, job_id=job.id, media_id=job.media_id, job_type=job.job_type, model=model)
            error = err.to_dict()
        status, not_before = _finish(pipeline, job, error)
    finally:
        if keeper is not None:
            keeper.untrack(job)
    duration = (time.perf_counter() - started) * 1000.0
    metrics = outcome.metrics if outcome is not None else None
    return _report(pipeline, job, status, not_before, error=error, model=model, duration_ms=duration,
                   item_status=outcome.status if outcome else None,
                   changed_keys=outcome.changed_keys if outcome else [],
                   prompt_eval_count=metrics.prompt_eval_count if metrics else 0,
                   eval_count=metrics.eval_count if metrics else 0, calls=metrics.calls if metrics else 0,
                   model_ms=metrics.total_duration_ms if metrics else 0.0)



def process_ollama_job(pipeline: Pipeline, job_id: int, *, worker: str | None = None) -> JobOutcome:
    """Claim one job (queued, or running with an expired lease), run its stage and record the outcome."""
    worker = worker or default_worker()
    claimed, current = _claim_one(pipeline, job_id, worker)
    if claimed is None:
        assert current is not None
        return JobOutcome(job_id=current.id, media_id=current.media_id, job_type=current.job_type, claimed=False,
                          status=current.status, attempt=current.attempts,
                          model=_model_for(pipeline, current.job_type, current.payload))
    with LeaseKeeper(pipeline) as keeper:
        return run_claimed(pipeline, claimed, keeper)


def process_jobs(pipeline: Pipeline, worker: str | None = None, *, limit: int | None = None,
                 concurrency: int | None = None, job_types: Iterable[str] | None = None,
                 progress: ProgressCallback | None = None, wait_for_retries: bool = True) -> ProcessSummary:
    """Drain the queue with a thread pool: claim as many jobs as there are free threads, run, repeat.

    Returns when no job is claimable, nothing is running here and (with wait_for_retries) no queued job
    waits for its backoff; or after `limit` claims.
    """
    worker = worker or default_worker()
    threads = max(1, concurrency or pipeline.settings.pipeline.concurrency)
    types = list(job_types) if job_types is not None else None
    summary = ProcessSummary(worker=worker)
    started = time.perf_counter()
    total = count_queued(pipeline, types)
    if limit is not None:
        total = min(total, limit)
    claimed_count = 0
    inflight: dict[Future[JobOutcome], Job] = {}
    with LeaseKeeper(pipeline) as keeper, ThreadPoolExecutor(max_workers=threads,
                                                             thread_name_prefix="ollama-job") as pool:
        while True:
            room = threads - len(inflight)
            if limit is not None:
                room = min(room, limit - claimed_count)
            claimed: list[Job] = []
            if room > 0:
                try:
                    claimed = claim_jobs(pipeline, worker, room, types)
                except PersistenceError as exc:  # a busy database: finish what runs, claim again later
                    if not inflight:
                        raise
                    pipeline.logs.error(exc, worker=worker, operation="claim")
                for job in claimed:
                    keeper.track(job)
                    inflight[pool.submit(run_claimed, pipeline, job, keeper)] = job
                claimed_count += len(claimed)
                total = max(total, summary.processed + len(inflight))
            if not inflight:
                if limit is not None and claimed_count >= limit:
                    break
                due = next_due(pipeline, types) if wait_for_retries else None
                if due is None:
                    break
                time.sleep(min(1.0, max(0.01, (due - _now()).total_seconds())))
                continue
            done, _ = wait(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                job = inflight.pop(fut)
                try:
                    outcome = fut.result()
                except OllamaPipelineError as exc:  # recording the outcome failed: the lease will expire
                    pipeline.logs.error(exc, job_id=job.id, media_id=job.media_id, job_type=job.job_type,
                                        worker=worker)
                    summary.errors += 1
                    keeper.untrack(job)
                    continue
                summary.processed += 1
                tally_outcome(summary, outcome)
                if progress is not None:
                    progress(outcome, summary.processed, max(total, summary.processed + len(inflight)))
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary



def process_claimed(pipeline: Pipeline, claimed: Iterable[Job], *, run_id: str | None = None,
                    concurrency: int | None = None, breaker: CircuitBreaker | None = None) -> Iterator[JobOutcome]:
    """Run jobs already claimed (by queued_jobs_sensor for a Dagster run) on the worker's code path: leases
    renewed while they run, each outcome recorded and logged as `process_ollama_job` records it. Yields the
    outcomes as they complete."""
    todo = list(claimed)
    threads = max(1, concurrency or pipeline.settings.pipeline.concurrency)
    with LeaseKeeper(pipeline) as keeper, ThreadPoolExecutor(max_workers=threads,
                                                             thread_name_prefix="ollama-job") as pool:
        for job in todo:
            keeper.track(job)
        futures = [pool.submit(run_claimed, pipeline, job, keeper, run_id=run_id, breaker=breaker) for job in todo]
        for future in as_completed(futures):
            yield future.result()


_run_claimed = run_claimed  # the name before the split
