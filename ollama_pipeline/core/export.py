"""The export feed (§2 UI/Downstream): JSON Lines, one object per media item with every `ollama.*` key.

Format `ollama_pipeline.core.export/v1` for galleries with integer ids, `/v2` for text and UUID ids, whose
`media_id` (and the duplicate candidates' ids) are strings (documented in docs/export_format.md, JSON Schema
in docs/export_schema.json): `schema`, `media_id`, `path`, `hash`, `type`, `width`, `height`, `quality_status`,
`quality_score`, `ollama` (every stored `ollama.*` key, parsed from its JSON text) and `stages` (status,
model, version, last success and error code per stage). Lines are ordered by media id and written to a
temporary file that replaces the target only when complete, so readers never see half a feed; an
unchanged library gives a byte-identical file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, null, select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import engine_for_settings, read_connection
from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline.core.db.repository import MEDIA_STAGE, values_table
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.jsontext import canonical_json, loads_or_none

EXPORT_SCHEMA = "ollama_pipeline.core.export/v1"  # integer media ids
EXPORT_SCHEMA_TEXT_IDS = "ollama_pipeline.core.export/v2"  # text and UUID media ids: media_id is a string


def export_schema_for(id_type: str) -> str:
    """The format of the feed of a gallery whose media ids are of id_type."""
    return EXPORT_SCHEMA if id_type == "integer" else EXPORT_SCHEMA_TEXT_IDS


def _ts(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value is not None else None


def export_records(engine: Engine, media_ids: list[MediaId] | None = None,
                   chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """Export objects in media-id order, read in chunks so memory stays flat for large libraries."""
    last_id: MediaId | None = None
    g = require_gallery(engine)
    m = g["media"]
    schema = export_schema_for(g.id_type)
    fields = ("hash", "type", "width", "height", "quality_status", "quality_score")
    vt = values_table(engine)
    with read_connection(engine) as conn:
        while True:
            q = (select(m.c("id").label("id"), m.c("path").label("path"),
                        *[(m.c(f) if m.has(f) else null()).label(f) for f in fields])
                 .order_by(m.c("id")))
            if last_id is not None:
                q = q.where(m.c("id") > last_id)
            if media_ids is not None:
                q = q.where(m.c("id").in_(media_ids))
            rows = conn.execute(q.limit(chunk)).mappings().all()
            if not rows:
                return
            ids = [r["id"] for r in rows]
            meta: dict[MediaId, dict[str, Any]] = {}
            for r in conn.execute(select(vt.c.media_id, vt.c.key, vt.c.value).where(
                    vt.c.media_id.in_(ids), vt.c.key.like("ollama.%"))):
                meta.setdefault(r[0], {})[r[1]] = loads_or_none(r[2])
            stages: dict[MediaId, dict[str, Any]] = {}
            for r in conn.execute(select(OllamaStageResult).where(  # stage 'media' is the list to fix, not a stage
                    OllamaStageResult.media_id.in_(ids), OllamaStageResult.stage != MEDIA_STAGE)).mappings():
                stages.setdefault(r["media_id"], {})[r["stage"]] = {
                    "status": r["status"], "model": r["model"], "version": r["version"],
                    "last_success_at": _ts(r["last_success_at"]), "error_code": r["error_code"]}
            for r in rows:
                yield {"schema": schema, "media_id": r["id"], "path": r["path"], "hash": r["hash"],
                       "type": r["type"], "width": r["width"], "height": r["height"],
                       "quality_status": r["quality_status"], "quality_score": r["quality_score"],
                       "ollama": dict(sorted(meta.get(r["id"], {}).items())),
                       "stages": dict(sorted(stages.get(r["id"], {}).items()))}
            last_id = ids[-1]


def default_export_path(settings: Settings) -> Path:
    return settings.logs_dir.parent / "exports" / "ollama_export.jsonl"


def temp_beside(target: Path) -> Path:
    """A unique hidden temporary name next to target: two writers (CLI, Dagster) never share one."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_export(settings: Settings, path: Path | None = None) -> tuple[Path, int]:
    """Write the feed atomically; returns (path, number of items)."""
    engine = engine_for_settings(settings)
    target = path or default_export_path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    count = 0
    try:
        with tmp.open("x", encoding="utf-8", newline="\n") as fh:
            for record in export_records(engine):
                fh.write(canonical_json(record) + "\n")
                count += 1
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target, count


def read_export(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
