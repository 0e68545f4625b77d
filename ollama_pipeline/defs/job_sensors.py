"""The job queue in Dagster: `queued_jobs_sensor` turns queued jobs into batched range runs,
`job_runs_sensor` completes the jobs from the runs' per-item outcomes, and `ollama_refresh_schedule`
re-runs stale and retryable-failed items.

- **Claims.** A tick first asks Ollama for its health (down: skip, claim nothing), then claims due jobs
  with `jobs.claim_jobs` (PostgreSQL `FOR UPDATE SKIP LOCKED`, SQLite `BEGIN IMMEDIATE`), registers their
  media partitions in one bulk call and groups them by (job type, force, model override).
- **Batches.** Each group becomes one run per contiguous range of its partitions (`contiguous_ranges`), so a
  run materializes exactly the partitions that were asked for: jobs for media 1, 2 and 5 are two runs,
  never one run over 1..5 that would also call the model for 3 and 4. Each run is claimed by its own worker
  name `dagster:<batch>`, carried by the run tag `ollama_pipeline/batch`; that name, not the informative
  job-id tag, is what ties jobs to their run. Job priority becomes the run queue's `dagster/priority`,
  and upstream stages are requested before downstream ones. At most MAX_RUNS_PER_TICK runs are requested
  per tick; jobs of further ranges are handed back to the queue, unspent, for the next tick.
- **Leases.** Dagster claims hold a lease of at least four completion ticks; `job_runs_sensor` renews it on
  every tick while the run is queued or running, so the queue's lease expiry only requeues jobs whose run
  never appeared (a lost launch).
- **Completion.** For a finished run, a job succeeded when the run materialized its partition; otherwise its
  error is the one the stage recorded in `ollama_stage_results` for that run, else the item was never
  reached: `internal.run_failed` (retryable: requeued while attempts remain) or `internal.run_canceled`.
  Outcomes go through `jobs.finish_claimed`, fenced on the claim and logged like a worker's.

This module holds the Dagster shell only; the queue, staleness and run logic live in the core.
"""

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.models import Media
from ollama_pipeline.core.errors import OllamaPipelineError, ValidationError
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.refresh import refresh_items
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.defs.assets import LIBRARY_OP, ordered_stages
from ollama_pipeline.defs.partitions import (
    KeyOrder,
    as_positions,
    contiguous_ranges,
    media_key,
    range_tags,
    register_partitions,
)
from ollama_pipeline.defs.resources import PipelineResource

JOB_IDS_TAG = "ollama_pipeline/job_ids"
JOB_TYPE_TAG = "ollama_pipeline/job_type"
JOB_COUNT_TAG = "ollama_pipeline/job_count"
BATCH_TAG = "ollama_pipeline/batch"
REFRESH_TAG = "ollama_pipeline/core/refresh"
PRIORITY_TAG = "dagster/priority"  # the run queue launches higher values first
WORKER_PREFIX = "dagster:"
MAX_JOBS_PER_TICK = 10_000
MAX_RUNS_PER_TICK = 50
MAX_REFRESH_PER_STAGE = 25_000  # Dagster's advice for dynamic partitions added per tick
JOB_IDS_IN_TAG = 100
TICK_SECONDS = 30
REFRESH_CRON = "0 3 * * *"

stage_job_types: list[str] = [stage.job_type for stage in ordered_stages()]
stage_asset_keys: list[AssetKey] = [AssetKey(job_type) for job_type in stage_job_types]


# ---- planning runs --------------------------------------------------------------------------------


class PlannedRun(BaseModel):
    """One run to request: a stage over one contiguous range of partitions, for these claimed jobs."""

    job_type: str
    start: str
    end: str
    force: bool = False
    model: str | None = None
    claims: list[jobs.Job] = Field(default_factory=list)
    batch: str = Field(default_factory=lambda: f"{WORKER_PREFIX}{uuid.uuid4().hex[:16]}")

    @property
    def job_ids(self) -> list[int]:
        return [job.id for job in self.claims]

    @property
    def priority(self) -> int:
        return max(job.priority for job in self.claims)

    @property
    def rank(self) -> tuple[int, int, int]:
        """Higher-priority jobs first, then upstream stages before downstream ones, then older jobs."""
        return -self.priority, stage_job_types.index(self.job_type), min(self.job_ids)


def job_ids_tag(ids: Sequence[int]) -> str:
    """Comma-separated job ids; past JOB_IDS_IN_TAG ids the rest is counted, not listed."""
    shown = ",".join(str(i) for i in ids[:JOB_IDS_IN_TAG])
    return shown if len(ids) <= JOB_IDS_IN_TAG else f"{shown},...(+{len(ids) - JOB_IDS_IN_TAG} more)"


def stage_run_config(*, force: bool = False, model: str | None = None) -> dict[str, Any]:
    """Run config of `ollama_library` for a stage run (model only when a job overrides it)."""
    config: dict[str, Any] = {"force": force, **({"model": model} if model else {})}
    return {"ops": {LIBRARY_OP: {"config": config}}}


def plan_runs(claimed: Iterable[jobs.Job], ordered_keys: KeyOrder) -> list[PlannedRun]:
    """Group jobs by (type, force, model) and split each group into contiguous partition ranges, best first."""
    groups: dict[tuple[str, bool, str | None], dict[str, jobs.Job]] = defaultdict(dict)
    for job in claimed:
        options = job.options
        groups[(job.job_type, options.force, options.model)][media_key(job.media_id)] = job
    position = as_positions(ordered_keys)
    planned: list[PlannedRun] = []
    for (job_type, force, model), by_key in groups.items():
        for start, end in contiguous_ranges(ordered_keys, by_key):
            keys = sorted((k for k in by_key if position[start] <= position[k] <= position[end]),
                          key=position.__getitem__)
            planned.append(PlannedRun(job_type=job_type, start=start, end=end, force=force, model=model,
                                      claims=[by_key[key] for key in keys]))
    return sorted(planned, key=lambda run: run.rank)


def run_request(run: PlannedRun) -> RunRequest:
    """The RunRequest of a planned run: the stage's asset over start..end, job ids and batch in tags."""
    tags = {**range_tags(run.start, run.end), JOB_TYPE_TAG: run.job_type, BATCH_TAG: run.batch,
            JOB_IDS_TAG: job_ids_tag(run.job_ids), JOB_COUNT_TAG: str(len(run.claims)),
            **({PRIORITY_TAG: str(run.priority)} if run.priority else {})}
    return RunRequest(run_key=run.batch, asset_selection=[AssetKey(run.job_type)], tags=tags,
                      run_config=stage_run_config(force=run.force, model=run.model))


def dagster_lease_seconds(core: Pipeline) -> float:
    """The lease of a Dagster claim: the queue's lease, but never shorter than four completion ticks."""
    return float(max(core.settings.pipeline.queue.lease_seconds, 4 * TICK_SECONDS))


def _down(core: Pipeline, what: str) -> SkipReason | None:
    health = core.client.health()
    if health.ok:
        return None
    return SkipReason(f"Ollama at {health.base_url} is not reachable: {health.error_code}; {what}")


# ---- queued_jobs_sensor ---------------------------------------------------------------------------


def _with_valid_payloads(core: Pipeline, claimed: list[jobs.Job]) -> list[jobs.Job]:
    """The claimed jobs whose stored payload parses; the others fail now with validation.payload."""
    valid = []
    for job in claimed:
        try:
            job.options  # noqa: B018 - parsing is the check
        except PydanticValidationError as exc:
            error = ValidationError(f"stored payload of job {job.id} is invalid: {exc.errors()[0]['msg']}",
                                    code="validation.payload")
            core.logs.error(error, job_id=job.id, media_id=job.media_id, job_type=job.job_type)
            jobs.finish_claimed(core, job, error.to_dict())
            continue
        valid.append(job)
    return valid


def queued_jobs_tick(instance: DagsterInstance, core: Pipeline, *, max_jobs: int = MAX_JOBS_PER_TICK,
                     max_runs: int = MAX_RUNS_PER_TICK) -> SensorResult:
    """One tick: health check, claim due jobs, register partitions, one RunRequest per batch."""
    skip = _down(core, "no job was claimed, queued jobs stay queued")
    if skip is not None:
        return SensorResult(skip_reason=skip)
    tick_worker = f"{WORKER_PREFIX}tick-{uuid.uuid4().hex[:12]}"
    claimed = _with_valid_payloads(core, jobs.claim_jobs(core, tick_worker, max_jobs, stage_job_types))
    if not claimed:
        return SensorResult(skip_reason=SkipReason("no queued jobs are due"))
    try:
        ordered = register_partitions(instance, [media_key(job.media_id) for job in claimed]).positions
        planned = plan_runs(claimed, ordered)
    except Exception:  # nothing was launched: give the claims back instead of waiting for their lease
        jobs.assign_claims(core, tick_worker, {}, lease_seconds=0, release=[job.id for job in claimed])
        raise
    launched, later = planned[:max_runs], planned[max_runs:]
    jobs.assign_claims(core, tick_worker, {run.batch: run.job_ids for run in launched},
                       lease_seconds=dagster_lease_seconds(core),
                       release=[job_id for run in later for job_id in run.job_ids])
    return SensorResult(run_requests=[run_request(run) for run in launched])


@sensor(
    name="queued_jobs_sensor", target=AssetSelection.assets(*stage_asset_keys),
    minimum_interval_seconds=TICK_SECONDS, default_status=DefaultSensorStatus.STOPPED,
    description="Claims queued jobs of the job API (after an Ollama health check) and launches one run per "
    "job type and contiguous range of their media partitions, job ids in the run tags "
    f"(`{JOB_IDS_TAG}`, `{BATCH_TAG}`). `job_runs_sensor` completes the jobs. Stopped by default: with it "
    "on, Dagster instead of `ollama-pipeline process` works the queue.",
)
def queued_jobs_sensor(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult:
    """Queued jobs -> claimed -> batched range runs (or a skip reason)."""
    result = queued_jobs_tick(context.instance, pipeline.pipeline())
    for request in result.run_requests or []:
        context.log.info(f"{request.tags[JOB_TYPE_TAG]}: {request.tags[JOB_COUNT_TAG]} job(s) over partitions "
                         f"{request.tags['dagster/asset_partition_range_start']}.."
                         f"{request.tags['dagster/asset_partition_range_end']} ({request.tags[BATCH_TAG]})")
    return result


# ---- job_runs_sensor ------------------------------------------------------------------------------


class CompletionSummary(BaseModel):
    """What one job_runs_sensor tick did."""

    claims: int = 0
    finished_runs: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    lease_lost: int = 0
    renewed: int = 0
    waiting: int = Field(default=0, description="claimed jobs whose run does not exist (yet)")

    def render(self) -> str:
        return (f"{self.claims} claimed job(s): {self.finished_runs} finished run(s) -> {self.succeeded} "
                f"succeeded, {self.retried} retried, {self.failed} failed, {self.lease_lost} lease lost; "
                f"{self.renewed} lease(s) renewed for runs queued or running; {self.waiting} without a run yet")


def _metadata_value(materialization: AssetMaterialization, name: str) -> Any:
    entry = materialization.metadata.get(name)
    return entry.value if entry is not None else None


def _materializations(instance: DagsterInstance, runs: Sequence[DagsterRun],
                      asset: AssetKey) -> dict[str, AssetMaterialization]:
    """Partition -> the materialization of `asset` in any of the runs."""
    found: dict[str, AssetMaterialization] = {}
    for run in runs:
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            materialization = entry.asset_materialization
            if materialization is not None and materialization.asset_key == asset and materialization.partition:
                found[materialization.partition] = materialization
    return found


def _unreached_error(run: DagsterRun, media_id: int, media_exists: bool) -> dict[str, Any]:
    if not media_exists:
        return {"channel": "validation", "code": "validation.media_missing", "retryable": False,
                "message": f"no media row with id {media_id}"}
    if run.status == DagsterRunStatus.CANCELED:
        return {"channel": "internal", "code": "internal.run_canceled", "retryable": False,
                "message": f"Dagster run {run.run_id} was canceled before it reached this item"}
    return {"channel": "internal", "code": "internal.run_failed", "retryable": True,
            "message": f"Dagster run {run.run_id} ended ({run.status.value}) without an outcome for this item"}


def complete_batch(instance: DagsterInstance, core: Pipeline, claims: Sequence[jobs.Job],
                   runs: Sequence[DagsterRun]) -> list[jobs.JobOutcome]:
    """Finish the jobs of one batch from its finished run(s), newest first: materialized in any of them, else
    the failure the stage recorded in one of them, else unreached (judged by the newest run)."""
    job_type = claims[0].job_type
    last = runs[0]
    run_ids = {run.run_id for run in runs}
    materialized = _materializations(instance, runs, AssetKey(job_type))
    missing = [job.media_id for job in claims if media_key(job.media_id) not in materialized]
    states = repository.stage_states(core.engine, job_type, missing) if missing else {}
    with core.engine.connect() as conn:
        existing = set(conn.execute(select(Media.id).where(Media.id.in_(missing))).scalars()) if missing else set()
    outcomes = []
    for job in claims:
        extra = {"run_id": last.run_id, "worker": job.worker}
        materialization = materialized.get(media_key(job.media_id))
        if materialization is not None:
            outcomes.append(jobs.finish_claimed(
                core, job, None, item_status=_metadata_value(materialization, "status"),
                model=_metadata_value(materialization, "model") or None,
                duration_ms=float(_metadata_value(materialization, "total_duration_ms") or 0.0),
                prompt_eval_count=int(_metadata_value(materialization, "prompt_eval_count") or 0),
                eval_count=int(_metadata_value(materialization, "eval_count") or 0), **extra))
            continue
        state = states.get(job.media_id)
        if state is not None and state["status"] == "failed" and state["run_id"] in run_ids:
            error = {"channel": state["error_channel"], "code": state["error_code"],
                     "message": state["error_message"], "retryable": bool(state["retryable"])}
        else:
            error = _unreached_error(last, job.media_id, job.media_id in existing)
        outcomes.append(jobs.finish_claimed(core, job, error, item_status="failed", **extra))
    return outcomes


def complete_job_runs(instance: DagsterInstance, core: Pipeline) -> CompletionSummary:
    """Complete the Dagster-claimed jobs whose runs finished; renew the leases of those still queued/running."""
    summary = CompletionSummary()
    claims = jobs.claimed_by(core, WORKER_PREFIX)
    summary.claims = len(claims)
    if not claims:
        return summary
    by_batch: dict[str, list[jobs.Job]] = defaultdict(list)
    for job in claims:
        by_batch[str(job.worker)].append(job)
    runs_of: dict[str, list[DagsterRun]] = defaultdict(list)
    batches = list(by_batch)
    for start in range(0, len(batches), 500):
        for run in instance.get_runs(filters=RunsFilter(tags={BATCH_TAG: batches[start : start + 500]})):
            runs_of[run.tags[BATCH_TAG]].append(run)  # newest first
    lease = dagster_lease_seconds(core)
    for batch, batch_jobs in by_batch.items():
        runs = runs_of.get(batch, [])
        if not runs:
            summary.waiting += len(batch_jobs)  # never launched: the lease runs out, the queue takes them
        elif not all(run.is_finished for run in runs):
            summary.renewed += jobs.renew_claims(core, batch_jobs, lease)
        else:
            summary.finished_runs += len(runs)
            for outcome in complete_batch(instance, core, batch_jobs, runs):
                jobs.tally_outcome(summary, outcome)
    return summary


@sensor(
    name="job_runs_sensor", minimum_interval_seconds=TICK_SECONDS, default_status=DefaultSensorStatus.RUNNING,
    description="Completes the jobs that queued_jobs_sensor launched: per item, succeeded when its partition "
    "was materialized, else failed or requeued with the error code the stage recorded. Renews the jobs' "
    "leases while their run is queued or running. Does nothing until queued_jobs_sensor claims jobs.",
)
def job_runs_sensor(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult:
    """Finished job runs -> jobs done / retried / failed; runs in progress -> leases renewed."""
    try:
        summary = complete_job_runs(context.instance, pipeline.pipeline())
    except OllamaPipelineError as exc:  # a settings or database problem: say so on the tick, try again later
        return SensorResult(skip_reason=SkipReason(f"jobs could not be read: {exc}"))
    if not summary.claims:
        return SensorResult(skip_reason=SkipReason("no jobs claimed by Dagster runs"))
    context.log.info(summary.render())
    return SensorResult()


# ---- ollama_refresh_schedule ----------------------------------------------------------------------


def refresh_tick(instance: DagsterInstance, core: Pipeline, *, tick: datetime | None = None,
                 max_runs: int = MAX_RUNS_PER_TICK) -> list[RunRequest] | SkipReason:
    """Range runs over the stale and retryable-failed items of every stage (upstream stages first)."""
    skip = _down(core, "nothing refreshed")
    if skip is not None:
        return skip
    found = [refresh_items(core, stage, limit=MAX_REFRESH_PER_STAGE) for stage in ordered_stages()]
    found = [items for items in found if items.media_ids]
    if not found:
        return SkipReason("nothing to refresh: no result of an older stage version or model, no retryable failure")
    ordered = register_partitions(instance, [media_key(i) for items in found for i in items.media_ids]).positions
    stamp = (tick or datetime.now()).strftime("%Y%m%dT%H%M")
    requests: list[RunRequest] = []
    for items in found:
        reason = f"stale={len(items.stale)},retryable_failed={len(items.retryable)}"
        for start, end in contiguous_ranges(ordered, [media_key(i) for i in items.media_ids]):
            requests.append(RunRequest(
                run_key=f"refresh-{items.job_type}-{start}-{end}-{stamp}", asset_selection=[AssetKey(items.job_type)],
                tags={**range_tags(start, end), JOB_TYPE_TAG: items.job_type, REFRESH_TAG: reason},
                run_config=stage_run_config()))
    return requests[:max_runs]


@schedule(
    name="ollama_refresh_schedule", cron_schedule=REFRESH_CRON, target=AssetSelection.assets(*stage_asset_keys),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Daily: re-runs, per stage, the items whose stored result came from another stage version or "
    "model and the items whose last attempt failed with a retryable error, as range runs. Skips when Ollama "
    "does not answer. Stopped by default.",
)
def ollama_refresh_schedule(context: ScheduleEvaluationContext,
                            pipeline: PipelineResource) -> list[RunRequest] | SkipReason:
    """Stale and retryable-failed items -> range runs per stage (or a skip reason)."""
    return refresh_tick(context.instance, pipeline.pipeline(), tick=context.scheduled_execution_time)
