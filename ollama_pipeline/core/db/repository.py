"""Reads of the seed's inputs (§1) and the one write path for results (§2): `persist_ollama_result`.

Everything the assets and the job processor store goes through `persist_ollama_result` (success) or
`record_stage_failure` (failure, which never touches media_meta). Each is one transaction; on SQLite a
locked database is retried with backoff before it becomes `persistence.locked`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from ollama_pipeline.core.db.engine import read_connection
from ollama_pipeline.core.db.models import (
    AuditLog,
    Media,
    MediaLifecycleEvent,
    MediaMeta,
    MediaTag,
    OllamaMediaIndex,
    OllamaStageResult,
    Prompt,
    ScanResult,
    Tag,
)
from ollama_pipeline.core.errors import OllamaPipelineError, PersistenceError, ValidationError
from ollama_pipeline.core.jsontext import canonical_json, loads_or_none
from ollama_pipeline.core.stages.base import (
    MediaRow,
    PromptRow,
    ScanRow,
    StageInputs,
    StageResult,
    TagRow,
    TagSuggestion,
)

T = TypeVar("T")

ACTOR = "ollama_pipeline"


def _naive(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def iso(ts: datetime) -> str:
    return _naive(ts).isoformat(timespec="seconds") + "Z"


def _is_locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database table is locked" in text or "deadlock detected" in text


def with_retry(engine: Engine, work: Callable[[Connection], T], *, retries: int = 5, backoff_s: float = 0.05,
               what: str = "write") -> T:
    """Run work in one transaction; retry lock errors with backoff, map DB errors to PersistenceError."""
    for attempt in range(retries + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except OllamaPipelineError:
            raise
        except IntegrityError as exc:
            raise PersistenceError(f"{what} refused by a database constraint: {type(exc.orig).__name__}",
                                   code="persistence.constraint") from None
        except (OperationalError, DBAPIError) as exc:
            if _is_locked(exc) and attempt < retries:
                time.sleep(backoff_s * (2**attempt))
                continue
            if _is_locked(exc):
                raise PersistenceError(f"{what} failed: database stayed locked after {retries} retries",
                                       code="persistence.locked") from None
            raise PersistenceError(f"{what} failed: {type(getattr(exc, 'orig', exc)).__name__}: "
                                   f"{str(getattr(exc, 'orig', exc)).splitlines()[0][:200]}",
                                   code="persistence.db") from None
        except SQLAlchemyError as exc:
            raise PersistenceError(f"{what} failed: {type(exc).__name__}", code="persistence.db") from None
    raise AssertionError("unreachable")


@lru_cache(maxsize=64)
def _upsert_statement(dialect: str, table: Any, keys: tuple[str, ...], update_cols: tuple[str, ...]) -> Any:
    """INSERT … ON CONFLICT DO UPDATE, built once per table and column set (building it costs ~2 ms)."""
    ins = pg_insert(table) if dialect == "postgresql" else sqlite_insert(table)
    return ins.on_conflict_do_update(index_elements=list(keys), set_={c: ins.excluded[c] for c in update_cols})


def _upsert(conn: Connection, table: Any, values: dict[str, Any], keys: list[str], update_cols: list[str]) -> None:
    dialect = conn.dialect.name
    if dialect not in ("postgresql", "sqlite"):  # portable fallback
        where = and_(*[getattr(table.c, k) == values[k] for k in keys])
        if conn.execute(select(func.count()).select_from(table).where(where)).scalar():
            conn.execute(update(table).where(where).values(**{c: values[c] for c in update_cols}))
        else:
            conn.execute(insert(table).values(**values))
        return
    conn.execute(_upsert_statement(dialect, table, tuple(keys), tuple(update_cols)), values)


# ---- reads (§1) ----------------------------------------------------------------------------------


def load_media_rows(conn: Connection, media_ids: Iterable[int]) -> dict[int, MediaRow]:
    ids = list(media_ids)
    rows = conn.execute(select(Media).where(Media.id.in_(ids))).mappings() if ids else []
    out = {}
    for r in rows:
        row = dict(r)
        out[row["id"]] = MediaRow.model_validate({k: row.get(k) for k in MediaRow.model_fields})
    return out


def load_inputs_many(engine: Engine, media_ids: Iterable[int]) -> dict[int, StageInputs]:
    """Media row, prompt, tags, scan results and media_meta for many items in a few queries."""
    ids = sorted(set(media_ids))
    if not ids:
        return {}
    result: dict[int, StageInputs] = {}
    with read_connection(engine) as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            media = load_media_rows(conn, chunk)
            prompts: dict[int, PromptRow] = {}
            for r in conn.execute(select(Prompt).where(Prompt.media_id.in_(chunk)).order_by(Prompt.id)).mappings():
                prompts[r["media_id"]] = PromptRow.model_validate(
                    {k: r.get(k) for k in PromptRow.model_fields})
            tags: dict[int, list[TagRow]] = {}
            q = (select(MediaTag.media_id, Tag.name, MediaTag.locked, MediaTag.confidence, MediaTag.weight,
                        MediaTag.source).join(Tag, Tag.id == MediaTag.tag_id)
                 .where(MediaTag.media_id.in_(chunk)).order_by(MediaTag.media_id, Tag.name))
            for r in conn.execute(q).mappings():
                tags.setdefault(r["media_id"], []).append(TagRow(
                    name=r["name"], locked=bool(r["locked"]), confidence=r["confidence"], weight=r["weight"],
                    source=r["source"]))
            scans: dict[int, list[ScanRow]] = {}
            q2 = select(ScanResult).where(ScanResult.media_id.in_(chunk)).order_by(ScanResult.id)
            for r in conn.execute(q2).mappings():
                flags = loads_or_none(r["flags"])
                scans.setdefault(r["media_id"], []).append(ScanRow(
                    scanner=r["scanner"], nsfw_score=r["nsfw_score"],
                    flags=[str(f) for f in flags] if isinstance(flags, list) else []))
            meta: dict[int, dict[str, Any]] = {}
            q3 = select(MediaMeta.media_id, MediaMeta.key, MediaMeta.value).where(MediaMeta.media_id.in_(chunk))
            for r in conn.execute(q3).mappings():
                meta.setdefault(r["media_id"], {})[r["key"]] = loads_or_none(r["value"])
            for mid, row in media.items():
                result[mid] = StageInputs(media=row, prompt=prompts.get(mid), tags=tags.get(mid, []),
                                          scans=scans.get(mid, []), meta=meta.get(mid, {}))
    return result


def load_inputs(engine: Engine, media_id: int) -> StageInputs:
    inputs = load_inputs_many(engine, [media_id])
    if media_id not in inputs:
        raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
    return inputs[media_id]


def tag_vocabulary(engine: Engine, *, exclude_source: str | None = None) -> list[str]:
    """Tag names of the library; with exclude_source, only tags linked at least once by another source
    (e.g. the tags people and imports use, not the ones only ollama wrote)."""
    with read_connection(engine) as conn:
        if exclude_source is None:
            return [r[0] for r in conn.execute(select(Tag.name).order_by(Tag.name))]
        q = (select(Tag.name).join(MediaTag, MediaTag.tag_id == Tag.id)
             .where(or_(MediaTag.source.is_(None), MediaTag.source != exclude_source, MediaTag.locked.is_(True)))
             .distinct().order_by(Tag.name))
        return [r[0] for r in conn.execute(q)]


def duplicate_universe(engine: Engine) -> list[dict[str, Any]]:
    """Every media item with what cheap duplicate search needs: path, dHash, generation seed and prompt."""
    with read_connection(engine) as conn:
        first_prompt = (select(Prompt.media_id, func.min(Prompt.id).label("pid")).group_by(Prompt.media_id)
                        .subquery())
        q = (select(Media.id, Media.path, OllamaMediaIndex.dhash, Prompt.seed, Prompt.prompt)
             .outerjoin(OllamaMediaIndex, OllamaMediaIndex.media_id == Media.id)
             .outerjoin(first_prompt, first_prompt.c.media_id == Media.id)
             .outerjoin(Prompt, Prompt.id == first_prompt.c.pid)
             .order_by(Media.id))
        return [{"media_id": r[0], "path": r[1], "dhash": r[2], "seed": r[3], "prompt": r[4]}
                for r in conn.execute(q)]


def stage_states(engine: Engine, stage: str, media_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The ollama_stage_results row of each item for one stage."""
    ids = list(media_ids)
    out: dict[int, dict[str, Any]] = {}
    with read_connection(engine) as conn:
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = select(OllamaStageResult).where(OllamaStageResult.stage == stage,
                                                OllamaStageResult.media_id.in_(chunk))
            for r in conn.execute(q).mappings():
                out[r["media_id"]] = dict(r)
    return out


def media_index(engine: Engine, media_ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    with read_connection(engine) as conn:
        q = select(OllamaMediaIndex)
        if media_ids is not None:
            q = q.where(OllamaMediaIndex.media_id.in_(list(media_ids)))
        return {r["media_id"]: dict(r) for r in conn.execute(q).mappings()}


def upsert_media_index(engine: Engine, rows: list[dict[str, Any]], retries: int = 5) -> None:
    def work(conn: Connection) -> None:
        for row in rows:
            _upsert(conn, OllamaMediaIndex.__table__, {**row, "updated_at": _naive(datetime.now(UTC))},
                    ["media_id"], [c for c in row if c != "media_id"] + ["updated_at"])

    if rows:
        with_retry(engine, work, retries=retries, what="media index write")


# ---- the one write path (§2, §3 persist_ollama_result) -------------------------------------------


def _lock_media(conn: Connection, media_id: int) -> dict[str, Any]:
    q = select(Media.id, Media.quality_status, Media.quality_score).where(Media.id == media_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).mappings().first()
    if row is None:
        raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
    return dict(row)


def _meta_values(conn: Connection, media_id: int, keys: list[str]) -> dict[str, str | None]:
    q = select(MediaMeta.key, MediaMeta.value).where(MediaMeta.media_id == media_id, MediaMeta.key.in_(keys))
    return {r[0]: r[1] for r in conn.execute(q)}


def _write_meta(conn: Connection, media_id: int, key: str, text: str, old: dict[str, str | None],
                now: datetime) -> bool:
    if old.get(key) == text:
        return False
    _upsert(conn, MediaMeta.__table__, {"media_id": media_id, "key": key, "value": text, "updated_at": now},
            ["media_id", "key"], ["value", "updated_at"])
    return True


def _merge_map(old_text: str | None, stage: str, value: Any) -> str:
    old = loads_or_none(old_text)
    merged = dict(old) if isinstance(old, dict) else {}
    merged[stage] = value
    return canonical_json(merged)


def _tag_ids(conn: Connection, names: list[str], now: datetime) -> dict[str, int]:
    if not names:
        return {}
    found = {r[0]: r[1] for r in conn.execute(select(Tag.name, Tag.id).where(Tag.name.in_(names)))}
    for name in names:
        if name not in found:
            dialect = conn.dialect.name
            ins = (pg_insert(Tag) if dialect == "postgresql" else sqlite_insert(Tag)).values(name=name, created_at=now)
            conn.execute(ins.on_conflict_do_nothing(index_elements=["name"]))
            found[name] = conn.execute(select(Tag.id).where(Tag.name == name)).scalar_one()
    return found


def _apply_tags(conn: Connection, media_id: int, suggestions: list[TagSuggestion], now: datetime) -> dict[str, int]:
    """Write ollama tags: locked and human links are never touched; stale ollama links are removed."""
    existing = {r["name"]: dict(r) for r in conn.execute(
        select(Tag.name, MediaTag.tag_id, MediaTag.locked, MediaTag.source, MediaTag.confidence, MediaTag.weight)
        .join(Tag, Tag.id == MediaTag.tag_id).where(MediaTag.media_id == media_id)).mappings()}
    wanted = {s.name: s for s in suggestions}
    ids = _tag_ids(conn, sorted(n for n in wanted if n not in existing), now)
    counts = {"added": 0, "updated": 0, "removed": 0, "kept_locked_or_human": 0}
    for name, s in sorted(wanted.items()):
        link = existing.get(name)
        if link is None:
            conn.execute(insert(MediaTag).values(media_id=media_id, tag_id=ids[name], locked=False,
                                                 confidence=s.confidence, weight=s.weight, source="ollama",
                                                 created_at=now))
            counts["added"] += 1
        elif link["locked"] or link["source"] != "ollama":
            counts["kept_locked_or_human"] += 1
        elif (link["confidence"], link["weight"]) != (s.confidence, s.weight):
            conn.execute(update(MediaTag).where(MediaTag.media_id == media_id, MediaTag.tag_id == link["tag_id"])
                         .values(confidence=s.confidence, weight=s.weight))
            counts["updated"] += 1
    for name, link in existing.items():
        if name not in wanted and link["source"] == "ollama" and not link["locked"]:
            conn.execute(delete(MediaTag).where(MediaTag.media_id == media_id, MediaTag.tag_id == link["tag_id"]))
            counts["removed"] += 1
    return counts


def _record_change(conn: Connection, media_id: int, event_type: str, old: Any, new: Any, result: StageResult,
                   now: datetime) -> None:
    details = canonical_json({"model": result.model, "version": result.version, "stage": result.stage,
                              "job_id": result.job_id, "run_id": result.run_id})
    old_text, new_text = canonical_json(old), canonical_json(new)
    conn.execute(insert(MediaLifecycleEvent).values(
        media_id=media_id, event_type=event_type, old_value=old_text, new_value=new_text, source=ACTOR,
        details=details, created_at=now))
    conn.execute(insert(AuditLog).values(
        actor=ACTOR, action=event_type, entity_type="media", entity_id=str(media_id), old_value=old_text,
        new_value=new_text, details=details, job_id=result.job_id, created_at=now))


def persist_result(engine: Engine, media_id: int, result: StageResult, *, write_tags: bool = True,
                   write_quality_status: bool = True, lock_retries: int = 5) -> dict[str, Any]:
    """Write one stage result in one transaction; returns what changed (for metadata and logs)."""
    now = _naive(result.ran_at)
    out = result.output
    policy_key = "ollama.policy_flags"

    def work(conn: Connection) -> dict[str, Any]:
        media = _lock_media(conn, media_id)
        keys = list(out.meta) + ["ollama.model", "ollama.version", "ollama.last_run_at", policy_key]
        old = _meta_values(conn, media_id, keys)
        changed: list[str] = []
        if out.policy is not None:
            before = loads_or_none(old.get(policy_key))
            old_outcome = before.get("outcome") if isinstance(before, dict) else None
            if old_outcome != out.policy.outcome:
                _record_change(conn, media_id, "policy_changed", old_outcome, out.policy.outcome, result, now)
        for key, value in sorted(out.meta.items()):
            if _write_meta(conn, media_id, key, canonical_json(value), old, now):
                changed.append(key)
        provenance = {
            "ollama.model": _merge_map(old.get("ollama.model"), result.stage, result.model),
            "ollama.version": _merge_map(old.get("ollama.version"), result.stage, result.version),
            "ollama.last_run_at": _merge_map(old.get("ollama.last_run_at"), result.stage, iso(result.ran_at)),
        }
        for key, text in provenance.items():
            if _write_meta(conn, media_id, key, text, old, now):
                changed.append(key)
        tags = None
        if out.tags is not None and write_tags:
            tags = _apply_tags(conn, media_id, out.tags, now)
        quality_changed = False
        if out.quality is not None and write_quality_status:
            old_q = {"status": media["quality_status"], "score": media["quality_score"]}
            new_q = {"status": out.quality.status, "score": out.quality.score}
            if old_q != new_q:
                conn.execute(update(Media).where(Media.id == media_id).values(
                    quality_status=out.quality.status, quality_score=out.quality.score, updated_at=now))
                _record_change(conn, media_id, "quality_changed", old_q, new_q, result, now)
                quality_changed = True
        m = result.metrics
        _upsert(conn, OllamaStageResult.__table__, {
            "media_id": media_id, "stage": result.stage, "status": "ok", "fingerprint": result.fingerprint,
            "model": result.model, "model_digest": result.model_digest, "version": result.version,
            "error_channel": None, "error_code": None, "error_message": None, "retryable": None,
            "prompt_eval_count": m.prompt_eval_count, "eval_count": m.eval_count,
            "total_duration_ms": m.total_duration_ms, "load_duration_ms": m.load_duration_ms,
            "duration_ms": m.wall_ms, "job_id": result.job_id, "run_id": result.run_id,
            "last_success_at": now, "updated_at": now,
        }, ["media_id", "stage"], [
            "status", "fingerprint", "model", "model_digest", "version", "error_channel", "error_code",
            "error_message", "retryable", "prompt_eval_count", "eval_count", "total_duration_ms",
            "load_duration_ms", "duration_ms", "job_id", "run_id", "last_success_at", "updated_at"])
        return {"changed_keys": changed, "tags": tags, "quality_changed": quality_changed}

    return with_retry(engine, work, retries=lock_retries, what=f"persist {result.stage} for media {media_id}")


def record_stage_failure(engine: Engine, media_id: int, stage: str, error: OllamaPipelineError, *,
                         model: str | None = None, job_id: int | None = None, run_id: str | None = None,
                         lock_retries: int = 5) -> None:
    """Remember that a stage failed for an item; media_meta and earlier results stay as they were."""
    now = _naive(datetime.now(UTC))

    def work(conn: Connection) -> None:
        if conn.execute(select(Media.id).where(Media.id == media_id)).first() is None:
            return
        existing = conn.execute(select(OllamaStageResult.media_id).where(
            OllamaStageResult.media_id == media_id, OllamaStageResult.stage == stage)).first()
        values = {"status": "failed", "error_channel": error.channel, "error_code": error.code,
                  "error_message": error.message[:2000], "retryable": error.retryable, "job_id": job_id,
                  "run_id": run_id, "updated_at": now}
        if existing:
            conn.execute(update(OllamaStageResult).where(OllamaStageResult.media_id == media_id,
                                                         OllamaStageResult.stage == stage).values(**values))
        else:
            conn.execute(insert(OllamaStageResult).values(media_id=media_id, stage=stage, model=model, **values))

    with_retry(engine, work, retries=lock_retries, what=f"record failure of {stage} for media {media_id}")


# ---- media problems: files the pipeline cannot use (the list to fix) ------------------------------

MEDIA_STAGE = "media"  # the ollama_stage_results row of an item's file itself (the `media` asset)


def record_media_problem(engine: Engine, media_id: int, error: OllamaPipelineError, *, status: str,
                         signature: str, run_id: str | None = None, job_id: int | None = None,
                         lock_retries: int = 5) -> None:
    """Remember what is wrong with an item's file (status failed, or skipped for an unsupported type) and
    the signature of the file and row it was seen with; written only when something differs."""
    now = _naive(datetime.now(UTC))

    def work(conn: Connection) -> None:
        if conn.execute(select(Media.id).where(Media.id == media_id)).first() is None:
            return
        old = conn.execute(select(OllamaStageResult.status, OllamaStageResult.error_code,
                                  OllamaStageResult.fingerprint).where(
            OllamaStageResult.media_id == media_id, OllamaStageResult.stage == MEDIA_STAGE)).first()
        if old is not None and tuple(old) == (status, error.code, signature):
            return
        _upsert(conn, OllamaStageResult.__table__, {
            "media_id": media_id, "stage": MEDIA_STAGE, "status": status, "fingerprint": signature,
            "error_channel": error.channel, "error_code": error.code, "error_message": error.message[:2000],
            "retryable": False, "job_id": job_id, "run_id": run_id, "updated_at": now,
        }, ["media_id", "stage"], ["status", "fingerprint", "error_channel", "error_code", "error_message",
                                   "retryable", "job_id", "run_id", "updated_at"])

    with_retry(engine, work, retries=lock_retries, what=f"record media problem of media {media_id}")


def clear_media_problem(engine: Engine, media_id: int, *, lock_retries: int = 5) -> None:
    """The item's file is usable again: it leaves the list to fix."""

    def work(conn: Connection) -> None:
        conn.execute(delete(OllamaStageResult).where(OllamaStageResult.media_id == media_id,
                                                     OllamaStageResult.stage == MEDIA_STAGE))

    with_retry(engine, work, retries=lock_retries, what=f"clear media problem of media {media_id}")


def media_problems(engine: Engine, *, limit: int = 100) -> list[dict[str, Any]]:
    """Items whose file is missing, unreadable or of an unsupported type, lowest media id first."""
    q = (select(OllamaStageResult.media_id, Media.path, Media.type, OllamaStageResult.status,
                OllamaStageResult.error_code, OllamaStageResult.error_message, OllamaStageResult.updated_at)
         .join(Media, Media.id == OllamaStageResult.media_id)
         .where(OllamaStageResult.stage == MEDIA_STAGE).order_by(OllamaStageResult.media_id).limit(limit))
    with read_connection(engine) as conn:
        return [dict(r) for r in conn.execute(q).mappings()]
