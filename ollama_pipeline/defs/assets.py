"""The library's assets: `media` plus one asset per stage of the registry, partitioned by blocks of items.

Every asset is declared from data: `media` indexes the files (content hash, perceptual hash, size), and a
factory turns each registry `Stage` into an `AssetSpec` (key = job type, deps = media + upstream stages,
description, code version, the stage's family as a tag). Every asset of the code location is in ONE
asset group, `ASSET_GROUP`: Dagster's lineage view draws groups as boxes that start collapsed, and only
when it shows more than one group (dagster-ui `asset-graph/layout.ts`, `groupRendering: 'if-varied'`), so
with one group it opens with every asset drawn. All of them are executed by one subsettable multi-asset,
`ollama_library`, in one step per run over a range of partitions (single-run backfill policy). A partition
is a block of media items (core.partitioning); per-item state stays in `ollama_stage_results`.

- Each partition whose items all ended correctly (done, or failed for good with a recorded reason) gets one
  `AssetMaterialization(partition=...)` carrying its counts (written, unchanged, skipped, failed by code,
  model calls, tokens, model time) and what the partition holds now (`stored_*`), so Dagster's plots show
  progress and cost, and an unchanged re-run still shows tokens and model time. A partition with a
  retryable failure gets none, and the step raises `dagster.Failure` at the end naming it, so Dagster marks
  it failed and "retry failed" re-runs it; its unchanged items then cost no model call.
- One step because Dagster skips a downstream asset step whose upstream step yielded only
  `AssetMaterialization` events (no `Output`). Inside the step, the selected vision stages run item by
  item (an item's stages back to back on one slot of its host, for Ollama's prompt cache; with
  `pipeline.combine_vision_stages` in one call), then the text stages; an item whose media or upstream
  stage failed in this run is not sent to the model. With several Ollama hosts each materialization
  carries the hosts' state and figures in this run (`hosts`).
- A run launched by `queued_jobs_sensor` (config `batch`) processes the jobs claimed for it on the job
  worker's code path (`process_claimed`: leases renewed, end states recorded as `process_ollama_job` does).
- A circuit breaker ends the run when Ollama stops answering; the items not tried stay untouched.

The asset bodies call the core (`run_stage`, `index_media`, the queue); nothing here touches the DB at import.
Only Dagster's public API is used.
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
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    BetaWarning,
    Config,
    DagsterLogManager,
    Failure,
    MetadataValue,
    multi_asset,
)
from pydantic import BaseModel, Field
from sqlalchemy import func, null, select

from ollama_pipeline.core.backfill import SELECTION_TAG, selection_members
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline.core.errors import OllamaPipelineError, ValidationError
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.images import (
    check_media_type,
    dhash,
    file_sha256,
    load_media_image,
    media_kind,
    resolve_media_path,
)
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.queue.heartbeats import Heartbeat
from ollama_pipeline.core.runner import CircuitBreaker, Pipeline, note_media_problem, run_items, run_stage
from ollama_pipeline.core.stages.base import Stage
from ollama_pipeline.defs.checks import check_db_result, check_db_spec, check_specs_for, evaluate_checks
from ollama_pipeline.defs.partitions import media_partitions
from ollama_pipeline.defs.resources import PipelineResource

MEDIA = "media"
LIBRARY_OP = "ollama_library"
MEDIA_CODE_VERSION = "media-index-v1"
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
    media_ids: list[int] | None = Field(default=None, description="Only these items of the run's partitions "
                                        "(`ollama-pipeline run --media`, the refresh schedule); default: all.")
    media_keys: list[str] | None = Field(default=None, description="As media_ids, for a gallery whose ids are "
                                         "text or UUIDs (`library.id_type`).")
    batch: str | None = Field(default=None, max_length=128, description="Set by queued_jobs_sensor: the run "
                              "processes the queued jobs claimed under this name and records their end states.")


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


ASSET_GROUP = "ollama_pipeline"
FAMILY_TAG = "ollama_pipeline/family"  # the registry's stage family (ollama_describe, ollama_judge)


def media_spec() -> AssetSpec:
    """The `media` asset: one partition per media row, its file checked and hashed."""
    return AssetSpec(
        MEDIA, group_name=ASSET_GROUP, code_version=MEDIA_CODE_VERSION, skippable=True,
        description="The media files of the library, partitioned by blocks of `media.id`. Each file is read inside "
        "the media root and decoded; its content SHA-256 (the data version), 64-bit dHash, size and pixel "
        "size go to `ollama_media_index`. Files whose size and mtime are unchanged are not re-read.",
        metadata={"table": "ollama_media_index"})


def stage_spec(stage: Stage) -> AssetSpec:
    """The asset of one stage: key = job type, upstream = media and the stage's upstream stages."""
    writes = ", ".join(f"`{key}`" for key in stage.writes)
    tables = f" Also writes: {', '.join(stage.writes_tables)}." if stage.writes_tables else ""
    return AssetSpec(
        stage.job_type, deps=[MEDIA, *stage.external_inputs, *stage.upstream], group_name=ASSET_GROUP,
        code_version=stage.code_version, skippable=True, kinds={"ollama"}, tags={FAMILY_TAG: stage.group},
        description=f"{stage.title}: {stage.description}\n\nWrites `media_meta`: {writes} (plus "
        f"`ollama.model`, `ollama.version`, `ollama.last_run_at`).{tables} Model: ollama.{stage.model_kind}_model.",
        metadata={"job_type": stage.job_type, "writes": MetadataValue.json(list(stage.writes)),
                  "model_kind": stage.model_kind, "prompt_version": stage.prompt_version})


# ---- the media index (no Dagster) ----------------------------------------------------------------


class MediaIndexOutcome(BaseModel):
    """What happened to one media file: indexed, unchanged, skipped (size and mtime unchanged), failed."""

    media_id: MediaId
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
    ids = list(dict.fromkeys(media_ids))
    m = require_gallery(pipeline.engine)["media"]
    columns = [m.c(name).label(name) if m.has(name) else null().label(name) for name in ("id", "path", "type", "hash")]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="media-index") as pool:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            with pipeline.engine.connect() as conn:
                rows_by_id = {r.id: r for r in conn.execute(select(*columns).where(m.c("id").in_(chunk)))}
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
class Block:
    """The outcome of one asset in one partition during one run (what its materialization reports)."""

    key: str
    expected: int
    counts: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # why items were skipped (unsupported, known problem)
    retryable: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    model_ms: float = 0.0
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    @property
    def complete(self) -> bool:
        return self.seen >= self.expected

    @property
    def materialized(self) -> bool:
        """Every item ended correctly: done, or failed for good with a recorded reason."""
        return self.retryable == 0 and self.counts.get("untouched", 0) == 0

    def add(self, media_id: int, status: str, error: dict[str, Any] | None, calls: int = 0,
            prompt_tokens: int = 0, output_tokens: int = 0, model_ms: float = 0.0, reason: str | None = None) -> None:
        self.counts[status] += 1
        if reason:
            self.reasons[reason] += 1
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.model_ms += model_ms
        if status == "failed":
            error = error or {}
            self.codes[f"{error.get('channel', '?')}/{error.get('code', '?')}"] += 1
            self.failed[media_id] = error
            if error.get("retryable"):
                self.retryable += 1


@dataclass
class Tally:
    """One asset in one run: a Block per partition, progress logged about every 10% of the items."""

    asset: str
    partitioning: Partitioning
    blocks: dict[str, Block]
    log: DagsterLogManager
    started: float = field(default_factory=time.perf_counter)
    _next_report: int = 0

    @property
    def total(self) -> int:
        return sum(b.expected for b in self.blocks.values())

    @property
    def counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for block in self.blocks.values():
            out.update(block.counts)
        return out

    @property
    def failed(self) -> dict[int, dict[str, Any]]:
        return {i: e for b in self.blocks.values() for i, e in b.failed.items()}

    def add(self, media_id: int, status: str, error: dict[str, Any] | None = None, **metrics: Any) -> Block | None:
        """Count one item; returns its Block when that was the block's last item."""
        block = self.blocks[self.partitioning.key_of(media_id)]
        block.add(media_id, status, error, **metrics)
        done = sum(b.seen for b in self.blocks.values())
        if done >= self._next_report or done == self.total:
            self._next_report = done + max(1, math.ceil(self.total / 10))
            rate = done / max(time.perf_counter() - self.started, 1e-6)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            self.log.info(f"{self.asset}: {done}/{self.total} items ({counts}), {rate:.1f} items/s")
        return block if block.complete else None


def stored_totals(pipeline: Pipeline, stage: str, partitioning: Partitioning, key: str) -> dict[str, Any]:
    """What the partition holds now (all its items, from ollama_stage_results): kept on every
    materialization, so an unchanged re-run still shows the tokens and model time of its answers."""
    span = partitioning.block_range(key)
    if span is None:
        return {}
    r = OllamaStageResult
    with pipeline.engine.connect() as conn:
        row = conn.execute(select(
            func.count().filter(r.status == "ok"), func.count().filter(r.status == "failed"),
            func.coalesce(func.sum(r.prompt_eval_count), 0), func.coalesce(func.sum(r.eval_count), 0),
            func.coalesce(func.sum(r.total_duration_ms), 0.0),
        ).where(r.stage == stage, r.media_id.between(*span))).one()
    return {"stored_ok": int(row[0]), "stored_failed": int(row[1]), "stored_prompt_tokens": int(row[2]),
            "stored_output_tokens": int(row[3]), "stored_model_time_s": round(float(row[4]) / 1000.0, 3)}


_HOST_COUNTERS = ("calls", "ok", "failed", "downs", "prompt_tokens", "output_tokens", "model_s", "busy_s")


def host_figures(pipeline: Pipeline, since: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Per host: its state now and what it did in this run so far (counters minus those at the run's
    start): calls, answered, failed (calls lost there; with a network error the item moved to its next
    host), times marked down, tokens, model and busy seconds."""
    before = {row["host"]: row for row in since or []}
    figures = []
    for row in pipeline.client.host_stats():
        start = before.get(row["host"], {})
        delta = {k: round(row[k] - start.get(k, 0), 3) if isinstance(row[k], float) else row[k] - start.get(k, 0)
                 for k in _HOST_COUNTERS}
        figures.append({"host": row["host"], "up": row["up"], "slots": row["slots"], "in_flight": row["in_flight"],
                        **delta, "last_error": row["last_error"]})
    return figures


def block_materialization(pipeline: Pipeline, asset: str, block: Block, partitioning: Partitioning,
                          hosts: list[dict[str, Any]] | None = None) -> AssetMaterialization:
    """The per-partition materialization: this run's counts and cost, plus what the partition holds (and,
    with several Ollama hosts, each host's state and figures in this run so far)."""
    c = block.counts
    metadata: dict[str, Any] = {
        "items": block.expected, "written": c.get("written", 0), "unchanged": c.get("unchanged", 0),
        "skipped": c.get("skipped", 0), "failed": c.get("failed", 0),
        "failed_by_code": MetadataValue.json(dict(block.codes.most_common())),
        "skipped_by_reason": MetadataValue.json(dict(block.reasons.most_common())),
        "model_calls": block.calls, "prompt_tokens": block.prompt_tokens, "output_tokens": block.output_tokens,
        "model_time_s": round(block.model_ms / 1000.0, 3),
    }
    if asset != MEDIA:
        metadata.update(stored_totals(pipeline, asset, partitioning, block.key))
    if hosts is not None and asset != MEDIA:
        metadata["hosts"] = MetadataValue.json(host_figures(pipeline, hosts))
    return AssetMaterialization(asset_key=asset, partition=block.key, metadata=metadata)


def failure_for(tallies: list[Tally]) -> Failure | None:
    """A Failure naming, per asset, the partitions with retryable failures and the codes; None if none."""
    failing = [(t, [b for b in t.blocks.values() if not b.materialized]) for t in tallies]
    failing = [(t, blocks) for t, blocks in failing if blocks]
    if not failing:
        return None
    parts = []
    by_code: dict[str, dict[str, int]] = {}
    sample: list[dict[str, Any]] = []
    failed_keys: list[str] = []
    for tally, blocks in failing:
        codes: Counter[str] = Counter()
        for block in blocks:
            codes.update(block.codes)
        by_code[tally.asset] = dict(codes.most_common())
        failed_keys.extend(f"{tally.asset}:{b.key}" for b in blocks)
        parts.append(f"{tally.asset}: {len(blocks)} of {len(tally.blocks)} partition(s) failed ("
                     + ", ".join(f"{code} x{n}" for code, n in codes.most_common()) + ")")
        for block in blocks:
            for media_id, error in list(block.failed.items())[:FAILED_SAMPLE - len(sample)]:
                sample.append({"asset": tally.asset, "partition": block.key, "media_id": media_id,
                               "channel": error.get("channel"), "code": error.get("code"),
                               "retryable": error.get("retryable"), "message": str(error.get("message", ""))[:200]})
    return Failure(
        description="; ".join(parts) + ". A partition fails when one of its items failed with a retryable "
        "error; every other partition of the run was materialized. Once the cause is fixed, re-run the failed "
        "partitions (backfill: retry failed): their unchanged items cost no model call.",
        metadata={"failed_partitions": MetadataValue.text(", ".join(failed_keys[:200])),
                  "failed_by_asset_and_code": MetadataValue.json(by_code),
                  "first_failures": MetadataValue.json(sample)},
        allow_retries=False)


def _item_ids(context: AssetExecutionContext, pipeline: Pipeline, config: StageRunConfig,
              partitioning: Partitioning, claimed: list[jobs.Job] | None) -> dict[str, list[int]]:
    """Partition key -> the items this run works on: the claimed jobs' items, the configured media ids
    inside the run's partitions, the stored selection of a targeted backfill (run tag `ollama/selection`,
    core.backfill) inside them, or every item of its partitions."""
    keys = list(context.partition_keys)
    selection_id = context.run.tags.get(SELECTION_TAG)
    if claimed is not None:
        ids = [job.media_id for job in claimed]
    elif config.media_ids is not None or config.media_keys is not None:
        wanted = set(keys)
        listed: list[MediaId] = [*(config.media_ids or ()), *(config.media_keys or ())]
        ids = [i for i in dict.fromkeys(listed) if partitioning.key_of(i) in wanted]
    elif selection_id is not None:
        ids = list(selection_members(pipeline.engine, selection_id, keys, partitioning))
    else:
        ids = list(partitioning.media_ids(pipeline.engine, keys))
    grouped = {key: [] for key in keys}
    for media_id in ids:
        grouped.setdefault(partitioning.key_of(media_id), []).append(media_id)
    return grouped


def materialize_library(context: AssetExecutionContext, pipeline: Pipeline, config: StageRunConfig,
                        stages: list[Stage]) -> Iterator[AssetMaterialization | AssetCheckResult]:
    """The body of `ollama_library`: selected assets in dependency order, one materialization per partition
    whose items all ended correctly, then a Failure naming the partitions with retryable failures."""
    tallies: list[Tally] = []
    try:
        yield from _materialize_library(context, pipeline, config, stages, tallies)
    finally:
        pipeline.remember_counts(context.run_id, {t.asset: dict(t.counts) for t in tallies})
        codes: dict[str, dict[str, int]] = {}
        for t in tallies:
            found: Counter[str] = Counter()
            for block in t.blocks.values():
                found.update(block.codes)
            if found:
                codes[t.asset] = dict(found.most_common())
        pipeline.remember_counts(f"codes:{context.run_id}", codes)


def _materialize_library(context: AssetExecutionContext, pipeline: Pipeline, config: StageRunConfig,
                         stages: list[Stage], tallies: list[Tally]) -> Iterator[AssetMaterialization | AssetCheckResult]:
    selected = context.selected_asset_keys
    checks = set(context.selected_asset_check_keys)
    partitioning = Partitioning(size=pipeline.settings.pipeline.partition_size)
    claimed = jobs.claimed_by_worker(pipeline, config.batch) if config.batch else None
    grouped = _item_ids(context, pipeline, config, partitioning, claimed) if selected else {}
    ids = [i for members in grouped.values() for i in members]

    def tally_for(asset: str) -> Tally:
        return Tally(asset, partitioning, {k: Block(k, len(v)) for k, v in grouped.items()}, context.log)

    several = len(pipeline.client.pool.hosts) > 1
    at_start = pipeline.client.host_stats() if several else None

    def finished(asset: str, tally: Tally, block: Block | None) -> Iterator[AssetMaterialization]:
        if block is not None and block.materialized:
            yield block_materialization(pipeline, asset, block, partitioning, at_start)

    failed: dict[str, dict[int, dict[str, Any]]] = {}
    skipped: dict[int, str] = {}  # media id -> why its file cannot be used (unsupported, reported problem)
    for block_key, members in grouped.items():  # partitions without items are materialized as empty
        if not members:
            for asset in (MEDIA, *(s.job_type for s in stages)):
                if AssetKey(asset) in selected:
                    yield block_materialization(pipeline, asset, Block(block_key, 0), partitioning)
    if AssetKey(MEDIA) in selected:
        tally = tally_for(MEDIA)
        tallies.append(tally)
        workers = config.concurrency or pipeline.settings.pipeline.concurrency
        for outcome in index_media(pipeline, ids, force=config.force, workers=workers):
            if outcome.reason:
                skipped[outcome.media_id] = outcome.reason
            yield from finished(MEDIA, tally, tally.add(outcome.media_id, outcome.status, outcome.error,
                                                        reason=outcome.reason))
        failed[MEDIA] = tally.failed
    breaker = CircuitBreaker(pipeline.settings.pipeline.circuit_breaker)
    chosen = [s for s in stages if AssetKey(s.job_type) in selected]
    # Vision work first, then text (a host that holds one model swaps once); without claimed jobs the
    # vision stages run item by item, an item's stages back to back on one slot of its host.
    vision = [s for s in chosen if s.model_kind == "vision" and not set(s.upstream) & {c.job_type for c in chosen}]
    passes: list[list[Stage]] = [] if not vision or claimed is not None else [vision]
    passes += [[s] for s in stage_order_of(chosen) if not passes or s not in vision]

    def blocked_for(stage: Stage) -> dict[int, dict[str, Any]]:
        """Items not sent to the model for this stage: their media or upstream stage failed in this run
        (upstream_failed), or their file cannot be used (reported by `media`: skipped)."""
        blocked: dict[int, dict[str, Any]] = {}
        for upstream in (MEDIA, *stage.upstream):
            for media_id, error in failed.get(upstream, {}).items():
                blocked.setdefault(media_id, {
                    "channel": "blocked", "code": f"upstream_failed.{upstream}",
                    "retryable": bool(error.get("retryable")),
                    "message": f"{upstream} failed for this item in this run"})
        for media_id, reason in skipped.items():
            blocked.setdefault(media_id, {"channel": "skipped", "code": reason, "retryable": False})
        return blocked

    for group in passes:
        if breaker.open:
            break
        by_stage: dict[str, Tally] = {}
        excluded: dict[str, dict[int, dict[str, Any]]] = {}
        for stage in group:
            tally = by_stage[stage.job_type] = tally_for(stage.job_type)
            tallies.append(tally)
            blocked = excluded[stage.job_type] = blocked_for(stage)
            for media_id, error in blocked.items():
                if error["channel"] == "skipped":
                    yield from finished(stage.job_type, tally, tally.add(media_id, "skipped", reason=error["code"]))
                else:
                    yield from finished(stage.job_type, tally, tally.add(media_id, "failed", error))
        if claimed is not None:
            (stage,) = group
            tally = by_stage[stage.job_type]
            blocked = excluded[stage.job_type]
            todo = [job for job in claimed if job.job_type == stage.job_type and job.media_id not in blocked]
            for job in blocked_jobs(claimed, stage, blocked):
                error = None if blocked[job.media_id]["channel"] == "skipped" else blocked[job.media_id]
                jobs.finish_claimed(pipeline, job, error, item_status="skipped" if error is None else "failed",
                                    run_id=context.run_id)
            for done in jobs.process_claimed(pipeline, todo, run_id=context.run_id,
                                             concurrency=config.concurrency, breaker=breaker):
                status = done.item_status or ("failed" if done.error else "written")
                yield from finished(stage.job_type, tally, tally.add(
                    done.media_id or 0, status, done.error, calls=done.calls,
                    prompt_tokens=done.prompt_eval_count, output_tokens=done.eval_count, model_ms=done.model_ms))
        else:
            runnable = [i for i in ids if any(i not in excluded[s.job_type] for s in group)]
            outcomes = (run_items(pipeline, group, runnable, force=config.force, concurrency=config.concurrency,
                                  run_id=context.run_id, model=config.model, breaker=breaker, exclude=excluded)
                        if len(group) > 1 else
                        run_stage(pipeline, group[0], runnable, force=config.force, concurrency=config.concurrency,
                                  run_id=context.run_id, model=config.model, breaker=breaker))
            for outcome in outcomes:
                m = outcome.metrics
                yield from finished(outcome.stage, by_stage[outcome.stage], by_stage[outcome.stage].add(
                    outcome.media_id, outcome.status, outcome.error, reason=outcome.reason, calls=m.calls,
                    prompt_tokens=m.prompt_eval_count, output_tokens=m.eval_count, model_ms=m.total_duration_ms))
        for stage in group:
            failed[stage.job_type] = by_stage[stage.job_type].failed
            yield from evaluate_checks(pipeline.engine, stage, checks)
    for stage in stages:  # checks selected without their asset
        if stage not in chosen and not breaker.open:
            yield from evaluate_checks(pipeline.engine, stage, checks)
    if several:
        for row in host_figures(pipeline, at_start):
            context.log.info(f"host {row['host']}: {'up' if row['up'] else 'DOWN'}, {row['ok']} of {row['calls']} "
                             f"calls answered, {row['failed']} failed, down {row['downs']}x, "
                             f"{row['output_tokens']} output tokens, {row['model_s']} s model time")
    if breaker.open:
        # Ollama stopped answering: the items not tried stay untouched (no failed stage result), and the step
        # ends without a Failure so Dagster does not mark their partitions failed; the next run picks them up.
        untouched = sum(t.counts.get("untouched", 0) for t in tallies)
        message = (f"circuit breaker: {breaker.consecutive} model calls in a row failed with network errors "
                   f"({(breaker.last_error or {}).get('code')}); the run stopped, {untouched} item(s) untouched")
        pipeline.remember_breaker(context.run_id, message)
        context.log.error(message)
        return
    failure = failure_for(tallies)
    if failure is not None:
        raise failure


def stage_order_of(stages: list[Stage]) -> list[Stage]:
    """The stages in the order they meet the models (as core.shaping.stage_order): vision first, then text."""
    ordered = [s for s in stages if s.model_kind == "vision"] + [s for s in stages if s.model_kind != "vision"]
    position = {s.job_type: i for i, s in enumerate(ordered)}
    if any(position.get(u, -1) > position[s.job_type] for s in ordered for u in s.upstream):
        return stages  # a vision stage reads a text stage's output: dependency order wins
    return ordered


def blocked_jobs(claimed: list[jobs.Job], stage: Stage, blocked: dict[int, dict[str, Any]]) -> list[jobs.Job]:
    return [job for job in claimed if job.job_type == stage.job_type and job.media_id in blocked]


def build_library_asset(stages: list[Stage] | None = None) -> AssetsDefinition:
    """The multi-asset that materializes `media` and every stage asset (any subset) for many partitions."""
    stages = ordered_stages() if stages is None else stages
    specs = [media_spec(), *(stage_spec(stage) for stage in stages)]
    check_specs = [check_db_spec(), *(spec for stage in stages for spec in check_specs_for(stage))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # BackfillPolicy is marked beta; its behaviour is measured
        decorator = multi_asset(
            name=LIBRARY_OP, specs=specs, check_specs=check_specs, partitions_def=media_partitions,
            backfill_policy=BackfillPolicy.single_run(), can_subset=True,
            description="Indexes media files and runs the Ollama stages over many media items in one step.")

    def ollama_library(context: AssetExecutionContext, config: StageRunConfig,
                       pipeline: PipelineResource) -> Iterator[AssetMaterialization | AssetCheckResult]:
        core = pipeline.pipeline()
        others = set(context.selected_asset_check_keys) - {check_db_spec().key}
        if check_db_spec().key in context.selected_asset_check_keys:  # first: it works without the database
            yield check_db_result(lambda: core.engine)
            if not context.selected_asset_keys and not others:
                return
        if context.selected_asset_keys:
            require_gallery(core.engine)  # a gap stops the step with the check-db report, before any item
        with Heartbeat(core, context.run_id):
            yield from materialize_library(context, core, config, stages)

    return decorator(ollama_library)


ollama_library = build_library_asset()
ollama_stage_assets: list[AssetSpec] = [spec for spec in ollama_library.specs if spec.key != AssetKey(MEDIA)]
# Gallery tables that stages read but the pipeline does not produce: external assets, for lineage only.
EXTERNAL_INPUTS: dict[str, str] = {
    "scan_results": "The gallery's NSFW scanner results (`scan_results`: nsfw_score, flags), written by the "
    "gallery application; read by the policy stage. Not materialized by this project.",
}
external_assets: list[AssetSpec] = [
    AssetSpec(name, group_name=ASSET_GROUP, description=text, metadata={"table": name})
    for name, text in EXTERNAL_INPUTS.items()
    if any(name in stage.external_inputs for stage in ordered_stages())
]
all_assets: list[AssetsDefinition | AssetSpec] = [ollama_library, *external_assets]
