"""Reads of the seed's inputs (§1) and the one write path for results (§2): `persist_ollama_result`.

Everything the assets and the job processor store goes through `persist_ollama_result` (success) or
`record_stage_failure` (failure, which never touches media_meta). Each is one transaction; on SQLite a
locked database is retried with backoff before it becomes `persistence.locked`.

Gallery tables are used as discovered (`gallery.py`): statements are built from the reflected tables and
name only columns that are there. `media_meta` is either upserted per (media_id, key) or, in an append-only
log such as LocalSupervisor's, read newest-row-per-key and appended to only when a value changed. A value a
person changed after the pipeline wrote it is kept (`human_edited`) unless the write is forced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    and_,
    delete,
    exists,
    func,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from ollama_pipeline.core.db.engine import read_connection
from ollama_pipeline.core.db.gallery import Gallery, GalleryTable, gallery_for, require_gallery
from ollama_pipeline.core.db.models import OllamaMediaIndex, OllamaStageResult, OllamaTagLink, OllamaValue
from ollama_pipeline.core.db.values import (
    LOCALSUPERVISOR_PROVENANCE,
    STAGE_VERSION,
    decode_text,
    encode_values,
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


# ---- small helpers -------------------------------------------------------------------------------


def _ts(col: Column[Any], now: datetime) -> Any:
    """A timestamp in the column's own form: datetime for date/time columns, ISO text otherwise."""
    return now if isinstance(col.type, DateTime) else iso(now)


def _row(t: GalleryTable, values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Logical values -> physical column values, keeping only columns that exist and may be written;
    timestamp columns (created_at, updated_at) are filled in their own form."""
    out: dict[str, Any] = {}
    for logical, value in values.items():
        if t.may_write(logical):
            out[t.c(logical).name] = value
    for logical in ("created_at", "updated_at"):
        if logical not in values and t.may_write(logical):
            out[t.c(logical).name] = _ts(t.c(logical), now)
    return out


def _is_set(col: Column[Any]) -> Any:
    """col is true: a Boolean column or a 0/1 integer column."""
    return col.is_(True) if isinstance(col.type, Boolean) else col == 1


def _python_type(col: Column[Any] | None) -> type | None:
    try:
        return None if col is None else col.type.python_type
    except NotImplementedError:
        return None


def _seed(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() and len(text) < 20 else None


def _meta_latest(g: Gallery, media_ids: list[int] | None = None, keys: list[str] | None = None) -> Any:
    """A selectable (media_id, key, value[, source]) of the current media_meta value per item and key."""
    t = g["media_meta"]
    cols = [t.c("media_id").label("media_id"), t.c("key").label("key"), t.c("value").label("value")]
    if t.has("source"):
        cols.append(t.c("source").label("source"))
    conds = []
    if media_ids is not None:
        conds.append(t.c("media_id").in_(media_ids))
    if keys is not None:
        conds.append(t.c("key").in_(keys))
    if g.meta_layout == "upsert":
        return select(*cols).where(*conds)
    newest = (select(func.max(t.c("id")).label("id")).where(*conds)
              .group_by(t.c("media_id"), t.c("key")).subquery())
    return select(*cols).join(newest, newest.c.id == t.c("id"))


def meta_values(conn: Connection, g: Gallery, media_ids: list[int] | None = None,
                keys: list[str] | None = None) -> dict[int, dict[str, str | None]]:
    """The current media_meta text per item and key (newest row per key in an append-only log)."""
    out: dict[int, dict[str, str | None]] = {}
    for r in conn.execute(_meta_latest(g, media_ids, keys)).mappings():
        out.setdefault(int(r["media_id"]) if g.integer_ids else r["media_id"], {})[r["key"]] = r["value"]
    return out


def values_table(engine: Engine) -> Any:
    """What the export, report and web UI read as (media_id, key, value JSON): media_meta itself when the
    gallery stores the pipeline's JSON in upsert form, else the pipeline's copy in ollama_values."""
    g = gallery_for(engine)
    if g.value_format == "json" and g.meta_layout == "upsert" and not g.text_keys:
        t = g["media_meta"]
        if all(t.c(k).name == k for k in ("media_id", "key", "value")):
            return t.table  # the table itself: its indexes serve the readers' filters directly
        return select(t.c("media_id").label("media_id"), t.c("key").label("key"),
                      t.c("value").label("value")).subquery("meta_values")
    v = OllamaValue.__table__
    return select(v.c.media_id, v.c.key, v.c.value).where(v.c.value.is_not(None)).subquery("meta_values")


# ---- reads (§1) ----------------------------------------------------------------------------------

_MEDIA_FIELDS = ("type", "width", "height", "rating", "has_nsfw", "hash", "status", "quality_status",
                 "quality_score")


def load_media_rows(conn: Connection, media_ids: Iterable[int], g: Gallery | None = None) -> dict[int, MediaRow]:
    g = g or gallery_for(conn.engine)
    m = g["media"]
    ids = list(media_ids)
    if not ids:
        return {}
    fields = ["id", "path"] + [f for f in _MEDIA_FIELDS if m.has(f)]
    rows = conn.execute(select(*[m.c(f).label(f) for f in fields]).where(m.c("id").in_(ids))).mappings()
    out = {}
    reverse = {v: k for k, v in g.quality_map.items()}
    for r in rows:
        row = dict(r)
        if row.get("quality_status") in reverse:
            row["quality_status"] = reverse[row["quality_status"]]
        out[row["id"]] = MediaRow.model_validate(row)
    return out


def _written_keys(conn: Connection, media_ids: list[int]) -> dict[int, frozenset[str]]:
    """The keys the pipeline has written per item (its ollama_values rows), without their values."""
    v = OllamaValue.__table__
    out: dict[int, set[str]] = {}
    for media_id, key in conn.execute(select(v.c.media_id, v.c.key).where(v.c.media_id.in_(media_ids))):
        out.setdefault(media_id, set()).add(key)
    return {mid: frozenset(keys) for mid, keys in out.items()}


def _pipeline_values(conn: Connection, media_ids: list[int]) -> dict[int, dict[str, OllamaValueRow]]:
    v = OllamaValue.__table__
    out: dict[int, dict[str, OllamaValueRow]] = {}
    for r in conn.execute(select(v.c.media_id, v.c.key, v.c.value, v.c.written).where(v.c.media_id.in_(media_ids))):
        out.setdefault(r[0], {})[r[1]] = OllamaValueRow(r[2], r[3])
    return out


class OllamaValueRow(tuple):  # (value, written)
    def __new__(cls, value: str | None, written: str | None) -> OllamaValueRow:
        return super().__new__(cls, (value, written))

    @property
    def value(self) -> str | None:
        return self[0]

    @property
    def written(self) -> str | None:
        return self[1]


def load_inputs_many(engine: Engine, media_ids: Iterable[int]) -> dict[int, StageInputs]:
    """Media row, prompt, tags, scan results and media_meta for many items in a few queries."""
    ids = sorted(set(media_ids))
    if not ids:
        return {}
    g = require_gallery(engine)
    result: dict[int, StageInputs] = {}
    with read_connection(engine) as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            media = load_media_rows(conn, chunk, g)
            prompts: dict[int, PromptRow] = {}
            p = g.t("prompts")
            if p is not None:
                fields = [f for f in ("prompt", "negative_prompt", "model", "sampler", "seed", "size", "width",
                                      "height") if p.has(f)]
                order = p.c("id") if p.has("id") else p.c("media_id")
                q = (select(p.c("media_id").label("media_id"), *[p.c(f).label(f) for f in fields])
                     .where(p.c("media_id").in_(chunk)).order_by(order))
                for r in conn.execute(q).mappings():
                    row = dict(r)
                    size = row.get("size")
                    if size is None and row.get("width") and row.get("height"):
                        size = f"{row['width']}x{row['height']}"
                    prompts[r["media_id"]] = PromptRow(
                        prompt=row.get("prompt"), negative_prompt=row.get("negative_prompt"),
                        model=row.get("model"), sampler=row.get("sampler"), seed=_seed(row.get("seed")),
                        size=None if size is None else str(size))
            tags: dict[int, list[TagRow]] = {}
            t, mt = g.t("tags"), g.t("media_tags")
            if t is not None and mt is not None:
                extra = [c for c in ("locked", "confidence", "weight") if mt.has(c)]
                cols = [mt.c("media_id").label("media_id"), t.c("name").label("name"),
                        *[mt.c(c).label(c) for c in extra]]
                if t.has("locked"):
                    cols.append(t.c("locked").label("tag_locked"))
                if g.tag_origin:
                    cols.append(mt.table.c[g.tag_origin].label("source"))
                else:
                    owned = OllamaTagLink.__table__
                    cols.append(exists().where(owned.c.media_id == mt.c("media_id"),
                                               owned.c.tag_id == mt.c("tag_id")).label("owned"))
                q = (select(*cols).join(t.table, t.c("id") == mt.c("tag_id"))
                     .where(mt.c("media_id").in_(chunk)).order_by(mt.c("media_id"), t.c("name")))
                for r in conn.execute(q).mappings():
                    source = r.get("source") if g.tag_origin else ("ollama" if r.get("owned") else None)
                    tags.setdefault(r["media_id"], []).append(TagRow(
                        name=r["name"], locked=bool(r.get("locked")) or bool(r.get("tag_locked")),
                        confidence=r.get("confidence"), weight=r.get("weight"), source=source))
            scans: dict[int, list[ScanRow]] = {}
            s = g.t("scan_results")
            if s is not None:
                fields = [f for f in ("scanner", "nsfw_score", "flags") if s.has(f)]
                order = s.c("id") if s.has("id") else s.c("media_id")
                q2 = (select(s.c("media_id").label("media_id"), *[s.c(f).label(f) for f in fields])
                      .where(s.c("media_id").in_(chunk)).order_by(order))
                for r in conn.execute(q2).mappings():
                    flags = loads_or_none(r.get("flags"))
                    if isinstance(flags, dict):
                        flags = [k for k, v in flags.items() if v]
                    scans.setdefault(r["media_id"], []).append(ScanRow(
                        scanner=r.get("scanner"), nsfw_score=r.get("nsfw_score"),
                        flags=[str(f) for f in flags] if isinstance(flags, list) else []))
            meta: dict[int, dict[str, Any]] = {}
            current = meta_values(conn, g, chunk)
            own = _pipeline_values(conn, chunk) if g.value_format != "json" or g.text_keys else {}
            written = {mid: frozenset(rows) for mid, rows in own.items()} if own else _written_keys(conn, chunk)
            for mid in chunk:
                values: dict[str, Any] = {}
                for key, text in current.get(mid, {}).items():
                    values[key] = loads_or_none(text) if g.value_format == "json" and key not in g.text_keys \
                        else decode_text(text)
                for key, row in own.get(mid, {}).items():
                    if row.value is None:
                        continue
                    gallery_text = current.get(mid, {}).get(key)
                    if gallery_text is None or gallery_text == row.written:
                        values[key] = loads_or_none(row.value)  # the full value behind the gallery's form
                    elif key in _TEXT_VALUE_KEYS:
                        values[key] = {"text": gallery_text}  # a person's edit, as the stage reads it
                for key in _TEXT_VALUE_KEYS:
                    if isinstance(values.get(key), str):
                        values[key] = {"text": values[key]}
                meta[mid] = values
            for mid, row in media.items():
                result[mid] = StageInputs(media=row, prompt=prompts.get(mid), tags=tags.get(mid, []),
                                          scans=scans.get(mid, []), meta=meta.get(mid, {}),
                                          written_keys=written.get(mid, frozenset()))
    return result


_TEXT_VALUE_KEYS = ("ollama.caption", "ollama.description", "ollama.title")


def load_inputs(engine: Engine, media_id: int) -> StageInputs:
    inputs = load_inputs_many(engine, [media_id])
    if media_id not in inputs:
        raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
    return inputs[media_id]


def tag_vocabulary(engine: Engine, *, exclude_source: str | None = None) -> list[str]:
    """Tag names of the library; with exclude_source, only tags linked at least once by another source
    (e.g. the tags people and imports use, not the ones only ollama wrote)."""
    g = gallery_for(engine)
    t, mt = g.t("tags"), g.t("media_tags")
    if t is None:
        return []
    with read_connection(engine) as conn:
        if exclude_source is None or mt is None:
            return sorted({r[0] for r in conn.execute(select(t.c("name")))})
        if g.tag_origin:
            origin = mt.table.c[g.tag_origin]
            not_ours = or_(origin.is_(None), origin != exclude_source)
        else:
            owned = OllamaTagLink.__table__
            not_ours = ~exists().where(owned.c.media_id == mt.c("media_id"), owned.c.tag_id == mt.c("tag_id"))
        if mt.has("locked"):
            not_ours = or_(not_ours, _is_set(mt.c("locked")))
        q = (select(t.c("name")).join(mt.table, t.c("id") == mt.c("tag_id")).where(not_ours).distinct())
        return sorted({r[0] for r in conn.execute(q)})


DHASH_PAGE = 50_000  # rows per page when the duplicate stage reads the dHash index


def iter_dhash_pages(engine: Engine, page: int = DHASH_PAGE) -> Iterator[list[tuple[Any, str]]]:
    """Every (media_id, dhash) of ollama_media_index, in pages ordered by media id (keyset pagination on the
    primary key): the only library-wide read of the duplicate stage; paths and prompts are asked per batch."""
    t = OllamaMediaIndex.__table__
    last: Any = None
    with read_connection(engine) as conn:
        while True:
            q = select(t.c.media_id, t.c.dhash).where(t.c.dhash.is_not(None)).order_by(t.c.media_id).limit(page)
            if last is not None:
                q = q.where(t.c.media_id > last)
            rows = [(r[0], r[1]) for r in conn.execute(q)]
            if not rows:
                return
            yield rows
            last = rows[-1][0]


def _chunks(values: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def dhashes_of(engine: Engine, media_ids: Iterable[Any]) -> dict[Any, str]:
    """The stored dHash of each of media_ids that has one (by primary key)."""
    t = OllamaMediaIndex.__table__
    out: dict[Any, str] = {}
    with read_connection(engine) as conn:
        for chunk in _chunks(list(media_ids)):
            out.update((r[0], r[1]) for r in conn.execute(
                select(t.c.media_id, t.c.dhash).where(t.c.media_id.in_(chunk), t.c.dhash.is_not(None))))
    return out


def media_paths(engine: Engine, media_ids: Iterable[Any]) -> dict[Any, str]:
    """The gallery path of each of media_ids that still exists (by primary key)."""
    m = gallery_for(engine)["media"]
    out: dict[Any, str] = {}
    with read_connection(engine) as conn:
        for chunk in _chunks(list(media_ids)):
            out.update((r[0], r[1]) for r in conn.execute(select(m.c("id"), m.c("path")).where(m.c("id").in_(chunk))))
    return out


def _first_prompts(conn: Connection, p: GalleryTable, where: Any) -> dict[Any, tuple[Any, str | None]]:
    """(raw seed, prompt) of the first prompt row (lowest id) of each media item the condition selects."""
    out: dict[Any, tuple[int, Any, str | None]] = {}
    for r in conn.execute(select(p.c("id"), p.c("media_id"), p.c("seed"), p.c("prompt")).where(where)):
        if r[1] not in out or r[0] < out[r[1]][0]:
            out[r[1]] = (r[0], r[2], r[3])
    return {media_id: (seed, prompt) for media_id, (_pid, seed, prompt) in out.items()}


def generation_peers(engine: Engine, media_ids: Iterable[Any]) -> dict[Any, list[Any]]:
    """For each of media_ids with a generation (seed and prompt of its first prompt row): the other items
    whose first prompt row has the same seed and prompt. Two bounded queries: the items' own prompts by
    media id, then the rows with one of their seeds."""
    g = gallery_for(engine)
    p = g.t("prompts")
    if p is None or not (p.has("id") and p.has("seed") and p.has("prompt")):
        return {}
    ids = list(media_ids)
    with read_connection(engine) as conn:
        own: dict[Any, tuple[Any, str | None]] = {}
        for chunk in _chunks(ids):
            own.update(_first_prompts(conn, p, p.c("media_id").in_(chunk)))
        generation = {mid: (_seed(seed), prompt.strip()) for mid, (seed, prompt) in own.items()
                      if _seed(seed) is not None and prompt and prompt.strip()}
        seeds = sorted({raw for mid, (raw, _prompt) in own.items() if mid in generation}, key=str)
        others: dict[Any, tuple[Any, str | None]] = {}
        for chunk in _chunks(seeds):
            others.update(_first_prompts(conn, p, p.c("seed").in_(chunk)))
    by_generation: dict[tuple[int | None, str], list[Any]] = {}
    for mid, (seed, prompt) in sorted(others.items(), key=lambda kv: str(kv[0])):
        if _seed(seed) is not None and prompt and prompt.strip():
            by_generation.setdefault((_seed(seed), prompt.strip()), []).append(mid)
    return {mid: [o for o in by_generation.get(gen, []) if o != mid] for mid, gen in generation.items()}


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


def _lock_media(conn: Connection, g: Gallery, media_id: int) -> dict[str, Any]:
    m = g["media"]
    cols = [m.c("id").label("id")] + [m.c(f).label(f) for f in ("quality_status", "quality_score") if m.has(f)]
    q = select(*cols).where(m.c("id") == media_id)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).mappings().first()
    if row is None:
        raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
    return dict(row)


def _write_gallery_meta(conn: Connection, g: Gallery, media_id: int, key: str, text: str,
                        current: dict[str, str | None], sources: dict[str, str | None], now: datetime) -> None:
    t = g["media_meta"]
    values = {"media_id": media_id, "key": key, "value": text, "source": ACTOR_SOURCE}
    if g.meta_layout == "append_log":
        conn.execute(insert(t.table).values(**_row(t, values, now)))
        return
    row = _row(t, values, now)
    if key in current:
        conn.execute(update(t.table).where(t.c("media_id") == media_id, t.c("key") == key)
                     .values(**{k: v for k, v in row.items() if k not in (t.c("media_id").name, t.c("key").name)}))
    else:
        conn.execute(insert(t.table).values(**row))


ACTOR_SOURCE = "ollama"


def _is_human_edit(g: Gallery, key: str, current: dict[str, str | None], sources: dict[str, str | None],
                   own: dict[str, OllamaValueRow], new_text: str) -> bool:
    """A person changed this key after the pipeline wrote it (or wrote it first): keep their value."""
    if key not in current or current[key] == new_text:
        return False
    if g["media_meta"].has("source"):
        return sources.get(key) not in (ACTOR_SOURCE, ACTOR)
    record = own.get(key)
    return record is not None and record.written is not None and current[key] != record.written


def _merge_map(old_text: str | None, stage: str, value: Any) -> str:
    old = loads_or_none(old_text)
    merged = dict(old) if isinstance(old, dict) else {}
    merged[stage] = value
    return canonical_json(merged)


def _tag_ids(conn: Connection, g: Gallery, names: list[str], now: datetime) -> dict[str, tuple[int, bool]]:
    """Tag ids (and their locked flag) for names, creating the tags that do not exist yet."""
    t = g["tags"]
    if not names:
        return {}
    typed = g.tag_unique == ("name", "type")
    conds = [t.c("name").in_(names)]
    if typed:
        conds.append(t.c("type") == TAG_TYPE)
    locked = t.c("locked") if t.has("locked") else None
    cols = [t.c("name"), t.c("id")] + ([locked] if locked is not None else [])
    found = {r[0]: (int(r[1]), bool(r[2]) if locked is not None else False)
             for r in conn.execute(select(*cols).where(*conds))}
    for name in names:
        if name in found:
            continue
        values = {"name": name, **({"type": TAG_TYPE} if typed or t.has("type") else {})}
        row = {t.c(k).name: v for k, v in values.items()}
        if t.may_write("created_at"):
            row[t.c("created_at").name] = _ts(t.c("created_at"), now)
        dialect = conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            ins = (pg_insert(t.table) if dialect == "postgresql" else sqlite_insert(t.table)).values(**row)
            elements = [t.c("name").name] + ([t.c("type").name] if typed else [])
            conn.execute(ins.on_conflict_do_nothing(index_elements=elements))
        else:
            conn.execute(insert(t.table).values(**row))
        q = select(t.c("id")).where(t.c("name") == name, *([t.c("type") == TAG_TYPE] if typed else []))
        found[name] = (int(conn.execute(q).scalar_one()), False)
    return found


TAG_TYPE = "content"  # LocalSupervisor's default tag type; the pipeline's tags describe content


def _apply_tags(conn: Connection, g: Gallery, media_id: int, suggestions: list[TagSuggestion],
                now: datetime) -> dict[str, int]:
    """Write ollama tags: locked links, links of locked tags and links of people are never touched; stale
    links the pipeline made are removed."""
    t, mt = g["tags"], g["media_tags"]
    owned_t = OllamaTagLink.__table__
    cols = [t.c("name").label("name"), mt.c("tag_id").label("tag_id")]
    for c in ("locked", "confidence", "weight"):
        if mt.has(c):
            cols.append(mt.c(c).label(c))
    if t.has("locked"):
        cols.append(t.c("locked").label("tag_locked"))
    if g.tag_origin:
        cols.append(mt.table.c[g.tag_origin].label("source"))
    else:
        cols.append(exists().where(owned_t.c.media_id == mt.c("media_id"),
                                   owned_t.c.tag_id == mt.c("tag_id")).label("owned"))
    q = select(*cols).join(t.table, t.c("id") == mt.c("tag_id")).where(mt.c("media_id") == media_id)
    if g.tag_unique == ("name", "type"):
        q = q.order_by((t.c("type") == TAG_TYPE).desc())  # our own type first when names repeat
    existing: dict[str, dict[str, Any]] = {}
    for r in conn.execute(q).mappings():
        existing.setdefault(r["name"], dict(r))

    def ours(link: dict[str, Any]) -> bool:
        return (link.get("source") == ACTOR_SOURCE) if g.tag_origin else bool(link.get("owned"))

    def locked(link: dict[str, Any]) -> bool:
        return bool(link.get("locked")) or bool(link.get("tag_locked"))

    wanted = {s.name: s for s in suggestions}
    ids = _tag_ids(conn, g, sorted(n for n in wanted if n not in existing), now)
    counts = {"added": 0, "updated": 0, "removed": 0, "kept_locked_or_human": 0}
    for name, s in sorted(wanted.items()):
        link = existing.get(name)
        if link is None:
            tag_id, tag_locked = ids[name]
            if tag_locked:
                counts["kept_locked_or_human"] += 1
                continue
            values: dict[str, Any] = {"media_id": media_id, "tag_id": tag_id, "confidence": s.confidence,
                                      "weight": s.weight}
            row = _row(mt, values, now)
            if g.tag_origin:
                row[g.tag_origin] = ACTOR_SOURCE
            if mt.has("locked"):
                row[mt.c("locked").name] = False if isinstance(mt.c("locked").type, Boolean) else 0
            conn.execute(insert(mt.table).values(**row))
            if not g.tag_origin:
                conn.execute(insert(owned_t).values(media_id=media_id, tag_id=tag_id, created_at=now))
            counts["added"] += 1
        elif locked(link) or not ours(link):
            counts["kept_locked_or_human"] += 1
        else:
            new = {k: v for k, v in (("confidence", s.confidence), ("weight", s.weight)) if mt.may_write(k)}
            if any(link.get(k) != v for k, v in new.items()):
                conn.execute(update(mt.table).where(mt.c("media_id") == media_id, mt.c("tag_id") == link["tag_id"])
                             .values(**{mt.c(k).name: v for k, v in new.items()}))
                counts["updated"] += 1
    for name, link in existing.items():
        if name not in wanted and ours(link) and not locked(link):
            conn.execute(delete(mt.table).where(mt.c("media_id") == media_id, mt.c("tag_id") == link["tag_id"]))
            if not g.tag_origin:
                conn.execute(delete(owned_t).where(owned_t.c.media_id == media_id,
                                                   owned_t.c.tag_id == link["tag_id"]))
            counts["removed"] += 1
    return counts


def _record_change(conn: Connection, g: Gallery, media_id: int, kind: str, old: Any, new: Any,
                   result: StageResult, now: datetime, *, quality: dict[str, Any] | None = None) -> None:
    """A lifecycle event and an audit row, in the gallery's own columns (both tables are optional)."""
    details = {"model": result.model, "version": result.version, "stage": result.stage,
               "job_id": result.job_id, "run_id": result.run_id}
    old_text, new_text = canonical_json(old), canonical_json(new)
    ev = g.t("media_lifecycle_events")
    if ev is not None:
        event_type = kind
        if g.profile == "localsupervisor":
            event_type = "quality_eval"  # its event types: status_change, delete_request, quality_eval
        values: dict[str, Any] = {
            "media_id": media_id, "event_type": event_type, "old_value": old_text, "new_value": new_text,
            "source": ACTOR, "details": canonical_json(details), "actor": ACTOR, "rule": result.stage,
            "reason": kind}
        if quality is not None:
            values.update(from_status=quality.get("from"), to_status=quality.get("to"),
                          quality_status=quality.get("to"), quality_score=quality.get("score"))
        conn.execute(insert(ev.table).values(**_row(ev, values, now)))
    au = g.t("audit_log")
    if au is not None:
        entity_id: Any = media_id if _python_type(au.cols.get("entity_id")) is int else str(media_id)
        values = {"action": f"ollama.{kind}" if g.profile == "localsupervisor" else kind, "actor": ACTOR,
                  "entity_type": "media", "entity_id": entity_id, "old_value": old_text, "new_value": new_text,
                  "details": canonical_json(details),
                  "details_json": canonical_json({**details, "old": old, "new": new}), "actor_key": ACTOR,
                  "job_id": result.job_id}
        conn.execute(insert(au.table).values(**_row(au, values, now)))


def persist_result(engine: Engine, media_id: int, result: StageResult, *, write_tags: bool = True,
                   write_quality_status: bool = True, lock_retries: int = 5, force: bool = False) -> dict[str, Any]:
    """Write one stage result in one transaction; returns what changed (for metadata and logs).

    A key a person changed after the pipeline wrote it is left alone and named in `human_edited`, unless
    `force` (then it is overwritten; in an append-only log the person's row stays in the history)."""
    g = require_gallery(engine)
    now = _naive(result.ran_at)
    out = result.output
    policy_key = "ollama.policy_flags"
    encoded = encode_values(g.value_format, g.text_keys, out.meta)
    ls = g.value_format == "localsupervisor"
    provenance_keys = list(LOCALSUPERVISOR_PROVENANCE) if ls else ["ollama.model", "ollama.version",
                                                                     "ollama.last_run_at"]
    gallery_keys = [k for _, k, _ in encoded] + provenance_keys
    own_keys = sorted(set(gallery_keys) | set(out.meta) | {policy_key})

    def work(conn: Connection) -> dict[str, Any]:
        media = _lock_media(conn, g, media_id)
        latest = list(conn.execute(_meta_latest(g, [media_id], gallery_keys)).mappings())
        current = {r["key"]: r["value"] for r in latest}
        sources = {r["key"]: r.get("source") for r in latest}
        v = OllamaValue.__table__
        own = {r[0]: OllamaValueRow(r[1], r[2]) for r in conn.execute(
            select(v.c.key, v.c.value, v.c.written).where(v.c.media_id == media_id, v.c.key.in_(own_keys)))}
        changed: list[str] = []
        human: list[str] = []
        if out.policy is not None:
            before = loads_or_none(own[policy_key].value) if policy_key in own and own[policy_key].value else \
                loads_or_none(current.get(policy_key))
            old_outcome = before.get("outcome") if isinstance(before, dict) else None
            if old_outcome != out.policy.outcome:
                _record_change(conn, g, media_id, "policy_changed", old_outcome, out.policy.outcome, result, now)
        # (gallery key, text written there, the full value kept in ollama_values or None for a derived key)
        writes: list[tuple[str, str, str | None]] = [
            (key, text, canonical_json(out.meta[src]) if key == src else None) for src, key, text in encoded]
        maps = {key: _merge_map(own[key].value if key in own and own[key].value else current.get(key),
                                result.stage, value)
                for key, value in (("ollama.model", result.model), ("ollama.version", result.version),
                                   ("ollama.last_run_at", iso(result.ran_at)))}
        if ls:
            writes += [
                ("ollama.model", maps["ollama.model"], maps["ollama.model"]),
                ("ollama.version", maps["ollama.version"], maps["ollama.version"]),
                ("ollama.last_run_at", iso(result.ran_at), maps["ollama.last_run_at"]),
                ("ollama.stage_version", STAGE_VERSION, None),
            ]
        else:
            writes += [(key, text, text) for key, text in maps.items()]
        for key, text, full in writes:
            if _is_human_edit(g, key, current, sources, own, text) and not force:
                human.append(key)
            elif current.get(key) != text:
                _write_gallery_meta(conn, g, media_id, key, text, current, sources, now)
                changed.append(key)
            record = own.get(key)
            if record is None or record.written != text or record.value != full:
                _upsert(conn, v, {"media_id": media_id, "key": key, "value": full, "written": text,
                                  "updated_at": now}, ["media_id", "key"], ["value", "written", "updated_at"])
        written_keys = {k for k, _, _ in writes}
        for src in out.meta:
            if src not in written_keys:  # a value without a gallery key of its own name
                full = canonical_json(out.meta[src])
                if own.get(src, OllamaValueRow(None, None)).value != full:
                    _upsert(conn, v, {"media_id": media_id, "key": src, "value": full, "written": None,
                                      "updated_at": now}, ["media_id", "key"], ["value", "updated_at"])
        tags = None
        if out.tags is not None and write_tags and g.t("tags") is not None and g.t("media_tags") is not None:
            tags = _apply_tags(conn, g, media_id, out.tags, now)
        quality_changed = False
        m = g["media"]
        if out.quality is not None and write_quality_status and m.may_write("quality_status"):
            status = g.quality_map.get(out.quality.status, out.quality.status)
            old_q = {"status": media.get("quality_status"), "score": media.get("quality_score")}
            new_q = {"status": status, "score": out.quality.score if m.has("quality_score") else None}
            if old_q != new_q:
                conn.execute(update(m.table).where(m.c("id") == media_id).values(**_row(m, {
                    "quality_status": status, "quality_score": out.quality.score}, now)))
                _record_change(conn, g, media_id, "quality_changed", old_q, new_q, result, now,
                               quality={"from": old_q["status"], "to": status, "score": out.quality.score})
                quality_changed = True
        metrics = result.metrics
        _upsert(conn, OllamaStageResult.__table__, {
            "media_id": media_id, "stage": result.stage, "status": "ok", "fingerprint": result.fingerprint,
            "model": result.model, "model_digest": result.model_digest, "version": result.version,
            "error_channel": None, "error_code": None, "error_message": None, "retryable": None,
            "prompt_eval_count": metrics.prompt_eval_count, "eval_count": metrics.eval_count,
            "total_duration_ms": metrics.total_duration_ms, "load_duration_ms": metrics.load_duration_ms,
            "duration_ms": metrics.wall_ms, "job_id": result.job_id, "run_id": result.run_id,
            "last_success_at": now, "updated_at": now,
        }, ["media_id", "stage"], [
            "status", "fingerprint", "model", "model_digest", "version", "error_channel", "error_code",
            "error_message", "retryable", "prompt_eval_count", "eval_count", "total_duration_ms",
            "load_duration_ms", "duration_ms", "job_id", "run_id", "last_success_at", "updated_at"])
        return {"changed_keys": changed, "tags": tags, "quality_changed": quality_changed, "human_edited": human}

    return with_retry(engine, work, retries=lock_retries, what=f"persist {result.stage} for media {media_id}")


def record_stage_failure(engine: Engine, media_id: int, stage: str, error: OllamaPipelineError, *,
                         model: str | None = None, job_id: int | None = None, run_id: str | None = None,
                         lock_retries: int = 5) -> None:
    """Remember that a stage failed for an item; media_meta and earlier results stay as they were."""
    now = _naive(datetime.now(UTC))
    g = gallery_for(engine)
    m = g["media"] if "media" in g.tables else None

    def work(conn: Connection) -> None:
        if m is not None and conn.execute(select(m.c("id")).where(m.c("id") == media_id)).first() is None:
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
    m = gallery_for(engine)["media"]

    def work(conn: Connection) -> None:
        if conn.execute(select(m.c("id")).where(m.c("id") == media_id)).first() is None:
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
    m = gallery_for(engine)["media"]
    q = (select(OllamaStageResult.media_id, m.c("path").label("path"),
                (m.c("type") if m.has("type") else null()).label("type"), OllamaStageResult.status,
                OllamaStageResult.error_code, OllamaStageResult.error_message, OllamaStageResult.updated_at)
         .join(m.table, m.c("id") == OllamaStageResult.media_id)
         .where(OllamaStageResult.stage == MEDIA_STAGE).order_by(OllamaStageResult.media_id).limit(limit))
    with read_connection(engine) as conn:
        return [dict(r) for r in conn.execute(q).mappings()]
