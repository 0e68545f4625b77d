"""`new_media_sensor`: registers the partitions (blocks) of new `media` rows and launches one run over them.

The media table is the gallery's as discovered (core.db.gallery: prefix, PostgreSQL schema, column names).
With integer ids each tick reads the ids of media rows above the cursor (id only, ordered, at most
MAX_NEW_PER_TICK). Text and UUID ids have no order of arrival, so there a new row is one the pipeline has
never seen: no row in `ollama_media_index` nor in `ollama_stage_results` (one anti-join, at most
MAX_NEW_PER_TICK); the run key is made from those ids, so a tick before their run ended requests nothing
new. The tick adds the partitions (blocks or hash buckets) they fall in to the `media_blocks` dynamic
partitions (core.partitioning) and requests ONE run
over those blocks (a partition range, the way a single-run backfill is launched) that materializes `media`
and every stage asset for exactly the new items (their ids in the run config).

The partitions are added by the tick itself with one bulk `instance.add_dynamic_partitions` call (which keys
exist already is one bounded query; the tick never loads all partition keys, see
`partitions.register_partitions`). The cursor is the highest id a run was requested for: when Ollama does
not answer, the tick still registers the partitions but skips the run, and a later tick requests it. The
sensor starts STOPPED: its first tick on an existing library launches model calls for every item, which a
user should decide to do.
"""

import hashlib
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from sqlalchemy import exists, select

from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.db.models import OllamaMediaIndex, OllamaStageResult
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.defs.assets import LIBRARY_OP, MEDIA, ollama_stage_assets
from ollama_pipeline.defs.orphans import fail_orphan_runs
from ollama_pipeline.defs.partitions import (
    KeyOrder,
    as_positions,
    contiguous_ranges,
    range_tags,
    register_partitions,
)
from ollama_pipeline.defs.resources import PipelineResource

MAX_NEW_PER_TICK = 25_000  # new rows per tick (each block of them is one partition)
TICK_SECONDS = 60

library_asset_keys: list[AssetKey] = [AssetKey(MEDIA), *(spec.key for spec in ollama_stage_assets)]


def _run_key(ids: Sequence[MediaId]) -> str:
    if all(isinstance(i, int) for i in ids):
        return f"new-media-{ids[0]}-{ids[-1]}"
    digest = hashlib.sha256("\n".join(str(i) for i in ids).encode()).hexdigest()[:16]
    return f"new-media-{len(ids)}-{digest}"


def run_config_for(ids: Sequence[MediaId]) -> dict[str, Any]:
    """The run config that limits a run to these items: integer ids as `media_ids`, text and UUID ids
    as `media_keys` (a Dagster config field has one type)."""
    field = "media_ids" if all(isinstance(i, int) for i in ids) else "media_keys"
    values = list(ids) if field == "media_ids" else [str(i) for i in ids]
    return {"ops": {LIBRARY_OP: {"config": {field: values}}}}


def range_run_requests(ordered_keys: KeyOrder, new_ids: Sequence[MediaId], partitioning: Partitioning,
                       asset_keys: Sequence[AssetKey]) -> list[RunRequest]:
    """One run request per contiguous range of the new items' partitions (normally exactly one), each for
    exactly its new items."""
    position = as_positions(ordered_keys)
    groups = partitioning.group(new_ids)
    requests = []
    for start, end in contiguous_ranges(ordered_keys, groups):
        ids = [i for key, members in groups.items() if position[start] <= position[key] <= position[end]
               for i in members]
        requests.append(RunRequest(asset_selection=list(asset_keys), tags=range_tags(start, end),
                                   run_key=_run_key(ids), run_config=run_config_for(ids)))
    return requests


@sensor(
    name="new_media_sensor", target=AssetSelection.assets(*library_asset_keys),
    minimum_interval_seconds=TICK_SECONDS, default_status=DefaultSensorStatus.STOPPED,
    description="Adds new media rows as `media` partitions and launches one run over them "
    f"(media + all stages), at most {MAX_NEW_PER_TICK:,} items per tick. Stopped by default: the first "
    "tick on an existing library starts model calls for every item.",
)
def new_media_sensor(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult:
    """One tick: new media ids above the cursor -> partitions + one range run (or a skip reason)."""
    core = pipeline.pipeline()
    fail_orphan_runs(context.instance, core)
    gallery = require_gallery(core.engine)
    media_id = gallery["media"].c("id")
    if gallery.integer_ids:
        after = int(context.cursor or 0)
        query = select(media_id).where(media_id > after)
        nothing = f"no media rows with id above {after}"
    else:  # no order of arrival: rows the pipeline has not seen yet
        query = select(media_id).where(
            ~exists().where(OllamaMediaIndex.media_id == media_id),
            ~exists().where(OllamaStageResult.media_id == media_id))
        nothing = "no media rows the pipeline has not seen"
    with core.engine.connect() as conn:
        ids = conn.execute(query.order_by(media_id).limit(MAX_NEW_PER_TICK)).scalars().all()
    if not ids:
        return SensorResult(skip_reason=SkipReason(nothing))
    partitioning = Partitioning(size=core.settings.pipeline.partition_size)
    keys = partitioning.keys_of(ids)
    position, added = register_partitions(context.instance, keys)
    health = core.client.health()
    if not health.ok:
        return SensorResult(skip_reason=SkipReason(
            f"Ollama at {health.base_url} is not reachable: {health.error_code} ({len(added)} new media "
            f"partitions registered; the run over ids {ids[0]}..{ids[-1]} is requested once Ollama answers)"))
    context.log.info(f"{len(ids)} new media rows ({ids[0]}..{ids[-1]}) in {len(keys)} partition(s), "
                     f"{len(added)} of them new")
    return SensorResult(run_requests=range_run_requests(position, ids, partitioning, library_asset_keys),
                        cursor=str(ids[-1]) if gallery.integer_ids else context.cursor)
