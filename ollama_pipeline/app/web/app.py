"""The web UI: a FastAPI app with server-rendered Jinja2 pages (autoescape on) and no JavaScript.

Routes: `/` gallery (filters, keyset paging), `/media/{id}` item page, `/media/{id}.json` and
`/api/media/{id}` (the export feed object), `/thumb/{id}` and `/image/{id}` (bounded JPEGs made from files
inside the media root only, `web.thumbs`), `/original/{id}` (the file itself, streamed from disk, raster
images only), `POST /media/{id}/rerun`, `/queue` with `POST /jobs/{id}/retry|cancel`, `/healthz`.
Reads go through `web.queries`; every write goes through `ollama_pipeline.core.queue.store`. Guards (Host, token, CSRF,
headers) live in `web.security` and wrap the whole app.

Media ids in paths take the gallery's id type (`library.id_type`, core.ids): an integer, a text id
(path-escaped in links, `/` as `%2F`; the media routes take the rest of the path, so a slash in an id is
never a route of its own) or a UUID. An id that is not of the gallery's type (not digits, beyond any
database integer, not a UUID, empty, longer than the pipeline's 255-character columns, with a control
character) is a 404 before any query runs.
"""

from __future__ import annotations

import html
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine, text
from starlette.exceptions import HTTPException as StarletteHTTPException

from ollama_pipeline.app.web import queries, thumbs
from ollama_pipeline.app.web.present import card_values, meta_views, pretty_json, text_of
from ollama_pipeline.app.web.security import CSRF_FIELD, SecurityMiddleware, csrf_token_of
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import engine_for_settings
from ollama_pipeline.core.db.gallery import gallery_for
from ollama_pipeline.core.errors import (
    OllamaPipelineError,
    PersistenceError,
    QueueLimitError,
    ValidationError,
)
from ollama_pipeline.core.export import export_records
from ollama_pipeline.core.ids import IdType, MediaId, normalize_uuid
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import STAGES

HERE = Path(__file__).resolve().parent
FLASH_MESSAGES = {"retried": "Job {job} is queued again.", "cancelled": "Job {job} was cancelled."}
NOT_AVAILABLE = "image not available"


class WebState:
    """What the routes share: settings, engine, the lazily built Pipeline (for the job API), templates."""

    def __init__(self, settings: Settings, pipeline: Pipeline | None, thumb_dir: Path) -> None:
        self.settings = settings
        # bound to the settings' `library:` mapping, so a mapped gallery is read through it
        self.engine: Engine = pipeline.engine if pipeline is not None else engine_for_settings(settings)
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self.thumb_dir = thumb_dir
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      trim_blocks=True, lstrip_blocks=True)
        self.env.filters["pretty_json"] = pretty_json
        self.env.filters["text_of"] = text_of
        self.env.filters["idpath"] = id_path
        self.env.globals.update(stages=list(STAGES), csrf_field=CSRF_FIELD,
                                dagster_url=settings.pipeline.dagster_ui_url.rstrip("/"))

    @property
    def pipeline(self) -> Pipeline:
        with self._lock:
            if self._pipeline is None:
                self._pipeline = Pipeline.from_settings(self.settings)
            return self._pipeline

    @property
    def id_type(self) -> IdType:
        """The gallery's media id type (discovered once per engine, core.db.gallery)."""
        return gallery_for(self.engine).id_type

    def media_id(self, raw: str) -> MediaId:
        """The media id of a path, or 404 when it is not of the gallery's id type."""
        media_id = parse_media_id(raw, self.id_type)
        if media_id is None:
            raise StarletteHTTPException(404, f"No media item {raw[:100]}.")
        return media_id

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        template = self.env.get_template(name)
        body = template.render(request=request, csrf_token=csrf_token_of(request.scope), **context)
        return HTMLResponse(body, status_code=status_code)


def dagster_partition_url(base: str, asset: str, media_id: MediaId, partition_size: int = 1000) -> str:
    """The Dagster UI page of the asset partition (a block of items, core.partitioning) that holds an item
    (Dagster 1.13: /assets/<key>?view=partitions&partition=)."""
    key = Partitioning(size=partition_size).key_of(media_id)
    return f"{base.rstrip('/')}/assets/{asset}?" + urlencode({"view": "partitions", "partition": key})


def error_status(exc: OllamaPipelineError) -> int:
    """HTTP status of a typed pipeline error shown to a user."""
    if isinstance(exc, QueueLimitError):
        return 429
    if isinstance(exc, ValidationError):
        return 404 if exc.code in ("validation.media_missing", "validation.file_missing") else 400
    if isinstance(exc, PersistenceError):
        return 409 if exc.code == "persistence.constraint" else 503
    return 500


MAX_ID = 2**63 - 1
"""Largest id a database row can have (SQLite and PostgreSQL BIGINT); larger path ids name no row."""
MAX_TEXT_ID = 255
"""Longest text id the pipeline's own `media_id` columns hold (core.ids.column_type)."""
_DIGITS = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_media_id(raw: str, id_type: IdType) -> MediaId | None:
    """A path or query-string media id as the gallery's id type, or None when it cannot be one: integers
    are digits up to MAX_ID, UUIDs any spelling uuid.UUID reads (returned canonical, lower-case), text ids
    1-255 characters without control characters (a NUL is refused by PostgreSQL)."""
    if id_type == "integer":
        if not _DIGITS.fullmatch(raw) or len(raw) > 25:
            return None
        number = int(raw)
        return number if number <= MAX_ID else None
    if id_type == "uuid":
        return normalize_uuid(raw) if len(raw) <= 100 else None
    if not raw or len(raw) > MAX_TEXT_ID or _CONTROL.search(raw):
        return None
    return raw


def id_path(media_id: Any) -> str:
    """A media id as one path segment of a link: integers as they are, text ids percent-escaped (a `/`
    as `%2F`, UTF-8 bytes of other characters)."""
    return quote(str(media_id), safe="")


def _known_id(value: int, what: str = "media item") -> int:
    """The id of a path, or 404 when it is beyond any database integer (never handed to the driver)."""
    if not 0 <= value <= MAX_ID:
        raise StarletteHTTPException(404, f"No {what} {value}.")
    return value


def _int_or_none(value: str | None) -> int | None:
    """A query-string integer, or None when absent, not an integer, or beyond any database integer."""
    try:
        number = int(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is None or -MAX_ID <= number <= MAX_ID else None


def create_app(settings: Settings, *, pipeline: Pipeline | None = None, require_token: bool | None = None,
               thumb_dir: Path | None = None, allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The web app for these settings; a token is required whenever `pipeline.web_token` is set."""
    state = WebState(settings, pipeline, thumb_dir or thumbs.default_cache_dir(settings))
    token = settings.pipeline.web_token if (require_token is None or require_token) else None
    if require_token and not token:
        raise ValueError("require_token=True needs pipeline.web_token")
    app = FastAPI(title="ollama_pipeline web UI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = state
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(OllamaPipelineError)
    async def pipeline_error(request: Request, exc: OllamaPipelineError) -> HTMLResponse:
        return state.render(request, "message.html", status_code=error_status(exc), title="Refused",
                            error=exc, messages=[])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return state.render(request, "message.html", status_code=404, title="Not found", error=None,
                                messages=[str(exc.detail) if exc.detail != "Not Found" else "No such page."])
        return HTMLResponse(html.escape(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            with state.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # report, do not raise: this is the health endpoint
            return JSONResponse({"ok": False, "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"ok": True, "database": "ok", "stages": len(STAGES)})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/", response_class=HTMLResponse)
    def gallery(request: Request, quality: str = "", policy: str = "", tag: str = "", model: str = "",
                stage: str = "", stage_status: str = "", q: str = "", after: str = "",
                before: str = "") -> HTMLResponse:
        filters = queries.GalleryFilters(quality=quality.strip()[:100], policy=policy.strip()[:100],
                                         tag=tag.strip()[:255], model=model.strip()[:255],
                                         stage=stage if stage in STAGES else "",
                                         stage_status=stage_status if stage_status in queries.STAGE_STATUSES else "",
                                         q=q.strip()[:200])
        page = queries.gallery_page(state.engine, filters, after=parse_media_id(after, state.id_type) if after else None,
                                    before=parse_media_id(before, state.id_type) if before else None)
        cards = [{"id": c.id, "path": c.path, **card_values(c.meta, c.quality_status)} for c in page.cards]
        keep = filters.active()
        return state.render(request, "gallery.html", cards=cards, filters=filters,
                            choices=queries.filter_choices(state.engine), statuses=queries.STAGE_STATUSES,
                            next_url=f"/?{urlencode({**keep, 'after': page.next_after})}" if page.next_after else None,
                            prev_url=f"/?{urlencode({**keep, 'before': page.prev_before})}" if page.prev_before else None,
                            filtered=bool(keep))

    def item(request: Request, media_id: MediaId) -> HTMLResponse:
        data = queries.item_data(state.engine, media_id)
        if data is None:
            raise StarletteHTTPException(404, f"No media item {media_id}.")
        versions = queries.current_versions()
        for row in data.stages:
            row["stale"] = row.get("status") == "ok" and row.get("version") != versions.get(row["stage"])
            row["dagster_url"] = dagster_partition_url(state.settings.pipeline.dagster_ui_url, row["stage"], media_id,
                                                       state.settings.pipeline.partition_size)
        views = meta_views(data.meta)
        recon = next((v for v in views if v.key == "ollama.prompt_reconstruction"), None)
        json_url = (f"/media/{media_id}.json" if isinstance(media_id, int) else f"/api/media/{id_path(media_id)}")
        return state.render(request, "item.html", item=data, media=data.media, views=views, recon=recon,
                            other_meta={k: v for k, v in data.meta.items() if not k.startswith("ollama.")},
                            cards=card_values(data.meta, data.media.get("quality_status")),
                            dagster_link=dagster_partition_url(state.settings.pipeline.dagster_ui_url,
                                                               next(iter(STAGES), "media"), media_id,
                                                               state.settings.pipeline.partition_size),
                            versions=versions, json_url=json_url)

    def _export(media_id: MediaId | None, raw: str) -> JSONResponse:
        records = list(export_records(state.engine, [media_id])) if media_id is not None else []
        if not records:
            return JSONResponse({"error": f"no media item {raw[:100]}"}, status_code=404)
        return JSONResponse(records[0])

    @app.get("/media/{rest:path}", response_class=HTMLResponse)
    def item_or_json(request: Request, rest: str) -> Response:
        """`/media/{id}` (the item page) and `/media/{id}.json`; a text id ending in `.json` that names a
        row is its item page (its JSON stays at `/api/media/{id}`)."""
        id_type = state.id_type
        whole = parse_media_id(rest, id_type)
        if rest.endswith(".json") and (id_type == "integer" or whole is None
                                       or queries.media_path(state.engine, whole) is None):
            return _export(parse_media_id(rest[:-len(".json")], id_type), rest[:-len(".json")])
        return item(request, state.media_id(rest))

    @app.get("/api/media/{rest:path}")
    def item_api(rest: str) -> JSONResponse:
        return _export(parse_media_id(rest, state.id_type), rest)

    def _jpeg(raw: str, side: int) -> Response:
        media_id = parse_media_id(raw, state.id_type)
        row = queries.media_row(state.engine, media_id) if media_id is not None else None
        if row is None or row.get("path") is None:
            return Response(NOT_AVAILABLE, status_code=404, media_type="text/plain")
        try:  # a video item shows its representative frame
            file = thumbs.scaled_jpeg(state.settings.media_root, row["path"], state.thumb_dir, side,
                                      media_type=row.get("type"))
        except ValidationError as exc:
            status = 400 if exc.code == "validation.path_outside_root" else 404
            return Response(NOT_AVAILABLE, status_code=status, media_type="text/plain")
        return FileResponse(file, media_type="image/jpeg",
                            headers={"cache-control": "private, max-age=300"})

    @app.get("/thumb/{rest:path}")
    def thumb(rest: str) -> Response:
        return _jpeg(rest, thumbs.THUMB_SIDE)

    @app.get("/image/{rest:path}")
    def image(rest: str) -> Response:
        return _jpeg(rest, thumbs.PREVIEW_SIDE)

    @app.get("/original/{rest:path}")
    def original(rest: str) -> Response:
        media_id = parse_media_id(rest, state.id_type)
        path = queries.media_path(state.engine, media_id) if media_id is not None else None
        if path is None:
            return Response(NOT_AVAILABLE, status_code=404, media_type="text/plain")
        try:
            file, media_type = thumbs.original_file(state.settings.media_root, path)
        except ValidationError as exc:
            status = 400 if exc.code == "validation.path_outside_root" else 404
            return Response(NOT_AVAILABLE, status_code=status, media_type="text/plain")
        return FileResponse(file, media_type=media_type, headers={"cache-control": "private, max-age=300"})

    @app.post("/media/{rest:path}", response_class=HTMLResponse)
    def rerun(request: Request, rest: str, stage: str = Form("all")) -> HTMLResponse:
        """`POST /media/{id}/rerun` (a text id may hold a `/`: the route takes the whole path)."""
        if not rest.endswith("/rerun"):
            raise StarletteHTTPException(404, "No such page.")
        media_id = state.media_id(rest[:-len("/rerun")])
        if queries.media_path(state.engine, media_id) is None:
            raise ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
        chosen = list(STAGES) if stage == "all" else [stage]
        results = []
        for job_type in chosen:
            result = jobs.enqueue_ollama(state.pipeline, job_type, media_id, {"force": True})
            results.append({"job_id": result.job_id, "job_type": job_type,
                            "answer": "queued" if result.status == "queued" else "already queued"})
        messages = [f"{r['job_type']}: {r['answer']} (job {r['job_id']})" for r in results]
        return state.render(request, "message.html", title=f"Re-run for media {media_id}", error=None,
                            messages=messages, results=results, media_id=media_id)

    @app.get("/queue", response_class=HTMLResponse)
    def queue(request: Request, status: str = "", job_type: str = "", done: str = "",
              job: str = "") -> HTMLResponse:
        pipeline = state.pipeline
        counts = jobs.queue_counts(pipeline)
        recent = jobs.list_jobs(pipeline, status=status if status in jobs.JOB_STATUSES else None,
                                job_type=job_type if job_type in STAGES else None, limit=50)
        failed = jobs.list_jobs(pipeline, status="failed", limit=50)
        job_id = _int_or_none(job)
        flash = FLASH_MESSAGES[done].format(job=job_id) if done in FLASH_MESSAGES and job_id else None
        problems = repository.media_problems(pipeline.engine, limit=100)
        return state.render(request, "queue.html", counts=counts, recent=recent, failed=failed, flash=flash,
                            statuses=jobs.JOB_STATUSES, status=status, job_type=job_type, problems=problems)

    @app.post("/jobs/{job_id:int}/retry")
    def retry(job_id: int) -> RedirectResponse:
        jobs.retry_job(state.pipeline, _known_id(job_id, "job"))
        return RedirectResponse(f"/queue?done=retried&job={job_id}", status_code=303)

    @app.post("/jobs/{job_id:int}/cancel")
    def cancel(job_id: int) -> RedirectResponse:
        jobs.cancel_job(state.pipeline, _known_id(job_id, "job"))
        return RedirectResponse(f"/queue?done=cancelled&job={job_id}", status_code=303)

    from ollama_pipeline.app.web.backfill import add_backfill_route

    add_backfill_route(app, state)
    app.add_middleware(SecurityMiddleware, token=token, allowed_hosts=allowed_hosts)
    return app
