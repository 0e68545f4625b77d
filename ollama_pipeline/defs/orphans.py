"""Killed runs: a run whose heartbeat stopped (core.queue.heartbeats) is marked failed in Dagster too.

With the default run launcher, Dagster's run monitoring cannot tell that the process of a run died, and a
run executed in the CLI's own process is not watched at all: after `kill -9` it stays STARTED for ever and,
under `max_concurrent_runs: 1`, the queued run coordinator never launches another run. The next run, sensor
tick or `ollama-pipeline jobs` calls `fail_orphan_runs`, which reaps stale heartbeats and reports each such
run as failed (DagsterInstance.report_run_failed) with the reason.
"""

from __future__ import annotations

from dagster import DagsterInstance

from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.queue.heartbeats import StaleRun, reap_stale
from ollama_pipeline.core.runner import Pipeline

BATCH_TAG = "ollama_pipeline/batch"  # the queue batch a run processes (defs.job_sensors)


def fail_orphan_runs(instance: DagsterInstance, core: Pipeline) -> list[StaleRun]:
    """Reap stale heartbeats; fail the Dagster runs of those ids that are not finished. Returns them."""
    return fail_dagster_runs(instance, core, reap_stale(core))


def fail_dagster_runs(instance: DagsterInstance, core: Pipeline, stale: list[StaleRun]) -> list[StaleRun]:
    """Report the Dagster runs of reaped heartbeats as failed (those that exist and are not finished), and
    end the leases of the queued jobs such a run had claimed, so the queue hands them out again."""
    for orphan in stale:
        run = instance.get_run_by_id(orphan.run_id)
        if run is None:
            continue
        if not run.is_finished:
            instance.report_run_failed(run, message=orphan.reason)
        batch = run.tags.get(BATCH_TAG)
        if batch:
            jobs.expire_claims(core, batch)
    return stale
