"""The library's assets: `media` plus one asset per stage of the registry, all partitioned by media item.

Every asset is declared from data: `media` indexes the files (content hash, perceptual hash, size), and a
factory turns each registry `Stage` into an `AssetSpec` (key = job type, deps = media + upstream stages,
group, description, code version). All of them are executed by one subsettable multi-asset,
`ollama_library`, in one step per run over many partitions (single-run backfill policy):

- each item reports itself with one `AssetMaterialization(partition=...)` carrying its metadata (status,
  model, token counts); items that fail get none, and the step raises `dagster.Failure` at the end naming
  them, so Dagster marks exactly those partitions failed and "retry failed" re-runs only them;
- one step because Dagster skips a downstream asset step whose upstream step yielded only
  `AssetMaterialization` events (no `Output`); an `Output` would store a second event per partition and
  mark failed items materialized. Inside the step, stages run in dependency order and an item whose
  upstream failed in this run is not sent to the model (it counts as blocked).

The asset bodies call the core (`run_stage`, `index_media`); nothing here touches the DB at import.
"""

import hashlib
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Literal

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    BetaWarning,
    Config,
    DagsterEvent,
    DagsterLogManager,
    Failure,
    MetadataValue,
    multi_asset,
)
from pydantic import BaseModel, Field
from sqlalchemy import select

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.models import Media
from ollama_pipeline.core.errors import OllamaPipelineError, ValidationError
from ollama_pipeline.core.images import (
    check_media_type,
    dhash,
    file_sha256,
    load_media_image,
    media_kind,
    resolve_media_path,
)
from ollama_pipeline.core.runner import Pipeline, note_media_problem, run_stage
from ollama_pipeline.core.stages.base import Stage
from ollama_pipeline.defs.checks import check_specs_for, evaluate_checks
from ollama_pipeline.defs.events import EventBatcher
from ollama_pipeline.defs.partitions import media_partitions
from ollama_pipeline.defs.resources import PipelineResource

MEDIA = "media"
LIBRARY_OP = "ollama_library"
MEDIA_CODE_VERSION = "media-index-v1"
# The tag Dagster reads a materialization's data version from (dagster._core.definitions.data_version).
DATA_VERSION_TAG = "dagster/data_version"
FAILED_SAMPLE = 20  # failed items named in the Failure metadata
CHUNK = 256

Status = Literal["written", "unchanged", "skipped", "failed"]


class StageRunConfig(Config):
    """Run configuration of `ollama_library` (Launchpad: ops.ollama_library.config)."""

    force: bool = Field(default=False, description="Call the model even when an item's fingerprint is "
                        "unchanged, and re-read files whose size and mtime are unchanged.")
    concurrency: int | None = Field(default=None, ge=1, le=256,
                                    description="Model calls at once; default: pipeline.concurrency.")
    model: str | None = Field(default=None, min_length=1, max_length=255,
                              description="Use this model instead of the configured one for every selected "
                              "stage (set by queued_jobs_sensor from a job payload's `model`).")


# ---- the stage registry, read at definition time ---------------------------------------------------


def ordered_stages() -> list[Stage]:
    """The registry's stages, upstream before downstream (registry order breaks ties)."""
    from ollama_pipeline.core.stages import STAGES

    done: dict[str, Stage] = {}

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        if stage.job_type in done:
            return
        if stage.job_type in path:
            raise ValueError(f"stage dependency cycle: {' -> '.join(path + (stage.job_type,))}")
        for name in stage.upstream:
            visit(STAGES[name], path + (stage.job_type,))
        done[stage.job_type] = stage

    for stage in STAGES.values():
        visit(stage, ())
    return list(done.values())


def media_spec() -> AssetSpec:
    """The `media` asset: one partition per media row, its file checked and hashed."""
    return AssetSpec(
        MEDIA, group_name="library", code_version=MEDIA_CODE_VERSION, skippable=True,
        description="The media files of the library, one partition per `media.id`. Each file is read inside "
        "the media root and decoded; its content SHA-256 (the data version), 64-bit dHash, size and pixel "
        "size go to `ollama_media_index`. Files whose size and mtime are unchanged are not re-read.",
        metadata={"table": "ollama_media_index"})


def stage_spec(stage: Stage) -> AssetSpec:
    """The asset of one stage: key = job type, upstream = media and the stage's upstream stages."""
    writes = ", ".join(f"`{key}`" for key in stage.writes)
    tables = f" Also writes: {', '.join(stage.writes_tables)}." if stage.writes_tables else ""
    return AssetSpec(
        stage.job_type, deps=[MEDIA, *stage.external_inputs, *stage.upstream], group_name=stage.group,
        code_version=stage.code_version, skippable=True, kinds={"ollama"},
        description=f"{stage.title}: {stage.description}\n\nWrites `media_meta`: {writes} (plus "
        f"`ollama.model`, `ollama.version`, `ollama.last_run_at`).{tables} Model: ollama.{stage.model_kind}_model.",
        metadata={"job_type": stage.job_type, "writes": MetadataValue.json(list(stage.writes)),
                  "model_kind": stage.model_kind, "prompt_version": stage.prompt_version})


# ---- the media index (no Dagster) ----------------------------------------------------------------


class MediaIndexOutcome(BaseModel):
    """What happened to one media file: indexed, unchanged, skipped (size and mtime unchanged), failed."""

    media_id: int
    status: Status
    reason: str | None = None  # why a skipped file was not indexed (unsupported_media_type, file_missing, ...)
    content_sha256: str | None = None
    dhash: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    error: dict[str, Any] | None = None


def _index_file(pipeline: Pipeline, media: Any, known: dict[str, Any] | None, problem: dict[str, Any] | None,
                force: bool) -> tuple[MediaIndexOutcome, dict[str, Any] | None]:
    media_id, path = media.id, media.path
    try:
        try:
            check_media_type(media.type, path)
            file = resolve_media_path(pipeline.settings.media_root, path)
            if not file.is_file():
                raise ValidationError(f"media file {path!r} does not exist", code="validation.file_missing")
            stat = file.stat()
            if (not force and known and not problem and known["size_bytes"] == stat.st_size
                    and known["mtime_ns"] == stat.st_mtime_ns):
                return MediaIndexOutcome(media_id=media_id, status="skipped", content_sha256=known["content_sha256"],
                                         dhash=known["dhash"], size_bytes=known["size_bytes"], width=known["width"],
                                         height=known["height"]), None
            if media_kind(media.type, path) == "video":
                digest, size = file_sha256(file), stat.st_size
                image = load_media_image(file, media.type, f"media file {path!r}")
            else:
                data = file.read_bytes()
                digest, size = hashlib.sha256(data).hexdigest(), len(data)
                image = load_media_image(file, media.type, f"media file {path!r}", data=data)
        except OSError as exc:  # unreadable file (permissions, I/O): this item only
            raise ValidationError(f"media file {path!r} cannot be read: {type(exc).__name__}",
                                  code="validation.file_missing") from None
        row = {"media_id": media_id, "content_sha256": digest, "dhash": dhash(image),
               "size_bytes": size, "width": image.width, "height": image.height,
               "mtime_ns": stat.st_mtime_ns}
    except OllamaPipelineError as exc:
        reason = note_media_problem(pipeline, media, exc, problem)
        if reason is not None:  # unsupported, or a file problem reported once already: not failed again
            pipeline.logs.job_event("stage_skipped", media_id=media_id, job_type=MEDIA, reason=reason, code=exc.code)
            return MediaIndexOutcome(media_id=media_id, status="skipped", reason=reason, error=exc.to_dict()), None
        pipeline.logs.error(exc, media_id=media_id, job_type=MEDIA)
        return MediaIndexOutcome(media_id=media_id, status="failed", error=exc.to_dict()), None
    if problem:
        repository.clear_media_problem(pipeline.engine, media_id, lock_retries=pipeline.settings.database.lock_retries)
    same = known is not None and known["content_sha256"] == row["content_sha256"] and known["dhash"] == row["dhash"]
    outcome = MediaIndexOutcome(status="unchanged" if same else "written",
                                **{k: v for k, v in row.items() if k != "mtime_ns"})
    return outcome, row


def index_media(pipeline: Pipeline, media_ids: Iterable[int], *, force: bool = False,
                workers: int = 4) -> Iterator[MediaIndexOutcome]:
    """Check, decode and hash the files of media items; upsert `ollama_media_index` (one write per chunk)."""
    ids = list(dict.fromkeys(int(i) for i in media_ids))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="media-index") as pool:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            with pipeline.engine.connect() as conn:
                rows_by_id = {r.id: r for r in conn.execute(
                    select(Media.id, Media.path, Media.type, Media.hash).where(Media.id.in_(chunk)))}
            paths = {i: r.path for i, r in rows_by_id.items()}
            known = repository.media_index(pipeline.engine, chunk)
            problems = repository.stage_states(pipeline.engine, repository.MEDIA_STAGE, chunk)
            outcomes: list[MediaIndexOutcome] = []
            rows: list[dict[str, Any]] = []
            present = [i for i in chunk if i in paths]
            jobs = pool.map(_index_file, repeat(pipeline), [rows_by_id[i] for i in present],
                            [known.get(i) for i in present], [problems.get(i) for i in present], repeat(force))
            for outcome, row in jobs:
                outcomes.append(outcome)
                old = known.get(outcome.media_id) or {}
                if row is not None and any(old.get(k) != v for k, v in row.items()):
                    rows.append(row)  # new content, or only a new mtime (so the next run can skip it)
            repository.upsert_media_index(pipeline.engine, rows, retries=pipeline.settings.database.lock_retries)
            for media_id in chunk:
                if media_id not in paths:
                    error = ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
                    pipeline.logs.error(error, media_id=media_id, job_type=MEDIA)
                    yield MediaIndexOutcome(media_id=media_id, status="failed", error=error.to_dict())
            yield from outcomes


# ---- one run over many partitions ------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one asset in one run, with the failed items and progress logging every ~10%."""

    asset: str
    total: int
    log: DagsterLogManager
    counts: Counter[str] = field(default_factory=Counter)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)  # media id -> error
    started: float = field(default_factory=time.perf_counter)
    _next_report: int = 0

    def add(self, media_id: int, status: str, error: dict[str, Any] | None = None) -> None:
        self.counts[status] += 1
        if status in ("failed", "blocked"):
            self.failed[media_id] = error or {}
        done = sum(self.counts.values())
        if done >= self._next_report or done == self.total:
            self._next_report = done + max(1, math.ceil(self.total / 10))
            self.report(done)

    def report(self, done: int) -> None:
        rate = done / max(time.perf_counter() - self.started, 1e-6)
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        self.log.info(f"{self.asset}: {done}/{self.total} items ({counts}), {rate:.1f} items/s")


def _metadata(outcome: Any) -> dict[str, Any]:
    if outcome.status == "skipped":
        return {"status": "skipped", "model": outcome.model or "", "fingerprint": (outcome.fingerprint or "")[:12]}
    m = outcome.metrics
    return {"status": outcome.status, "model": outcome.model or "", "fingerprint": (outcome.fingerprint or "")[:12],
            "prompt_eval_count": m.prompt_eval_count, "eval_count": m.eval_count,
            "total_duration_ms": round(m.total_duration_ms, 1), "load_duration_ms": round(m.load_duration_ms, 1)}


def _skipped_event(asset: str, media_id: int, reason: str,
                   metadata: dict[str, Any]) -> AssetMaterialization | AssetObservation:
    """An item skipped with a reason: unsupported media is done (materialized, nothing to do); a file
    problem already reported is observed, so its partition keeps the failure of the run that found it."""
    metadata = {**metadata, "status": "skipped", "reason": reason}
    if reason == "unsupported_media_type":
        return AssetMaterialization(asset_key=asset, partition=str(media_id), metadata=metadata,
                                    tags={DATA_VERSION_TAG: "unsupported"} if asset == MEDIA else None)
    return AssetObservation(asset_key=asset, partition=str(media_id), metadata=metadata)


def _materialize_media(pipeline: Pipeline, media_ids: list[int], config: StageRunConfig,
                       tally: Tally, skipped: dict[int, str]) -> Iterator[AssetMaterialization | AssetObservation]:
    workers = config.concurrency or pipeline.settings.pipeline.concurrency
    for outcome in index_media(pipeline, media_ids, force=config.force, workers=workers):
        tally.add(outcome.media_id, outcome.status, outcome.error)
        if outcome.reason:
            skipped[outcome.media_id] = outcome.reason
            yield _skipped_event(MEDIA, outcome.media_id, outcome.reason,
                                 {"code": (outcome.error or {}).get("code", "")})
        elif outcome.status != "failed":
            yield AssetMaterialization(
                asset_key=MEDIA, partition=str(outcome.media_id),
                tags={DATA_VERSION_TAG: outcome.content_sha256 or ""},
                metadata={"status": outcome.status, "content_sha256": (outcome.content_sha256 or "")[:12],
                          "dhash": outcome.dhash or "", "size_bytes": outcome.size_bytes or 0,
                          "width": outcome.width or 0, "height": outcome.height or 0})


def _materialize_stage(context: AssetExecutionContext, pipeline: Pipeline, stage: Stage, media_ids: list[int],
                       blocked: dict[int, str], config: StageRunConfig, tally: Tally,
                       skipped: dict[int, str]) -> Iterator[AssetMaterialization | AssetObservation]:
    for media_id in media_ids:
        if media_id in blocked:
            tally.add(media_id, "blocked", {"channel": "blocked", "code": f"upstream_failed.{blocked[media_id]}",
                                            "message": f"{blocked[media_id]} failed for this item in this run"})
        elif media_id in skipped:  # its file cannot be used (reported by `media`): no stage runs for it
            tally.add(media_id, "skipped")
            yield _skipped_event(stage.job_type, media_id, skipped[media_id], {"upstream": MEDIA})
    runnable = [i for i in media_ids if i not in blocked and i not in skipped]
    for outcome in run_stage(pipeline, stage, runnable, force=config.force, concurrency=config.concurrency,
                             run_id=context.run_id, model=config.model):
        tally.add(outcome.media_id, outcome.status, outcome.error)
        if outcome.reason:
            yield _skipped_event(stage.job_type, outcome.media_id, outcome.reason,
                                 {"code": (outcome.error or {}).get("code", "")})
        elif outcome.status != "failed":
            yield AssetMaterialization(asset_key=stage.job_type, partition=str(outcome.media_id),
                                       metadata=_metadata(outcome))


def failure_for(tallies: list[Tally]) -> Failure | None:
    """A Failure naming, per asset, how many items failed with which channel/code; None if none failed."""
    failing = [t for t in tallies if t.failed]
    if not failing:
        return None
    parts = []
    by_code: dict[str, dict[str, int]] = {}
    sample: list[dict[str, Any]] = []
    for tally in failing:
        codes = Counter(f"{e.get('channel', '?')}/{e.get('code', '?')}" for e in tally.failed.values())
        by_code[tally.asset] = dict(codes.most_common())
        parts.append(f"{tally.asset}: {len(tally.failed)} of {tally.total} failed ("
                     + ", ".join(f"{code} x{n}" for code, n in codes.most_common()) + ")")
        for media_id, error in list(tally.failed.items())[:FAILED_SAMPLE - len(sample)]:
            sample.append({"asset": tally.asset, "media_id": media_id, "channel": error.get("channel"),
                           "code": error.get("code"), "message": str(error.get("message", ""))[:200]})
    failed_ids = sorted({i for t in failing for i in t.failed})
    return Failure(
        description="; ".join(parts) + ". Every other item of the run was materialized; once the cause is "
        "fixed, re-run only the failed partitions (backfill: retry failed).",
        metadata={"failed_items": len(failed_ids), "failed_by_asset_and_code": MetadataValue.json(by_code),
                  "failed_media_ids": MetadataValue.text(", ".join(map(str, failed_ids[:200]))),
                  "first_failures": MetadataValue.json(sample)},
        allow_retries=False)


def _batched(batcher: EventBatcher, event: AssetMaterialization | AssetObservation) -> Iterable[Any]:
    return batcher.add(event) if isinstance(event, AssetMaterialization) else (event,)


def materialize_library(context: AssetExecutionContext, pipeline: Pipeline, config: StageRunConfig,
                        stages: list[Stage]) -> Iterator[AssetMaterialization | AssetCheckResult | DagsterEvent]:
    """The body of `ollama_library`: selected assets in dependency order, then raise for failed items."""
    selected = context.selected_asset_keys
    checks = set(context.selected_asset_check_keys)
    tallies: list[Tally] = []
    failed: dict[str, set[int]] = {}
    media_ids = [int(k) for k in context.partition_keys] if selected else []
    batcher = EventBatcher(context)
    skipped: dict[int, str] = {}  # media id -> why its file cannot be used (unsupported, reported problem)
    if AssetKey(MEDIA) in selected:
        tally = Tally(MEDIA, len(media_ids), context.log)
        tallies.append(tally)
        for event in _materialize_media(pipeline, media_ids, config, tally, skipped):
            yield from _batched(batcher, event)
        yield from batcher.flush()
        failed[MEDIA] = set(tally.failed)
    for stage in stages:
        if AssetKey(stage.job_type) in selected:
            # An item whose media or upstream stage failed in this run is not sent to the model.
            blocked: dict[int, str] = {}
            for upstream in (MEDIA, *stage.upstream):
                blocked.update({i: upstream for i in failed.get(upstream, ()) if i not in blocked})
            tally = Tally(stage.job_type, len(media_ids), context.log)
            tallies.append(tally)
            for event in _materialize_stage(context, pipeline, stage, media_ids, blocked, config, tally, skipped):
                yield from _batched(batcher, event)
            yield from batcher.flush()
            failed[stage.job_type] = set(tally.failed)
        yield from evaluate_checks(pipeline.engine, stage, checks)
    failure = failure_for(tallies)
    if failure is not None:
        raise failure


def build_library_asset(stages: list[Stage] | None = None) -> AssetsDefinition:
    """The multi-asset that materializes `media` and every stage asset (any subset) for many partitions."""
    stages = ordered_stages() if stages is None else stages
    specs = [media_spec(), *(stage_spec(stage) for stage in stages)]
    check_specs = [spec for stage in stages for spec in check_specs_for(stage)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # BackfillPolicy is marked beta; its behaviour is measured
        decorator = multi_asset(
            name=LIBRARY_OP, specs=specs, check_specs=check_specs, partitions_def=media_partitions,
            backfill_policy=BackfillPolicy.single_run(), can_subset=True,
            description="Indexes media files and runs the Ollama stages over many media items in one step.")

    def ollama_library(context: AssetExecutionContext, config: StageRunConfig,
                       pipeline: PipelineResource) -> Iterator[AssetMaterialization | AssetCheckResult | DagsterEvent]:
        yield from materialize_library(context, pipeline.pipeline(), config, stages)

    return decorator(ollama_library)


ollama_library = build_library_asset()
ollama_stage_assets: list[AssetSpec] = [spec for spec in ollama_library.specs if spec.key != AssetKey(MEDIA)]
# Gallery tables that stages read but the pipeline does not produce: external assets, for lineage only.
EXTERNAL_INPUTS: dict[str, str] = {
    "scan_results": "The gallery's NSFW scanner results (`scan_results`: nsfw_score, flags), written by the "
    "gallery application; read by the policy stage. Not materialized by this project.",
}
external_assets: list[AssetSpec] = [
    AssetSpec(name, group_name="library", description=text, metadata={"table": name})
    for name, text in EXTERNAL_INPUTS.items()
    if any(name in stage.external_inputs for stage in ordered_stages())
]
all_assets: list[AssetsDefinition | AssetSpec] = [ollama_library, *external_assets]
