"""The job queue in Dagster: `queued_jobs_sensor` turns queued jobs into runs, and the runs process them;
`ollama_refresh_schedule` re-runs stale and retryable-failed items.

One way to work the queue (the `process` command runs the very same code path without a Dagster daemon),
over one table: the gallery's own job queue where it has one (LocalSupervisor's `jobs`: its types, statuses,
`payload_json`, `not_before`, heartbeat and worker fields), the pipeline's `ollama_jobs` otherwise; the
queue's store decides, nothing here differs:

- **Claims.** A tick marks runs with a stopped heartbeat failed, asks Ollama for its health (down: skip,
  claim nothing), then claims due jobs with the queue's `claim_jobs` (PostgreSQL `FOR UPDATE SKIP LOCKED`,
  SQLite `BEGIN IMMEDIATE`; a job whose upstream stage still has a queued or running job for the same item
  is not claimable), registers the partitions (blocks) of their items and groups them by (job type, force,
  model).
- **Runs.** Each group becomes one run per contiguous range of its partitions, claimed under a worker name
  of its own, `dagster:<batch>`, passed to the run as config `batch` and tag `ollama_pipeline/batch`. The run
  processes exactly those jobs through `process_claimed` (the worker's `_run_claimed`: stage, persist, and
  the job's end state written with its fence), renewing their leases while it works. Job priority becomes
  the run queue's `dagster/priority`; upstream stages are requested first. At most MAX_RUNS_PER_TICK runs
  per tick; the jobs of further ranges go back to the queue unspent.
- **Waiting runs.** While a run waits in Dagster's run queue its jobs' leases are renewed by the tick; when a
  run ended without processing its jobs (it failed to start, or was canceled), the tick ends their leases
  so the queue hands them out again. No job's end state is reconstructed from run outcomes.

This module holds the Dagster shell only; the queue, staleness and run logic live in the core.
"""

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from dagster import (
    AssetKey,
    AssetSelection,
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

from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.refresh import refresh_items
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.defs.assets import LIBRARY_OP, ordered_stages
from ollama_pipeline.defs.orphans import BATCH_TAG as ORPHAN_BATCH_TAG
from ollama_pipeline.defs.orphans import fail_orphan_runs
from ollama_pipeline.defs.partitions import (
    KeyOrder,
    as_positions,
    contiguous_ranges,
    range_tags,
    register_partitions,
)
from ollama_pipeline.defs.resources import PipelineResource

JOB_IDS_TAG = "ollama_pipeline/job_ids"
JOB_TYPE_TAG = "ollama_pipeline/job_type"
JOB_COUNT_TAG = "ollama_pipeline/job_count"
BATCH_TAG = ORPHAN_BATCH_TAG
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


def stage_run_config(*, force: bool = False, model: str | None = None, batch: str | None = None,
                     media_ids: list[int | str] | None = None) -> dict[str, Any]:
    """Run config of `ollama_library` for a stage run (model only when a job overrides it); text and UUID
    ids go as `media_keys` (a Dagster config field has one type)."""
    listed: dict[str, Any] = {}
    if media_ids is not None:
        integer = all(isinstance(i, int) for i in media_ids)
        listed = {"media_ids": media_ids} if integer else {"media_keys": [str(i) for i in media_ids]}
    config: dict[str, Any] = {"force": force, **({"model": model} if model else {}),
                              **({"batch": batch} if batch else {}), **listed}
    return {"ops": {LIBRARY_OP: {"config": config}}}


def plan_runs(claimed: Iterable[jobs.Job], ordered_keys: KeyOrder, partitioning: Partitioning) -> list[PlannedRun]:
    """Group jobs by (type, force, model) and split each group into contiguous partition ranges, best first."""
    groups: dict[tuple[str, bool, str | None], dict[str, list[jobs.Job]]] = defaultdict(lambda: defaultdict(list))
    for job in claimed:
        options = job.options
        groups[(job.job_type, options.force, options.model)][partitioning.key_of(job.media_id)].append(job)
    position = as_positions(ordered_keys)
    planned: list[PlannedRun] = []
    for (job_type, force, model), by_key in groups.items():
        for start, end in contiguous_ranges(ordered_keys, by_key):
            keys = sorted((k for k in by_key if position[start] <= position[k] <= position[end]),
                          key=position.__getitem__)
            planned.append(PlannedRun(job_type=job_type, start=start, end=end, force=force, model=model,
                                      claims=[job for key in keys for job in by_key[key]]))
    return sorted(planned, key=lambda run: run.rank)


def run_request(run: PlannedRun) -> RunRequest:
    """The RunRequest of a planned run: the stage's asset over start..end, job ids and batch in tags."""
    tags = {**range_tags(run.start, run.end), JOB_TYPE_TAG: run.job_type, BATCH_TAG: run.batch,
            JOB_IDS_TAG: job_ids_tag(run.job_ids), JOB_COUNT_TAG: str(len(run.claims)),
            **({PRIORITY_TAG: str(run.priority)} if run.priority else {})}
    return RunRequest(run_key=run.batch, asset_selection=[AssetKey(run.job_type)], tags=tags,
                      run_config=stage_run_config(force=run.force, model=run.model, batch=run.batch))


def dagster_lease_seconds(core: Pipeline) -> float:
    """The lease of a Dagster claim: the queue's lease, but never shorter than four ticks (the tick renews
    it while the run waits in Dagster's run queue; the run's own LeaseKeeper once it works)."""
    return float(max(core.settings.pipeline.queue.lease_seconds, 4 * TICK_SECONDS))


class WaitingSummary(BaseModel):
    """What a tick did for jobs whose run has not processed them yet."""

    renewed: int = 0
    expired: int = 0


def tend_waiting_runs(instance: DagsterInstance, core: Pipeline) -> WaitingSummary:
    """Renew the leases of jobs whose run waits in Dagster's run queue (or is starting); end the leases of
    jobs whose run ended without taking them (failed to start, canceled), so the queue hands them out again.
    A run that works renews its own leases; a job's end state is only ever written by the run."""
    summary = WaitingSummary()
    by_batch: dict[str, list[jobs.Job]] = defaultdict(list)
    for job in jobs.claimed_by(core, WORKER_PREFIX):
        if job.worker and not job.worker.startswith(f"{WORKER_PREFIX}tick-"):
            by_batch[job.worker].append(job)
    batches = list(by_batch)
    runs: dict[str, DagsterRun] = {}
    for start in range(0, len(batches), 500):
        for run in instance.get_runs(filters=RunsFilter(tags={BATCH_TAG: batches[start : start + 500]})):
            runs.setdefault(run.tags[BATCH_TAG], run)  # newest first
    waiting = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING}
    lease = dagster_lease_seconds(core)
    for batch, claimed in by_batch.items():
        run = runs.get(batch)
        if run is None:
            continue  # requested this tick, or never launched: its lease runs out and the queue takes them
        if run.status in waiting:
            summary.renewed += jobs.renew_claims(core, claimed, lease)
        elif run.is_finished:
            summary.expired += jobs.expire_claims(core, batch)
    return summary


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
    """One tick: killed runs marked failed, health check, claim due jobs, register partitions, one
    RunRequest per batch."""
    fail_orphan_runs(instance, core)
    tend_waiting_runs(instance, core)
    skip = _down(core, "no job was claimed, queued jobs stay queued")
    if skip is not None:
        return SensorResult(skip_reason=skip)
    tick_worker = f"{WORKER_PREFIX}tick-{uuid.uuid4().hex[:12]}"
    claimed = _with_valid_payloads(core, jobs.claim_jobs(core, tick_worker, max_jobs, stage_job_types))
    if not claimed:
        return SensorResult(skip_reason=SkipReason("no queued jobs are due"))
    try:
        partitioning = Partitioning(size=core.settings.pipeline.partition_size)
        ordered = register_partitions(instance, partitioning.keys_of(job.media_id for job in claimed)).positions
        planned = plan_runs(claimed, ordered, partitioning)
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
    minimum_interval_seconds=TICK_SECONDS, default_status=DefaultSensorStatus.RUNNING,
    description="Works the job queue (the web UI's Re-run, `enqueue`, `enqueue_ollama`): claims due jobs "
    "(after an Ollama health check) and launches one run per job type and contiguous range of their "
    f"partitions; each run processes its jobs and records their end states. Job ids in the run tags "
    f"(`{JOB_IDS_TAG}`, `{BATCH_TAG}`). Running by default.",
)
def queued_jobs_sensor(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult:
    """Queued jobs -> claimed -> batched range runs (or a skip reason)."""
    result = queued_jobs_tick(context.instance, pipeline.pipeline())
    for request in result.run_requests or []:
        context.log.info(f"{request.tags[JOB_TYPE_TAG]}: {request.tags[JOB_COUNT_TAG]} job(s) over partitions "
                         f"{request.tags['dagster/asset_partition_range_start']}.."
                         f"{request.tags['dagster/asset_partition_range_end']} ({request.tags[BATCH_TAG]})")
    return result


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
    partitioning = Partitioning(size=core.settings.pipeline.partition_size)
    ordered = register_partitions(instance, partitioning.keys_of(
        i for items in found for i in items.media_ids)).positions
    position = as_positions(ordered)
    stamp = (tick or datetime.now()).strftime("%Y%m%dT%H%M")
    requests: list[RunRequest] = []
    for items in found:
        reason = f"stale={len(items.stale)},retryable_failed={len(items.retryable)}"
        groups = partitioning.group(items.media_ids)
        for start, end in contiguous_ranges(ordered, groups):
            ids = [i for key, members in groups.items() if position[start] <= position[key] <= position[end]
                   for i in members]
            requests.append(RunRequest(
                run_key=f"refresh-{items.job_type}-{start}-{end}-{stamp}", asset_selection=[AssetKey(items.job_type)],
                tags={**range_tags(start, end), JOB_TYPE_TAG: items.job_type, REFRESH_TAG: reason},
                run_config=stage_run_config(media_ids=ids)))
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
