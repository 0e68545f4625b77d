"""The duplicate stage at library scale: candidates come from the dHash index and bounded queries by key,
never from loading the library (issue 13, "Scale": peak RSS of an all-stage run over 10,000 items of a
1,000,000-item library; the timing is in ollama_pipeline/bench/scale.py, not here)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, insert

from ollama_pipeline.app.demo_library import build_demo_library
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import Media, OllamaMediaIndex, Prompt
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.core.stages.duplicates import _universe, batch_candidates
from ollama_pipeline.defs.assets import index_media

EXTRA_ROWS = 3000  # items indexed before, without files: the "rest of the library"


def _library(settings: Any) -> tuple[Pipeline, list[int]]:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, settings.media_root, count=12, seed=7, max_side=256)
    list(index_media(pipeline, report.media_ids))
    rng = random.Random(5)
    with pipeline.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(insert(Media).returning(Media.id, sort_by_parameter_order=True), [
            {"path": f"elsewhere/{i:05d}.png", "type": "image"} for i in range(EXTRA_ROWS)])]
        conn.execute(insert(OllamaMediaIndex), [
            {"media_id": i, "content_sha256": f"{i:064x}", "dhash": f"{rng.getrandbits(64) | 0xF0F0F0F0F0F0F0F0:016x}", "size_bytes": 1}
            for i in ids])
        conn.execute(insert(Prompt), [{"media_id": i, "prompt": f"scene {i}", "seed": i} for i in ids])
    return pipeline, report.media_ids


def _statements(pipeline: Pipeline, work: Callable[[], Any]) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(pipeline.engine, "before_cursor_execute", record)
    try:
        work()
    finally:
        event.remove(pipeline.engine, "before_cursor_execute", record)
    return seen


def test_duplicate_candidates_read_paths_and_prompts_by_key_never_the_whole_library(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """Finding the candidates of one item reads the gallery's media and prompts only by primary key, media
    id or seed (bounded IN lists), and holds 16 bytes per indexed item (id and dHash) in memory."""
    pipeline, ids = _library(settings_factory(sqlite_url))
    found: dict[int, Any] = {}
    statements = _statements(pipeline, lambda: found.update(batch_candidates(pipeline, ids[:1], 10)))
    gallery_reads = [s for s in statements if " FROM media" in s or " FROM prompts" in s]
    assert gallery_reads, statements
    assert all(" IN (" in s.split(" WHERE ", 1)[-1] for s in gallery_reads if " WHERE " in s), gallery_reads
    assert all(" WHERE " in s for s in gallery_reads), gallery_reads
    universe = _universe(pipeline)
    assert len(universe.hashes) == EXTRA_ROWS + len(ids)
    assert universe.hashes.nbytes + universe.ids.nbytes == 16 * (EXTRA_ROWS + len(ids))
    assert not [v for v in vars(universe).values() if isinstance(v, dict)]  # no per-item paths or prompts


def test_duplicate_stage_over_a_larger_index_still_finds_the_demo_near_duplicate(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """With thousands of other indexed items, the demo's near-duplicate pair still names each other as
    candidates found by dHash, and no item far away in hash space is a candidate."""
    pipeline, ids = _library(settings_factory(sqlite_url))
    outcomes = list(run_stage(pipeline, "ollama_duplicate_assist", ids))
    assert all(o.status == "written" for o in outcomes), [o.error for o in outcomes]
    with pipeline.engine.connect() as conn:
        from ollama_pipeline.core.db.models import OllamaValue

        values = {r[0]: json.loads(r[1]) for r in conn.execute(
            OllamaValue.__table__.select().with_only_columns(OllamaValue.media_id, OllamaValue.value)
            .where(OllamaValue.key == "ollama.duplicate_assist"))}
    pairs = {i: {c["media_id"] for c in v["candidates"]} for i, v in values.items()}
    assert any(pairs.values()), pairs
    assert all(other in ids for others in pairs.values() for other in others)  # no far-away rows-only item
    assert all(i in pairs[other] for i, others in pairs.items() for other in others
               if "dhash" in next(c["found_by"] for c in values[i]["candidates"] if c["media_id"] == other))
