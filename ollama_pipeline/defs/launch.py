"""In-process Dagster runs over many media items, for the CLI (`ollama-pipeline run`, `make demo`).

`materialize_stages` does what a single-run backfill does: it registers missing `media` partitions on the
instance, then executes ONE run per contiguous range of the wanted partition keys (normally exactly one)
with the range run tags, so the runs show up in the Dagster UI like any other and exactly the given
partitions are materialized. Counts per asset come back from the runs' materialization events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from dagster import AssetKey, DagsterInstance, Definitions, in_process_executor
from pydantic import BaseModel, Field
from sqlalchemy import select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.models import Media
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.defs.assets import LIBRARY_OP, MEDIA, all_assets, ordered_stages
from ollama_pipeline.defs.partitions import contiguous_ranges, media_key, range_tags, register_partitions
from ollama_pipeline.defs.resources import PipelineResource

STATUSES = ("written", "unchanged", "skipped", "failed")


class RunSummary(BaseModel):
    """One Dagster run over one range of partitions."""

    run_id: str
    range_start: str
    range_end: str
    partitions: int
    success: bool
    failure: str | None = None


class MaterializeSummary(BaseModel):
    """What materialize_stages did: runs launched and, per asset, items by status."""

    assets: list[str]
    partitions: int
    runs: list[RunSummary] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)  # asset -> status -> items

    @property
    def ok(self) -> bool:
        return all(run.success for run in self.runs)

    @property
    def run_ids(self) -> list[str]:
        return [run.run_id for run in self.runs]

    def render(self) -> str:
        """A few lines for a terminal."""
        lines = [f"{self.partitions} media item(s), {len(self.runs)} Dagster run(s): "
                 + ", ".join(f"{r.run_id[:8]} {'ok' if r.success else 'FAILED'}" for r in self.runs)]
        for asset, counts in self.counts.items():
            lines.append(f"  {asset:<28} " + "  ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES))
        lines.extend(f"  failure: {r.failure}" for r in self.runs if r.failure)
        return "\n".join(lines)


def resolve_asset_names(stages: Iterable[str] | None, *, include_media: bool = True) -> list[str]:
    """Asset names for stage names (job types, or without the `ollama_` prefix); None means all stages."""
    known = [stage.job_type for stage in ordered_stages()]
    if stages is None:
        chosen = known
    else:
        chosen = []
        for name in stages:
            job_type = name if name in known or name == MEDIA else f"ollama_{name}"
            if job_type not in known and job_type != MEDIA:
                raise ValidationError(f"unknown stage {name!r}; known: {', '.join(known)}",
                                      code="validation.job_type")
            chosen.append(job_type)
    wanted = set(chosen) | ({MEDIA} if include_media else set())
    return [name for name in (MEDIA, *known) if name in wanted]


def _resource(settings: Settings | str | Path | None) -> PipelineResource:
    if isinstance(settings, Settings):
        return PipelineResource.for_settings(settings)
    return PipelineResource(config_path=str(settings) if settings is not None else None)


def materialize_stages(settings: Settings | str | Path | None, media_ids: Iterable[int] | None,
                       stages: Sequence[str] | None, instance: DagsterInstance, *, force: bool = False,
                       concurrency: int | None = None, include_media: bool = True,
                       log_level: str = "INFO") -> MaterializeSummary:
    """Materialize stage assets for media items in one in-process run per contiguous partition range.

    settings: loaded Settings, or a config path (None: the default lookup). media_ids None means every
    media row. stages None means all registry stages; `media` is included unless include_media=False.
    Failed items do not raise: they are counted, and their runs are marked failed.
    """
    resource = _resource(settings)
    pipeline = resource.pipeline()
    if media_ids is None:
        with pipeline.engine.connect() as conn:
            ids = list(conn.execute(select(Media.id).order_by(Media.id)).scalars())
    else:
        ids = sorted({int(i) for i in media_ids})
    names = resolve_asset_names(stages, include_media=include_media)
    summary = MaterializeSummary(assets=names, partitions=len(ids))
    if not ids:
        return summary
    keys = [media_key(i) for i in ids]
    position = register_partitions(instance, keys).positions
    defs = Definitions(assets=all_assets, resources={"pipeline": resource}, executor=in_process_executor)
    job = defs.resolve_implicit_global_asset_job_def()
    selection = [AssetKey(name) for name in names]
    run_config = {"ops": {LIBRARY_OP: {"config": {"force": force, "concurrency": concurrency}}},
                  "loggers": {"console": {"config": {"log_level": log_level}}}}
    counts: dict[str, Counter[str]] = {name: Counter() for name in names}
    for start, end in contiguous_ranges(position, keys):
        size = position[end] - position[start] + 1
        result = job.execute_in_process(instance=instance, asset_selection=selection, run_config=run_config,
                                        tags=range_tags(start, end), raise_on_error=False)
        done: Counter[str] = Counter()
        for materialization in result.asset_materializations_for_node(LIBRARY_OP):
            asset = materialization.asset_key.to_user_string()
            status = materialization.metadata.get("status")
            counts[asset][str(status.value) if status is not None else "written"] += 1
            done[asset] += 1
        for observation in result.asset_observations_for_node(LIBRARY_OP):  # file problems reported before
            counts[observation.asset_key.to_user_string()]["skipped"] += 1
            done[observation.asset_key.to_user_string()] += 1
        for name in names:
            counts[name]["failed"] += size - done[name]
        failure = None
        if not result.success:
            step_failure = result.failure_data_for_node(LIBRARY_OP)
            user = step_failure.user_failure_data if step_failure else None
            failure = (user.description if user and user.description
                       else step_failure.error.message.strip() if step_failure and step_failure.error
                       else "run failed")
        summary.runs.append(RunSummary(run_id=result.run_id, range_start=start, range_end=end, partitions=size,
                                       success=result.success, failure=failure))
    summary.counts = {name: {s: counts[name].get(s, 0) for s in STATUSES} for name in names}
    return summary


class DownstreamSummary(BaseModel):
    """The Dagster run that materialized ollama_export and ollama_report."""

    run_id: str
    success: bool
    metadata: dict[str, dict[str, object]] = Field(default_factory=dict)  # asset -> a few values
    failure: str | None = None


def materialize_downstream(settings: Settings | str | Path | None, instance: DagsterInstance, *,
                           log_level: str = "WARNING") -> DownstreamSummary:
    """Materialize `ollama_export` and `ollama_report` in one in-process run on `instance` (what
    `dagster asset materialize --select ollama_export,ollama_report` does), so the UI shows them."""
    from ollama_pipeline.defs.downstream import downstream_assets

    resource = _resource(settings)
    defs = Definitions(assets=[*all_assets, *downstream_assets], resources={"pipeline": resource},
                       executor=in_process_executor)
    job = defs.resolve_implicit_global_asset_job_def()
    keys = [key for assets in downstream_assets for key in assets.keys]
    result = job.execute_in_process(instance=instance, asset_selection=keys, raise_on_error=False,
                                    run_config={"loggers": {"console": {"config": {"log_level": log_level}}}})
    metadata: dict[str, dict[str, object]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {
            name: getattr(value, "value", value) for name, value in materialization.metadata.items()
            if name in ("path", "items", "bytes", "sha256", "report_md")}
    failure = None
    if not result.success:
        failure = "; ".join(e.message.strip() for e in result.all_events if e.is_failure and e.message)[:500]
    return DownstreamSummary(run_id=result.run_id, success=result.success, metadata=metadata, failure=failure)
