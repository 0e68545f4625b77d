"""In-process Dagster runs over many media items, for the CLI (`ollama-pipeline run`, `make demo`).

`materialize_stages` does what a single-run backfill does: it registers the missing partitions (blocks of
items) of the wanted items on the instance, then executes ONE run per contiguous range of those partitions
(normally exactly one) with the range run tags, so the runs show up in the Dagster UI like any other.
Given media ids, the runs touch only those items of their partitions. Item counts per asset come back from
the run's own tally (the run executes in this process).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from dagster import AssetKey, DagsterInstance, Definitions, in_process_executor
from pydantic import BaseModel, Field
from sqlalchemy import select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.errors import NetworkError, ValidationError
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.defs.assets import LIBRARY_OP, MEDIA, all_assets, ordered_stages
from ollama_pipeline.defs.orphans import fail_orphan_runs
from ollama_pipeline.defs.partitions import contiguous_ranges, range_tags, register_partitions
from ollama_pipeline.defs.resources import PipelineResource

STATUSES = ("written", "unchanged", "skipped", "failed", "untouched")


class RunSummary(BaseModel):
    """One Dagster run over one range of partitions."""

    run_id: str
    range_start: str
    range_end: str
    partitions: int
    success: bool
    failure: str | None = None
    stopped: str | None = Field(default=None, description="why the run stopped early (circuit breaker)")


class MaterializeSummary(BaseModel):
    """What materialize_stages did: runs launched and, per asset, items by status."""

    assets: list[str]
    items: int
    partitions: int = 0
    runs: list[RunSummary] = Field(default_factory=list)
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)  # asset -> status -> items
    reaped: list[str] = Field(default_factory=list, description="killed runs found and marked failed first")
    failed_codes: dict[str, dict[str, int]] = Field(default_factory=dict)  # asset -> channel/code -> items

    @property
    def all_items_ok(self) -> bool:
        """No item failed in these runs (the CLI's exit code; a partition may be materialized anyway)."""
        return self.ok and not any(c.get("failed", 0) for c in self.counts.values())

    @property
    def ok(self) -> bool:
        return all(run.success and not run.stopped for run in self.runs)

    @property
    def run_ids(self) -> list[str]:
        return [run.run_id for run in self.runs]

    def render(self) -> str:
        """A few lines for a terminal."""
        lines = [*self.reaped, f"{self.items} media item(s), {len(self.runs)} Dagster run(s) over "
                 f"{self.partitions} partition(s): "
                 + ", ".join(f"{r.run_id[:8]} {'STOPPED' if r.stopped else 'ok' if r.success else 'FAILED'}"
                             for r in self.runs)]
        for asset, counts in self.counts.items():
            lines.append(f"  {asset:<28} " + "  ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES))
        lines.extend(f"  failure: {r.failure}" for r in self.runs if r.failure)
        lines.extend(f"  stopped: {r.stopped}" for r in self.runs if r.stopped)
        for asset, codes in self.failed_codes.items():
            lines.append(f"  failed items of {asset}: " + ", ".join(f"{c} x{n}" for c, n in codes.items()))
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


def materialize_stages(settings: Settings | str | Path | None, media_ids: Iterable[MediaId] | None,
                       stages: Sequence[str] | None, instance: DagsterInstance, *, force: bool = False,
                       concurrency: int | None = None, include_media: bool = True,
                       log_level: str = "INFO") -> MaterializeSummary:
    """Materialize stage assets for media items in one in-process run per contiguous range of partitions.

    settings: loaded Settings, or a config path (None: the default lookup). media_ids None means every
    media row (then the runs cover whole partitions); given ids, the runs touch only those items.
    stages None means all registry stages; `media` is included unless include_media=False. Runs whose
    heartbeat stopped are marked failed first; Ollama must answer its health check. Failed items do not
    raise: they are counted, and their runs are marked failed.
    """
    resource = _resource(settings)
    pipeline = resource.pipeline()
    reaped = [f"run {o.run_id} marked failed: {o.reason}" for o in fail_orphan_runs(instance, pipeline)]
    health = pipeline.client.health()
    if not health.ok:
        raise NetworkError(f"Ollama at {health.base_url} does not answer ({health.error_code}): nothing was "
                           "started. Start Ollama (or the emulator) or fix ollama.base_url, then run again.",
                           code="network.unavailable")
    partitioning = Partitioning(size=pipeline.settings.pipeline.partition_size)
    gallery = require_gallery(pipeline.engine)
    if media_ids is None:
        media_id = gallery["media"].c("id")
        with pipeline.engine.connect() as conn:
            ids: list[MediaId] = list(conn.execute(select(media_id).order_by(media_id)).scalars())
    elif gallery.integer_ids:
        ids = sorted({int(i) for i in media_ids})
    else:
        ids = sorted({str(i) for i in media_ids})
    names = resolve_asset_names(stages, include_media=include_media)
    summary = MaterializeSummary(assets=names, items=len(ids), reaped=reaped)
    if not ids:
        return summary
    keys = partitioning.keys_of(ids)
    summary.partitions = len(keys)
    position = register_partitions(instance, keys).positions
    defs = Definitions(assets=all_assets, resources={"pipeline": resource}, executor=in_process_executor)
    job = defs.resolve_implicit_global_asset_job_def()
    selection = [AssetKey(name) for name in names]
    config: dict[str, object] = {"force": force, "concurrency": concurrency}
    if media_ids is not None:  # a Dagster config field has one type: text and UUID ids go as media_keys
        config["media_ids" if gallery.integer_ids else "media_keys"] = ids
    run_config = {"ops": {LIBRARY_OP: {"config": config}},
                  "loggers": {"console": {"config": {"log_level": log_level}}}}
    counts: dict[str, Counter[str]] = {name: Counter() for name in names}
    for start, end in contiguous_ranges(position, keys):
        size = position[end] - position[start] + 1
        result = job.execute_in_process(instance=instance, asset_selection=selection, run_config=run_config,
                                        tags=range_tags(start, end), raise_on_error=False)
        for asset, found in pipeline.run_counts(result.run_id).items():
            counts[asset].update(found)
        for asset, found in pipeline.run_counts(f"codes:{result.run_id}").items():
            summary.failed_codes.setdefault(asset, Counter()).update(found)
        stopped = pipeline.breaker_message(result.run_id)
        failure = None
        if not result.success:
            step_failure = result.failure_data_for_node(LIBRARY_OP)
            user = step_failure.user_failure_data if step_failure else None
            failure = (user.description if user and user.description
                       else step_failure.error.message.strip() if step_failure and step_failure.error
                       else "run failed")
        summary.runs.append(RunSummary(run_id=result.run_id, range_start=start, range_end=end, partitions=size,
                                       success=result.success, failure=failure, stopped=stopped))
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
