"""Launch stage runs through Dagster from the command line (`ollama-pipeline run`, `make demo`).

Uses the Dagster instance of $DAGSTER_HOME (default `./.dagster_home`, made from the project's
dagster.yaml), so every run shows up in the Dagster UI like a backfill launched there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ollama_pipeline.core.config import Settings


def parse_stage_list(text: str | None) -> list[str] | None:
    """'all' (or not given) → None (every stage); otherwise names separated by commas (job types or short
    names). An empty value is an error, never "every stage"."""
    if text is None or text.strip() == "all":
        return None
    from ollama_pipeline.core.selection import parse_job_types

    return parse_job_types(text, also=("media",))


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME (set to ./.dagster_home when unset), created, holding the project's dagster.yaml."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    project_yaml = Path(__file__).resolve().parents[2] / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copyfile(project_yaml, home / "dagster.yaml")
    return home


def dagster_instance():  # -> DagsterInstance (import kept lazy: Dagster is slow to import)
    """The instance of $DAGSTER_HOME; sets DAGSTER_HOME to ./.dagster_home when unset."""
    from dagster import DagsterInstance

    ensure_dagster_home()
    return DagsterInstance.get()


def reap_orphans(pipeline) -> list[str]:
    """Mark runs whose heartbeat stopped as failed, in the pipeline's table and in Dagster; one line each.
    Dagster is imported only when there is such a run."""
    from ollama_pipeline.core.queue.heartbeats import reap_stale

    stale = reap_stale(pipeline)
    if stale:
        from ollama_pipeline.defs.orphans import fail_dagster_runs

        fail_dagster_runs(dagster_instance(), pipeline, stale)
    return [f"run {orphan.run_id} marked failed: {orphan.reason}" for orphan in stale]


def run_stages_through_dagster(settings: Settings, stages: list[str] | None, *, media_ids: list[int] | None = None,
                               force: bool = False, config_path: str | None = None):
    """One Dagster run over all the given items (per contiguous partition range) for the chosen stages."""
    from ollama_pipeline.defs.launch import materialize_stages

    instance = dagster_instance()
    return materialize_stages(settings, media_ids, stages, instance, force=force)
