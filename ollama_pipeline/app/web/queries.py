"""The SQL of the web UI: the gallery page (filters plus keyset paging) and everything the item page reads.

Every gallery page is one indexed range scan on `media.id` (`WHERE id > :after ORDER BY id LIMIT 49`;
integer, text or UUID ids alike: a text id's cursor compares in the column's own order)
with filters as correlated `EXISTS` sub-queries that hit primary keys or unique indexes
(`media_meta (media_id, key)`, `media_tags (media_id, tag_id)`, `ollama_stage_results (media_id, stage)`),
so a page costs the same at item 100 and at item 100,000: no OFFSET, no COUNT(*). The lists that fill the
filter drop-downs are cached for a minute. This module only reads; writes go through `ollama_pipeline.core.queue.store`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine, and_, case, exists, null, or_, select
from sqlalchemy.sql.elements import ColumnElement

from ollama_pipeline.core.db.gallery import Gallery, gallery_for
from ollama_pipeline.core.db.models import OllamaJob, OllamaStageResult
from ollama_pipeline.core.db.repository import values_table
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.jsontext import canonical_json, loads_or_none
from ollama_pipeline.core.stages import STAGES

PAGE_SIZE = 48
StageStatus = Literal["done", "failed", "stale", "never"]
STAGE_STATUSES: tuple[str, ...] = ("done", "failed", "stale", "never")
CARD_KEYS = ("ollama.title", "ollama.caption", "ollama.quality", "ollama.policy_flags")
SEARCH_KEYS = ("ollama.caption", "ollama.title")


@dataclass(frozen=True)
class GalleryFilters:
    """What the gallery's filter form asks for; empty strings mean 'any'."""

    quality: str = ""
    policy: str = ""
    tag: str = ""
    model: str = ""
    stage: str = ""
    stage_status: str = ""
    q: str = ""

    def active(self) -> dict[str, str]:
        """The filters that are set, for links that keep them across pages."""
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class GalleryCard:
    """One thumbnail of the gallery with the values shown under it."""

    id: MediaId
    path: str
    quality_status: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GalleryPage:
    """One page of cards plus the keyset cursors to the next and previous page."""

    cards: list[GalleryCard]
    next_after: MediaId | None
    prev_before: MediaId | None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _json_fragment(key: str, value: str) -> str:
    """The canonical-JSON text `"key":"value"` as it appears inside a stored media_meta value."""
    return f"%{_like_escape(canonical_json(key))}:{_like_escape(canonical_json(value))}%"


def _meta_exists(g: Gallery, vt: Any, key: str, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(vt.c.media_id == g["media"].c("id"), vt.c.key == key, condition)


def current_versions() -> dict[str, str]:
    """The registry's current version per stage (what a result must carry not to be stale)."""
    return {job_type: stage.version for job_type, stage in STAGES.items()}


def _stage_condition(g: Gallery, stage: str, status: str) -> ColumnElement[bool] | None:
    if stage not in STAGES or status not in STAGE_STATUSES:
        return None
    version = STAGES[stage].version
    same = and_(OllamaStageResult.media_id == g["media"].c("id"), OllamaStageResult.stage == stage)
    if status == "never":
        return ~exists().where(same)
    if status == "failed":
        return exists().where(same, OllamaStageResult.status == "failed")
    if status == "done":
        return exists().where(same, OllamaStageResult.status == "ok", OllamaStageResult.version == version)
    return exists().where(same, OllamaStageResult.status == "ok",
                          or_(OllamaStageResult.version.is_(None), OllamaStageResult.version != version))


def filter_conditions(f: GalleryFilters, engine: Engine) -> list[ColumnElement[bool]]:
    """The WHERE conditions of a filter set (each one an indexed EXISTS or a column test on media)."""
    g = gallery_for(engine)
    vt = values_table(engine)
    media_id = g["media"].c("id")
    conds: list[ColumnElement[bool]] = []
    if f.quality:
        verdict = _meta_exists(g, vt, "ollama.quality", vt.c.value.like(_json_fragment("verdict", f.quality),
                                                                        escape="\\"))
        m = g["media"]
        conds.append(or_(m.c("quality_status") == f.quality, verdict) if m.has("quality_status") else verdict)
    if f.policy:
        conds.append(_meta_exists(g, vt, "ollama.policy_flags", or_(
            vt.c.value.like(_json_fragment("outcome", f.policy), escape="\\"),
            vt.c.value.like(_json_fragment("name", f.policy), escape="\\"))))
    t, mt = g.t("tags"), g.t("media_tags")
    if f.tag and t is not None and mt is not None:
        conds.append(exists().where(mt.c("media_id") == media_id, mt.c("tag_id") == t.c("id"), t.c("name") == f.tag))
    if f.model:
        if f.stage in STAGES:
            conds.append(exists().where(OllamaStageResult.media_id == media_id,
                                        OllamaStageResult.stage == f.stage, OllamaStageResult.model == f.model))
        else:
            conds.append(exists().where(OllamaStageResult.media_id == media_id, OllamaStageResult.model == f.model))
    if f.stage and f.stage_status:
        cond = _stage_condition(g, f.stage, f.stage_status)
        if cond is not None:
            conds.append(cond)
    if f.q:
        pattern = f"%{_like_escape(f.q)}%"
        conds.append(exists().where(vt.c.media_id == media_id, vt.c.key.in_(SEARCH_KEYS),
                                    vt.c.value.ilike(pattern, escape="\\")))
    return conds


def gallery_page(engine: Engine, f: GalleryFilters, *, after: MediaId | None = None,
                 before: MediaId | None = None,
                 limit: int = PAGE_SIZE) -> GalleryPage:
    """One page in media-id order: `after` pages forward, `before` pages back (keyset, never OFFSET).

    One range scan for the page (limit + 1 rows tell whether more follow in that direction) and one read
    of the card values of the page's ids. The other direction is known from the cursor itself: a page
    reached with `after` has items before it, one reached with `before` has items after it, so a rare
    filter never costs a second scan.
    """
    conds = filter_conditions(f, engine)
    g = gallery_for(engine)
    m = g["media"]
    mid = m.c("id")
    vt = values_table(engine)
    q = select(mid, m.c("path"), m.c("quality_status") if m.has("quality_status") else null()).where(*conds)
    backwards = before is not None
    if backwards:
        q = q.where(mid < before).order_by(mid.desc())
    else:
        q = (q.where(mid > after) if after is not None else q).order_by(mid)
    with engine.connect() as conn:
        rows = list(conn.execute(q.limit(limit + 1)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        if backwards:
            rows.reverse()
        ids: list[MediaId] = [r[0] for r in rows]
        if not ids:
            return GalleryPage(cards=[], next_after=None, prev_before=None)
        meta: dict[MediaId, dict[str, Any]] = {}
        for media_id, key, value in conn.execute(select(vt.c.media_id, vt.c.key, vt.c.value)
                                                 .where(vt.c.media_id.in_(ids), vt.c.key.in_(CARD_KEYS))):
            meta.setdefault(media_id, {})[key] = loads_or_none(value)
    cards = [GalleryCard(id=r[0], path=str(r[1]), quality_status=r[2], meta=meta.get(r[0], {})) for r in rows]
    has_next, has_prev = (True, more) if backwards else (more, after is not None and after != 0)
    return GalleryPage(cards=cards, next_after=ids[-1] if has_next else None,
                       prev_before=ids[0] if has_prev else None)


# ---- filter choices (cached) --------------------------------------------------------------------


class _TTLCache:
    """A tiny per-process cache for the filter drop-downs (distinct values change slowly)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._data: dict[tuple[int, str], tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, name: str, load: Callable[[], list[str]]) -> list[str]:
        key = (id(engine), name)
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and now - hit[0] < self.seconds:
                return hit[1]
        value = load()
        with self._lock:
            self._data[key] = (now, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


choices_cache = _TTLCache(60.0)


def _distinct(engine: Engine, column: Any, limit: int = 200) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(column).where(column.is_not(None)).distinct().order_by(column).limit(limit))
        return [str(r[0]) for r in rows]


def filter_choices(engine: Engine) -> dict[str, list[str]]:
    """Values offered by the filter form: quality statuses, tags, models."""
    g = gallery_for(engine)
    m, t = g["media"], g.t("tags")
    return {
        "quality": choices_cache.get(engine, "quality", lambda: _distinct(engine, m.c("quality_status"))
                                     if m.has("quality_status") else []),
        "tag": choices_cache.get(engine, "tag", lambda: _distinct(engine, t.c("name"), 1000) if t else []),
        "model": choices_cache.get(engine, "model", lambda: _distinct(engine, OllamaStageResult.model)),
    }


# ---- the item page -------------------------------------------------------------------------------


@dataclass
class ItemData:
    """Everything the item page shows about one media item."""

    media: dict[str, Any]
    prompt: dict[str, Any] | None
    tags: list[dict[str, Any]]
    scans: list[dict[str, Any]]
    meta: dict[str, Any]
    stages: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    neighbours: tuple[MediaId | None, MediaId | None] = (None, None)


def _logical(t: Any) -> Any:
    """SELECT of every known column of a gallery table, labelled with its logical name."""
    return select(*[col.label(name) for name, col in t.cols.items()])


def media_row(engine: Engine, media_id: MediaId) -> dict[str, Any] | None:
    """The media row, or None."""
    m = gallery_for(engine)["media"]
    with engine.connect() as conn:
        row = conn.execute(_logical(m).where(m.c("id") == media_id)).mappings().first()
    return dict(row) if row is not None else None


def media_path(engine: Engine, media_id: MediaId) -> str | None:
    """media.path of one item, or None when there is no such row."""
    m = gallery_for(engine)["media"]
    with engine.connect() as conn:
        return conn.execute(select(m.c("path")).where(m.c("id") == media_id)).scalar()


def item_data(engine: Engine, media_id: MediaId, *, jobs_limit: int = 100) -> ItemData | None:
    """The media row with its prompt, tags, scans, all media_meta, provenance per stage and job history."""
    g = gallery_for(engine)
    m, p, t, mt, sc = g["media"], g.t("prompts"), g.t("tags"), g.t("media_tags"), g.t("scan_results")
    vt = values_table(engine)
    mid = m.c("id")
    with engine.connect() as conn:
        media = conn.execute(_logical(m).where(mid == media_id)).mappings().first()
        if media is None:
            return None
        prompt = None
        if p is not None:
            order = p.c("id") if p.has("id") else p.c("media_id")
            prompt = conn.execute(_logical(p).where(p.c("media_id") == media_id).order_by(order)
                                  .limit(1)).mappings().first()
        tags: list[Any] = []
        if t is not None and mt is not None:
            cols = [t.c("name").label("name")] + [
                (mt.c(c) if mt.has(c) else null()).label(c) for c in ("locked", "confidence", "weight")]
            if g.tag_origin:
                cols.append(mt.table.c[g.tag_origin].label("source"))
            else:
                from ollama_pipeline.core.db.models import OllamaTagLink

                owned = OllamaTagLink.__table__
                cols.append(case((exists().where(owned.c.media_id == mt.c("media_id"),
                                                 owned.c.tag_id == mt.c("tag_id")), "ollama"), else_=None)
                            .label("source"))
            order_cols = ([mt.c("locked").desc()] if mt.has("locked") else []) + [t.c("name")]
            tags = conn.execute(select(*cols).join(t.table, t.c("id") == mt.c("tag_id"))
                                .where(mt.c("media_id") == media_id).order_by(*order_cols)).mappings().all()
        scans: list[Any] = []
        if sc is not None:
            order = sc.c("id") if sc.has("id") else sc.c("media_id")
            scans = conn.execute(_logical(sc).where(sc.c("media_id") == media_id).order_by(order)).mappings().all()
        meta = {r[0]: loads_or_none(r[1]) for r in conn.execute(
            select(vt.c.key, vt.c.value).where(vt.c.media_id == media_id).order_by(vt.c.key))}
        stages = conn.execute(select(OllamaStageResult).where(OllamaStageResult.media_id == media_id)
                              ).mappings().all()
        jobs = conn.execute(select(OllamaJob).where(OllamaJob.media_id == media_id)
                            .order_by(OllamaJob.id.desc()).limit(jobs_limit)).mappings().all()
        # ORDER BY ... LIMIT 1, not max()/min(): PostgreSQL has no max(uuid)
        prev_id = conn.execute(select(mid).where(mid < media_id).order_by(mid.desc()).limit(1)).scalar()
        next_id = conn.execute(select(mid).where(mid > media_id).order_by(mid).limit(1)).scalar()
    scan_list = []
    for s in scans:
        row = dict(s)
        flags = loads_or_none(row.get("flags"))
        row["flags"] = flags if isinstance(flags, list) else ([] if flags is None else [flags])
        scan_list.append(row)
    order = {job_type: i for i, job_type in enumerate(STAGES)}
    stage_rows = sorted((dict(s) for s in stages), key=lambda s: (order.get(s["stage"], len(order)), s["stage"]))
    from ollama_pipeline.core.queue.gallery_jobs import media_jobs

    own_queue = media_jobs(engine, media_id, limit=jobs_limit)  # the gallery's own queue (LocalSupervisor)
    job_rows = [dict(j) for j in jobs] if own_queue is None else [j.model_dump() for j in own_queue]
    return ItemData(media=dict(media), prompt=dict(prompt) if prompt else None, tags=[dict(t) for t in tags],
                    scans=scan_list, meta=meta, stages=stage_rows, jobs=job_rows,
                    neighbours=(prev_id, next_id))
