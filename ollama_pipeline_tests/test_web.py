"""HTTP-level tests of the web UI (§2 UI/Downstream): a real SQLite demo library whose stages ran against the
Ollama emulator, served by the FastAPI app through TestClient (and once by the real CLI under uvicorn).

They assert on what a user sees: titles and captions on the gallery, filters that narrow it, every
`ollama.*` key on the item page, re-runs that queue once, refused traversal, escaped scripts, refused
forged POSTs, the token rule, and a gallery page that stays fast at 100,000 rows.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, delete, func, insert, select, update

from ollama_pipeline.app.demo_library import build_demo_library
from ollama_pipeline.app.web import queries
from ollama_pipeline.app.web.app import create_app
from ollama_pipeline.app.web.cli import check_bind
from ollama_pipeline.bench import web_queries
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Media, MediaMeta, MediaTag, OllamaJob, OllamaStageResult, Tag
from ollama_pipeline.core.errors import ConfigError, ValidationError
from ollama_pipeline.core.export import export_records
from ollama_pipeline.core.jsontext import canonical_json, loads_or_none
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.core.stages import STAGES, all_meta_keys
from ollama_pipeline_tests.conftest import make_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1"
DEMO_COUNT = 12
SCRIPT_CAPTION = "<script>alert(1)</script> a fox in the snow"
SCRIPT_TITLE = "<img src=x onerror=alert(2)> Fox"
THIRTEEN_KEYS = (
    "ollama.caption", "ollama.title", "ollama.description", "ollama.tags_raw", "ollama.tags_normalized",
    "ollama.quality", "ollama.duplicate_assist", "ollama.prompt_reconstruction", "ollama.scores",
    "ollama.policy_flags", "ollama.model", "ollama.version", "ollama.last_run_at",
)  # fmt: skip
RERUN_STAGE = list(STAGES)[-1]  # the last stage of the registry (ollama_policy_flags once all eight exist)


def documented_shapes(duplicate_of: int) -> dict[str, Any]:
    """One value of the documented shape for each of the thirteen keys (§2), as the stages write them."""
    return {
        "ollama.caption": {"text": "A silver knight on a foggy neon street"},
        "ollama.title": {"text": "Knight in the Fog"},
        "ollama.description": {"text": "An ink illustration of a knight. Fog and neon light fill the street."},
        "ollama.tags_raw": {"tags": ["knight", "Fog", "neon street"]},
        "ollama.tags_normalized": [{"name": "knight", "confidence": 0.93, "weight": 1.0},
                                   {"name": "fog", "confidence": 0.71, "weight": 0.6}],
        "ollama.quality": {"score": 0.42, "verdict": "review", "issues": [{"name": "blurry hands",
                                                                           "severity": "medium"}]},
        "ollama.duplicate_assist": {"candidates": [{"media_id": duplicate_of, "distance": 3, "reason": "dhash",
                                                    "similarity": 0.91}], "best": duplicate_of, "checked": 4},
        "ollama.prompt_reconstruction": {"prompt": "knight in silver armor, foggy neon street, ink illustration",
                                         "negative_prompt": "blurry, lowres", "style": "ink illustration",
                                         "similarity": 0.77},
        "ollama.scores": {"scale": {"min": 0, "max": 10}, "scores": {"aesthetic": 7.5, "composition": 6.5},
                          "overall": 7.0},
        "ollama.policy_flags": {"flags": [{"name": "suggestive", "confidence": 0.64, "source": "model"}],
                                "nsfw_score": 0.31, "scan": {"scanner": "nsfw_detector", "nsfw_score": 0.2},
                                "outcome": "needs_review"},
        "ollama.model": {"ollama_caption": "llava:7b", "ollama_title": "llama3.2:3b"},
        "ollama.version": {"ollama_caption": "caption-v1", "ollama_title": "title-v1"},
        "ollama.last_run_at": {"ollama_caption": "2026-01-02T03:04:05Z", "ollama_title": "2026-01-02T03:04:06Z"},
    }


# ---- the shared library (also used by test_browser.py) ---------------------------------------------


@dataclass
class WebLibrary:
    """A demo library with every stage run, plus hostile rows, and the facts tests check against."""

    settings: Settings
    pipeline: Pipeline
    root: Path
    demo_ids: list[int]
    script_id: int
    stale_id: int
    failed_id: int
    shapes_id: int
    outside_ids: dict[str, int]

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine

    def meta(self, media_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return {k: loads_or_none(v) for k, v in conn.execute(
                select(MediaMeta.key, MediaMeta.value).where(MediaMeta.media_id == media_id))}

    def text(self, media_id: int, key: str) -> str:
        value = self.meta(media_id).get(key)
        return value["text"] if isinstance(value, dict) else str(value)


def _set_meta(engine: Engine, media_id: int, key: str, value: Any) -> None:
    """Store a value as a stage would, whatever it holds (test data for rendering, bypassing validation)."""
    with engine.begin() as conn:
        conn.execute(delete(MediaMeta).where(MediaMeta.media_id == media_id, MediaMeta.key == key))
        conn.execute(insert(MediaMeta).values(media_id=media_id, key=key, value=canonical_json(value)))


def build_web_library(root: Path, base_url: str, count: int = DEMO_COUNT) -> WebLibrary:
    """Demo library + all stages through the emulator + a script caption, a stale, a failed and hostile rows."""
    settings = make_settings(db_url=f"sqlite:///{root / 'library.db'}", media_root=root / "media",
                             logs_dir=root / "LOGS", base_url=base_url)
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, settings.media_root, count, seed=7, sizes="small", max_side=384)
    ids = report.media_ids
    for job_type in STAGES:
        outcomes = list(run_stage(pipeline, job_type, ids))
        failed = [o for o in outcomes if o.status == "failed"]
        assert not failed, f"{job_type} failed: {failed[0].error}"
    script_id, stale_id, failed_id, shapes_id = ids[-1], ids[1], ids[2], ids[-2]
    for key, value in documented_shapes(duplicate_of=ids[0]).items():
        _set_meta(pipeline.engine, shapes_id, key, value)
    _set_meta(pipeline.engine, script_id, "ollama.caption", {"text": SCRIPT_CAPTION})
    _set_meta(pipeline.engine, script_id, "ollama.title", {"text": SCRIPT_TITLE})
    with pipeline.engine.begin() as conn:
        conn.execute(update(OllamaStageResult).where(OllamaStageResult.media_id == stale_id,
                                                     OllamaStageResult.stage == "ollama_caption")
                     .values(version="caption-v0+old"))
    repository.record_stage_failure(pipeline.engine, failed_id, "ollama_title",
                                    ValidationError("answer broke the schema", code="validation.schema"))
    # Hostile rows: paths leaving the media root, and symlinks inside it pointing out.
    outside = root / "outside"
    outside.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(outside / "secret.jpg")
    (settings.media_root / "evil_link.jpg").symlink_to(outside / "secret.jpg")
    (settings.media_root / "passwd_link.jpg").symlink_to("/etc/passwd")
    paths = {"dotdot": "../../etc/passwd", "absolute": "/etc/passwd", "dotdot_image": "../outside/secret.jpg",
             "symlink_image": "evil_link.jpg", "symlink_passwd": "passwd_link.jpg"}
    outside_ids: dict[str, int] = {}
    with pipeline.engine.begin() as conn:
        for name, path in paths.items():
            outside_ids[name] = int(conn.execute(insert(Media).values(path=path, type="image")
                                                 .returning(Media.id)).scalar_one())
    return WebLibrary(settings=settings, pipeline=pipeline, root=root, demo_ids=ids, script_id=script_id,
                      stale_id=stale_id, failed_id=failed_id, shapes_id=shapes_id, outside_ids=outside_ids)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, emulator_server: Any) -> WebLibrary:
    emulator_server.set_faults([])
    return build_web_library(tmp_path_factory.mktemp("web"), emulator_server.base_url)


@pytest.fixture(scope="module")
def app(library: WebLibrary) -> FastAPI:
    return create_app(library.settings, pipeline=library.pipeline)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url=BASE) as c:
        yield c


def card_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-media-id="(\d+)"', html)]


def csrf_of(client: TestClient) -> str:
    """The CSRF cookie of this client (a GET sets it), which forms repeat as a hidden field."""
    if "op_csrf" not in client.cookies:
        client.get("/healthz")
    return client.cookies["op_csrf"]


def _jobs_for(engine: Engine, media_id: int, job_type: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute(
            select(OllamaJob.id, OllamaJob.status).where(OllamaJob.media_id == media_id,
                                                         OllamaJob.job_type == job_type))]


# ---- gallery -------------------------------------------------------------------------------------


def test_gallery_shows_every_items_title_and_caption(client: TestClient, library: WebLibrary) -> None:
    """Every demo item appears with its stored title and caption (escaped as HTML text)."""
    r = client.get("/")
    assert r.status_code == 200
    assert set(library.demo_ids) <= set(card_ids(r.text))
    for media_id in library.demo_ids:
        if media_id == library.script_id:
            continue
        for key in ("ollama.title", "ollama.caption"):
            text = library.text(media_id, key)
            assert text and _html_text(text) in r.text, (media_id, key)


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;").replace(
        "'", "&#39;")


def _expected(library: WebLibrary, predicate: Any) -> set[int]:
    every = library.demo_ids + list(library.outside_ids.values())
    return {i for i in every if predicate(i)}


def test_filters_narrow_the_gallery_to_the_matching_items(client: TestClient, library: WebLibrary) -> None:
    """Tag, search, quality, policy, model and stage-status filters each show exactly the matching items."""
    engine = library.engine
    with engine.connect() as conn:
        tag, _n = conn.execute(select(Tag.name, func.count()).join(MediaTag, MediaTag.tag_id == Tag.id)
                               .group_by(Tag.name).order_by(func.count().desc(), Tag.name)).first()
        tagged = {int(r[0]) for r in conn.execute(select(MediaTag.media_id).join(Tag, Tag.id == MediaTag.tag_id)
                                                  .where(Tag.name == tag))}
        statuses = {int(r[0]): r[1] for r in conn.execute(select(Media.id, Media.quality_status))}
    metas = {i: library.meta(i) for i in library.demo_ids}
    checks: dict[str, set[int]] = {f"tag={tag}": tagged}
    word = next(w for w in re.findall(r"[A-Za-z]{5,}", library.text(library.demo_ids[0], "ollama.caption")))
    checks[f"q={word.upper()}"] = _expected(library, lambda i: any(
        word.lower() in library.text(i, k).lower() for k in ("ollama.caption", "ollama.title")) if i in metas else False)
    def field(value: Any, name: str) -> Any:
        return value.get(name) if isinstance(value, dict) else None

    verdicts = {i: field(m.get("ollama.quality"), "verdict") for i, m in metas.items()}
    qualities = {"review"} | {next((v for v in [*statuses.values(), *verdicts.values()] if v and v != "review"), "review")}
    for quality in qualities:
        checks[f"quality={quality}"] = _expected(library, lambda i, q=quality: q in (statuses.get(i), verdicts.get(i)))
    policies = {i: m.get("ollama.policy_flags") for i, m in metas.items()}

    def flag_names(i: int) -> set[Any]:
        flags = field(policies.get(i), "flags")
        return {field(f, "name") for f in flags} if isinstance(flags, list) else set()

    real = next((field(p, "outcome") for p in policies.values() if field(p, "outcome") not in (None, "needs_review")),
                "needs_review")
    for policy in {"needs_review", "suggestive", real}:
        checks[f"policy={policy}"] = _expected(
            library, lambda i, p=policy: field(policies.get(i), "outcome") == p or p in flag_names(i))
    checks["model=no-such-model:1b"] = set()
    model = library.pipeline.model_for(STAGES["ollama_caption"])
    checks[f"model={model}&stage=ollama_caption"] = set(library.demo_ids)
    checks["stage=ollama_caption&stage_status=stale"] = {library.stale_id}
    checks["stage=ollama_caption&stage_status=done"] = set(library.demo_ids) - {library.stale_id}
    checks["stage=ollama_title&stage_status=failed"] = {library.failed_id}
    checks["stage=ollama_title&stage_status=never"] = set(library.outside_ids.values())
    every = set(card_ids(client.get("/").text))
    for query, expected in checks.items():
        shown = set(card_ids(client.get(f"/?{query}").text))
        assert shown == expected, query
        assert shown < every or not expected, f"{query} does not narrow"


def test_keyset_paging_walks_forward_and_back_without_gaps(client: TestClient, library: WebLibrary) -> None:
    """Small pages chained with after/before cover every item exactly once, in id order."""
    every = [c.id for c in queries.gallery_page(library.engine, queries.GalleryFilters(), limit=1000).cards]
    seen: list[int] = []
    page = queries.gallery_page(library.engine, queries.GalleryFilters(), limit=5)
    pages = [page]
    while True:
        assert len(pages) <= len(every) + 1, "paging does not end"
        seen.extend(c.id for c in page.cards)
        if page.next_after is None:
            break
        page = queries.gallery_page(library.engine, queries.GalleryFilters(), after=page.next_after, limit=5)
        pages.append(page)
    assert seen == every == sorted(every)
    back = queries.gallery_page(library.engine, queries.GalleryFilters(), before=pages[-1].prev_before, limit=5)
    assert [c.id for c in back.cards] == [c.id for c in pages[-2].cards]
    html = client.get(f"/?after={every[0]}").text
    assert every[0] not in card_ids(html) and every[1] in card_ids(html)
    assert 'rel="prev"' in html


# ---- item page -----------------------------------------------------------------------------------


def test_item_page_shows_every_stage_value_and_provenance(client: TestClient, library: WebLibrary) -> None:
    """An item the stages ran on shows a section for all thirteen keys, a value for every key the registry's
    stages write, tags with source and lock marks, scans, provenance per stage and the Dagster link."""
    media_id = library.demo_ids[0]
    r = client.get(f"/media/{media_id}")
    assert r.status_code == 200
    html = r.text
    meta = library.meta(media_id)
    for key in THIRTEEN_KEYS:
        assert f'id="{key}"' in html, key
    for key in all_meta_keys():
        assert key in meta, f"the stages did not write {key}"
        section = html.split(f'id="{key}"', 1)[1].split("</section>", 1)[0]
        assert "not computed yet" not in section and "raw JSON" in section, key
    assert _html_text(meta["ollama.description"]["text"]) in html
    if isinstance(meta.get("ollama.tags_normalized"), list):
        for tag in meta["ollama.tags_normalized"][:3]:
            assert _html_text(tag["name"]) in html
    with library.engine.connect() as conn:
        stage_rows = conn.execute(select(OllamaStageResult).where(OllamaStageResult.media_id == media_id)).mappings().all()
    assert len(stage_rows) == len(STAGES)
    provenance = html.split('class="provenance"', 1)[1]
    for row in stage_rows:
        assert f"<code>{row['stage']}</code>" in provenance and _html_text(row["version"]) in provenance
        assert f"{row['prompt_eval_count']} / {row['eval_count']}" in provenance
    dagster = _html_text(library.settings.pipeline.dagster_ui_url)
    block = Partitioning(size=library.settings.pipeline.partition_size).key_of(media_id)
    assert f"{dagster}/assets/ollama_caption?view=partitions&amp;partition={block}" in html  # its partition
    assert "badge source" in html
    locked_item = _first_locked(library.engine)
    assert 'class="badge lock"' in client.get(f"/media/{locked_item}").text
    stale = client.get(f"/media/{library.stale_id}").text
    assert 'class="badge stale"' in stale
    failed = client.get(f"/media/{library.failed_id}").text
    assert "[validation/validation.schema]" in failed


def test_item_page_renders_all_thirteen_documented_shapes_readably(client: TestClient, library: WebLibrary) -> None:
    """Each of the thirteen keys in its documented shape renders as text, bars, tables and links, not raw JSON."""
    html = client.get(f"/media/{library.shapes_id}").text
    sections = {key: html.split(f'id="{key}"', 1)[1].split("</section>", 1)[0] for key in THIRTEEN_KEYS}
    assert all("not computed yet" not in body for body in sections.values())
    assert '<p class="text">A silver knight on a foggy neon street</p>' in sections["ollama.caption"]
    assert '<p class="text">Knight in the Fog</p>' in sections["ollama.title"]
    assert "neon street" in sections["ollama.tags_raw"]
    assert '<span class="name">knight</span>' in sections["ollama.tags_normalized"]
    assert 'value="0.93"' in sections["ollama.tags_normalized"]  # confidence as a bar
    assert 'max="1.0" value="0.42"' in sections["ollama.quality"] and "blurry hands" in sections["ollama.quality"]
    assert 'min="0.0" max="10.0" value="7.5"' in sections["ollama.scores"] and "overall" in sections["ollama.scores"]
    assert "suggestive" in sections["ollama.policy_flags"] and 'value="0.64"' in sections["ollama.policy_flags"]
    assert "needs_review" in sections["ollama.policy_flags"]
    assert f'href="/media/{library.demo_ids[0]}"' in sections["ollama.duplicate_assist"]
    assert "ink illustration" in sections["ollama.prompt_reconstruction"]
    for key in ("ollama.model", "ollama.version", "ollama.last_run_at"):
        assert "<th>ollama_title</th>" in sections[key]
    prompts = html.split('class="prompts"', 1)[1].split("</section>", 1)[0]
    assert "Generation prompt" in prompts and "knight in silver armor, foggy neon street" in prompts
    scans = html.split('class="policy"', 1)[1].split("</section>", 1)[0]
    assert "nsfw_detector" in scans


def _first_locked(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(MediaTag.media_id).where(MediaTag.locked.is_(True)).limit(1)).scalar_one())


def test_item_page_renders_values_of_unexpected_shapes(client: TestClient, library: WebLibrary) -> None:
    """Odd JSON (a list where an object was expected, nested values, numbers) still renders as readable text."""
    media_id = library.demo_ids[3]
    original = library.meta(media_id)
    try:
        _set_meta(library.engine, media_id, "ollama.quality", ["not", {"an": "object"}, 3])
        _set_meta(library.engine, media_id, "ollama.scores", {"scores": "none", "odd": [1, [2, [3]]]})
        _set_meta(library.engine, media_id, "ollama.policy_flags", "plain <b>string</b>")
        html = client.get(f"/media/{media_id}").text
        assert "plain &lt;b&gt;string&lt;/b&gt;" in html and "object" in html
    finally:
        for key in ("ollama.quality", "ollama.scores", "ollama.policy_flags"):
            with library.engine.begin() as conn:
                conn.execute(delete(MediaMeta).where(MediaMeta.media_id == media_id, MediaMeta.key == key))
            if key in original:
                _set_meta(library.engine, media_id, key, original[key])


def test_item_json_is_the_export_feed_object(client: TestClient, library: WebLibrary) -> None:
    """/media/{id}.json and /api/media/{id} answer exactly what the export feed holds for the item."""
    media_id = library.demo_ids[0]
    expected = json.loads(canonical_json(next(export_records(library.engine, [media_id]))))
    for url in (f"/media/{media_id}.json", f"/api/media/{media_id}"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == expected
    assert client.get("/media/999999.json").status_code == 404
    assert client.get("/media/999999").status_code == 404


def test_thumbnail_is_a_small_cached_jpeg(client: TestClient, library: WebLibrary) -> None:
    """/thumb is a JPEG of at most 256 px made once and then served from the cache directory."""
    media_id = library.demo_ids[4]
    r = client.get(f"/thumb/{media_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    from io import BytesIO

    img = Image.open(BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 256
    cached = list((library.settings.logs_dir.parent / ".thumbs").rglob("*.jpg"))
    assert cached
    before = {p: p.stat().st_mtime_ns for p in cached}
    assert client.get(f"/thumb/{media_id}").content == r.content
    assert {p: p.stat().st_mtime_ns for p in cached} == before
    preview = client.get(f"/image/{media_id}")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"


def _media_client(tmp_path: Path, rows: list[tuple[str, str]]) -> tuple[TestClient, list[int], Settings]:
    """A web UI over a fresh library holding just these (path, media.type) rows; no stage has run."""
    settings = make_settings(db_url=f"sqlite:///{tmp_path / 'library.db'}", media_root=tmp_path / "media",
                             logs_dir=tmp_path / "LOGS", base_url="http://127.0.0.1:9")
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    with pipeline.engine.begin() as conn:
        ids = [int(conn.execute(insert(Media).values(path=path, type=kind).returning(Media.id)).scalar_one())
               for path, kind in rows]
    return TestClient(create_app(settings, pipeline=pipeline), base_url=BASE), ids, settings


def test_thumbnails_open_only_the_image_formats_the_pipeline_reads(tmp_path: Path) -> None:
    """A PCX, a PPM and an EPS file (Pillow knows them; EPS would start Ghostscript) get no thumbnail and no
    preview, and nothing is cached for them; a PNG beside them does (core.images.IMAGE_FORMATS)."""
    media = tmp_path / "media"
    media.mkdir()
    picture = Image.new("RGB", (64, 48), (30, 160, 40))
    for name, fmt in (("ok.png", "PNG"), ("paint.pcx", "PCX"), ("raw.ppm", "PPM"), ("drawing.eps", "EPS")):
        picture.save(media / name, fmt)
    client, (png, *others), settings = _media_client(
        tmp_path, [("ok.png", "image"), ("paint.pcx", "image"), ("raw.ppm", "image"), ("drawing.eps", "image")])
    with client:
        assert client.get(f"/thumb/{png}").headers["content-type"] == "image/jpeg"
        cache = settings.logs_dir.parent / ".thumbs"
        made = set(cache.rglob("*.jpg"))
        for media_id in others:
            for kind in ("thumb", "image"):
                r = client.get(f"/{kind}/{media_id}")
                assert (r.status_code, r.headers["content-type"].split(";")[0]) == (404, "text/plain"), media_id
        assert set(cache.rglob("*.jpg")) == made


def test_a_large_png_is_shrunk_as_a_stream_with_its_orientation_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    """A 20-megapixel PNG (above STREAM_PNG_PIXELS, shrunk by libvips row by row) keeps its colour and its
    EXIF orientation in /thumb; a truncated one answers 404 and leaves nothing in the cache."""
    from ollama_pipeline.app.web.thumbs import STREAM_PNG_PIXELS

    media = tmp_path / "media"
    media.mkdir()
    picture = Image.new("RGB", (5000, 4000), (200, 30, 30))
    assert picture.width * picture.height > STREAM_PNG_PIXELS
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    picture.save(media / "wide.png", exif=exif.tobytes(), compress_level=1)
    whole = (media / "wide.png").read_bytes()
    (media / "broken.png").write_bytes(whole[: len(whole) // 2])
    client, (wide, broken), settings = _media_client(tmp_path, [("wide.png", "image"), ("broken.png", "image")])
    with client:
        r = client.get(f"/thumb/{wide}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content)).convert("RGB")
        assert thumb.size == (205, 256)  # portrait, as the orientation says
        assert all(abs(a - b) <= 8 for a, b in zip(thumb.getpixel((100, 128)), (200, 30, 30), strict=True))
        made = set((settings.logs_dir.parent / ".thumbs").rglob("*.jpg"))
        assert client.get(f"/thumb/{broken}").status_code == 404
        assert set((settings.logs_dir.parent / ".thumbs").rglob("*.jpg")) == made


def test_a_video_item_gets_its_representative_frame_as_thumbnail_and_preview(tmp_path: Path) -> None:
    """/thumb and /image of a video item are JPEGs of the frame the pipeline sends to the model (the middle
    one, passing over black frames), for media.type video and for an untyped row named .mp4."""
    from ollama_pipeline.core.images import video_frame
    from ollama_pipeline_tests.test_media import make_video

    clip = make_video(tmp_path / "media" / "clips" / "walk.mp4", frames=30)
    make_video(tmp_path / "media" / "clips" / "faded.mp4", frames=40, black=range(10, 30))
    client, (typed, untyped), _ = _media_client(tmp_path, [("clips/walk.mp4", "video"), ("clips/faded.mp4", "")])
    expected = video_frame(clip, "clip")[0].getpixel((32, 24))
    with client:
        for media_id in (typed, untyped):
            for kind, side in (("thumb", 256), ("image", 1280)):
                r = client.get(f"/{kind}/{media_id}")
                assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (media_id, kind)
                img = Image.open(io.BytesIO(r.content))
                assert img.format == "JPEG" and img.size == (64, 48) and max(img.size) <= side
                red = img.convert("RGB").getpixel((32, 24))[0]
                if media_id == typed:
                    assert abs(red - expected[0]) <= 12  # the middle frame (JPEG is lossy)
                else:
                    assert red > 40  # a frame after the fade, not a black one


# ---- actions -------------------------------------------------------------------------------------


def test_rerun_queues_one_job_and_a_second_click_says_already_queued(client: TestClient, library: WebLibrary) -> None:
    """The first re-run answers 'queued' and creates one job; the second answers 'already queued'."""
    media_id = library.demo_ids[5]
    token = csrf_of(client)
    first = client.post(f"/media/{media_id}/rerun", data={"stage": RERUN_STAGE, "csrf_token": token})
    assert first.status_code == 200
    assert "<strong>queued</strong>" in first.text
    rows = _jobs_for(library.engine, media_id, RERUN_STAGE)
    assert len(rows) == 1 and rows[0][1] == "queued"
    with library.engine.connect() as conn:
        payload = conn.execute(select(OllamaJob.payload).where(OllamaJob.id == rows[0][0])).scalar_one()
    assert json.loads(payload)["force"] is True
    second = client.post(f"/media/{media_id}/rerun", data={"stage": RERUN_STAGE, "csrf_token": token})
    assert second.status_code == 200 and "<strong>already queued</strong>" in second.text
    assert _jobs_for(library.engine, media_id, RERUN_STAGE) == rows
    everything = client.post(f"/media/{media_id}/rerun", data={"stage": "all", "csrf_token": token})
    assert everything.text.count("<strong>queued</strong>") == len(STAGES) - 1
    assert everything.text.count("<strong>already queued</strong>") == 1
    item = client.get(f"/media/{media_id}").text
    assert f"<td>{rows[0][0]}</td>" in item  # the job history on the item page


def test_queue_page_counts_jobs_and_cancel_and_retry_buttons_work(client: TestClient, library: WebLibrary) -> None:
    """The queue page shows counts per state and type; cancel and retry go through the job API."""
    media_id, job_type = library.demo_ids[6], "ollama_caption"
    token = csrf_of(client)
    client.post(f"/media/{media_id}/rerun", data={"stage": job_type, "csrf_token": token})
    (job_id, _status), = _jobs_for(library.engine, media_id, job_type)
    page = client.get("/queue")
    assert page.status_code == 200 and f'data-job-id="{job_id}"' in page.text
    assert f"/jobs/{job_id}/cancel" in page.text
    counts = jobs.queue_counts(library.pipeline)
    assert f"<th><code>{job_type}</code></th>" in page.text
    assert f"<td>{counts.total['queued']}</td>" in page.text
    cancelled = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert cancelled.status_code == 200 and f"Job {job_id} was cancelled." in cancelled.text
    assert _jobs_for(library.engine, media_id, job_type) == [(job_id, "cancelled")]
    retried = client.post(f"/jobs/{job_id}/retry", data={"csrf_token": token})
    assert retried.status_code == 200 and f"Job {job_id} is queued again." in retried.text
    assert _jobs_for(library.engine, media_id, job_type) == [(job_id, "queued")]
    again = client.post(f"/jobs/{job_id}/retry", data={"csrf_token": token})
    assert again.status_code == 400 and "validation/validation.payload" in again.text


def test_queue_limit_and_validation_errors_render_channel_and_code(library: WebLibrary) -> None:
    """A full queue answers 429 naming queue_limit/…; an unknown stage answers 400 naming validation/…."""
    settings = library.settings.model_copy(update={"pipeline": library.settings.pipeline.model_copy(update={
        "queue": library.settings.pipeline.queue.model_copy(update={"max_queued": 1})})})
    pipeline = Pipeline.from_settings(settings)
    jobs.enqueue_ollama(library.pipeline, "ollama_caption", library.demo_ids[7], {"force": True})
    app = create_app(settings, pipeline=pipeline)
    with TestClient(app, base_url=BASE) as c:
        token = csrf_of(c)
        r = c.post(f"/media/{library.demo_ids[7]}/rerun", data={"stage": "ollama_title", "csrf_token": token})
        assert r.status_code == 429
        assert "error [queue_limit/queue_limit.overflow]" in r.text and "max_queued" in r.text
        bad = c.post(f"/media/{library.demo_ids[7]}/rerun", data={"stage": "ollama_<b>nope", "csrf_token": token})
        assert bad.status_code == 400 and "validation/validation.job_type" in bad.text
        assert "&lt;b&gt;" in bad.text
        missing = c.post("/media/999999/rerun", data={"stage": "ollama_caption", "csrf_token": token})
        assert missing.status_code == 404 and "validation/validation.media_missing" in missing.text


# ---- untrusted content and hostile requests -----------------------------------------------------------


def test_script_in_caption_and_title_is_shown_as_text(client: TestClient, library: WebLibrary) -> None:
    """A caption holding <script> and a title holding an onerror image appear escaped everywhere."""
    for url in ("/", f"/media/{library.script_id}"):
        html = client.get(url).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script" not in html and "<img src=x" not in html
        assert "&lt;img src=x onerror=alert(2)&gt;" in html
    r = client.get("/")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none' forbids scripts
    assert "default-src 'none'" in r.headers["content-security-policy"]


TRAVERSALS = (
    "/media/..%2f..%2fetc/passwd", "/media/..%2F..%2Fetc%2Fpasswd", "/image/..%2f..%2fetc%2fpasswd",
    "/image/%2e%2e/%2e%2e/etc/passwd", "/image/%252e%252e%252fetc%252fpasswd", "/thumb/..%5c..%5cetc%5cpasswd",
    "/image/%2fetc%2fpasswd", "/image//etc/passwd", "/thumb/1%00", "/image/-1", "/image/1.jpg/../../etc/passwd",
    "/static/..%2f..%2fapp.py", "/static/%2e%2e/%2e%2e/app.py", "/static/../app.py", "/static/%2fetc%2fpasswd",
    "/media/1/..%2f..%2f..%2fetc%2fpasswd",
)


def test_traversal_in_urls_is_refused(library: WebLibrary, app: FastAPI) -> None:
    """Encoded, double-encoded, dot-segment, absolute and backslash traversal attempts answer 400/404."""
    assert _raw_get(app, "/static/style.css")[0] == 200  # the helper reaches the app
    assert _raw_get(app, f"/thumb/{library.demo_ids[0]}")[0] == 200
    for path in TRAVERSALS:
        status, body = _raw_get(app, path)
        assert status in (400, 404, 405), (path, status)
        assert b"root:" not in body and b"create_app" not in body, path


def _raw_get(app: FastAPI, raw_path: str) -> tuple[int, bytes]:
    """GET the path exactly as a server hands it on: percent-decoded, dot segments kept, no normalisation."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path), "raw_path": raw_path.encode("ascii"), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        sent_request = False
        finished = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # like a server: "disconnect" only once the response is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished.set()

        await app(scope, receive, send)

    asyncio.run(run())
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return int(status), b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_media_paths_outside_the_root_are_refused(client: TestClient, library: WebLibrary) -> None:
    """Rows whose path is ../../etc/passwd, absolute, or a symlink leaving the root get no thumbnail/image."""
    for name, media_id in library.outside_ids.items():
        for kind in ("thumb", "image"):
            r = client.get(f"/{kind}/{media_id}")
            assert r.status_code in (400, 404), (name, kind, r.status_code)
            assert r.headers["content-type"].startswith("text/plain") and b"root:" not in r.content
    thumbs = library.settings.logs_dir.parent / ".thumbs"
    secret = (library.root / "outside" / "secret.jpg").read_bytes()
    assert all(p.read_bytes() != secret for p in thumbs.rglob("*.jpg"))
    page = client.get(f"/media/{library.outside_ids['dotdot']}")
    assert page.status_code == 200 and "../../etc/passwd" in page.text  # shown as text, never read


def test_post_without_a_valid_csrf_token_is_refused(client: TestClient, library: WebLibrary) -> None:
    """Missing field, wrong field, missing cookie, foreign or null Origin: 403 and no job."""
    media_id = library.demo_ids[8]
    token = csrf_of(client)
    url = f"/media/{media_id}/rerun"
    assert client.post(url, data={"stage": "ollama_title"}).status_code == 403
    assert client.post(url, data={"stage": "ollama_title", "csrf_token": "x" * 43}).status_code == 403
    foreign = client.post(url, data={"stage": "ollama_title", "csrf_token": token},
                          headers={"origin": "http://evil.example"})
    assert foreign.status_code == 403 and "Cross-origin" in foreign.text
    assert client.post(url, data={"stage": "ollama_title", "csrf_token": token},
                       headers={"origin": "null"}).status_code == 403
    assert client.post(url, data={"stage": "ollama_title", "csrf_token": token},
                       headers={"referer": "http://127.0.0.1.evil.example/x"}).status_code == 403
    assert client.post("/jobs/1/cancel", data={}).status_code == 403
    with TestClient(client.app, base_url=BASE) as fresh:  # no cookie at all
        assert fresh.post(url, data={"stage": "ollama_title", "csrf_token": token}).status_code == 403
    assert _jobs_for(library.engine, media_id, "ollama_title") == []
    ok = client.post(url, data={"stage": "ollama_title", "csrf_token": token}, headers={"origin": BASE})
    assert ok.status_code == 200 and len(_jobs_for(library.engine, media_id, "ollama_title")) == 1


def test_foreign_host_header_is_refused_on_loopback(client: TestClient) -> None:
    """Without a token the UI answers only loopback Host names (DNS rebinding defence)."""
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/healthz", headers={"host": "localhost:8080"}).status_code == 200
    assert client.get("/healthz", headers={"host": "[::1]:8080"}).status_code == 200


def test_malformed_host_header_is_not_taken_for_loopback(client: TestClient) -> None:
    """A Host value with userinfo, a path or two ports (`localhost:80@evil.example`) is refused (400)."""
    for host in ("localhost:80@evil.example", "127.0.0.1:8080@evil.example", "localhost@evil.example",
                 "localhost:80/evil.example", "localhost:80:81", "localhost evil.example", "[::1]@evil.example",
                 ""):
        assert client.get("/healthz", headers={"host": host}).status_code == 400, host
    assert client.get("/healthz", headers={"host": "127.0.0.1:8080"}).status_code == 200


def test_ids_beyond_any_database_integer_answer_404_not_500(client: TestClient, library: WebLibrary) -> None:
    """`/thumb/99999999999999999999999` and every other id route answer 404; paging ignores such ids."""
    huge = "99999999999999999999999"
    for path in (f"/thumb/{huge}", f"/image/{huge}", f"/media/{huge}", f"/media/{huge}.json",
                 f"/api/media/{huge}", f"/thumb/{2**63}"):
        assert client.get(path).status_code == 404, path
    token = csrf_of(client)
    assert client.post(f"/media/{huge}/rerun", data={"stage": "ollama_title", "csrf_token": token}).status_code == 404
    assert client.post(f"/jobs/{huge}/retry", data={"csrf_token": token}).status_code == 404
    assert client.get("/", params={"after": huge}).status_code == 200
    assert client.get("/queue", params={"done": "retried", "job": huge}).status_code == 200


def test_short_web_token_is_refused_for_a_non_loopback_bind(library: WebLibrary) -> None:
    """A `pipeline.web_token` under 16 characters does not open a public bind (typed config error)."""
    def with_token(token: str) -> Settings:
        return library.settings.model_copy(update={"pipeline": library.settings.pipeline.model_copy(
            update={"web_token": token})})

    for token in ("abc", "x" * 15):
        with pytest.raises(ConfigError, match="at least 16") as caught:
            check_bind("0.0.0.0", with_token(token))
        assert caught.value.code == "validation.config" and token not in str(caught.value)
    check_bind("0.0.0.0", with_token("x" * 16))
    check_bind("127.0.0.1", with_token("abc"))  # loopback needs no token at all


def test_non_loopback_bind_needs_a_token_which_every_request_then_needs(library: WebLibrary) -> None:
    """0.0.0.0 without a token is refused; with one, requests without it get 401 and with it 200."""
    with pytest.raises(ConfigError, match="web_token"):
        check_bind("0.0.0.0", library.settings)
    check_bind("127.0.0.1", library.settings)
    check_bind("::1", library.settings)
    secret = "s3cret-token-for-tests-0123456789"
    settings = library.settings.model_copy(update={"pipeline": library.settings.pipeline.model_copy(
        update={"web_token": secret})})
    check_bind("0.0.0.0", settings)
    app = create_app(settings, pipeline=library.pipeline)
    with TestClient(app, base_url="http://192.0.2.10:8080") as c:
        for path in ("/", "/healthz", f"/media/{library.demo_ids[0]}", f"/thumb/{library.demo_ids[0]}"):
            assert c.get(path).status_code == 401, path
        assert c.get("/healthz", params={"token": "wrong"}).status_code == 401
        assert c.get("/healthz", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/healthz", headers={"authorization": f"Bearer {secret}"}).status_code == 200
        assert c.get("/healthz", headers={"x-auth-token": secret}).status_code == 200
        r = c.get("/", params={"token": secret, "tag": "cat"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?tag=cat"
        assert c.cookies.get("op_token") == secret
        assert c.get("/").status_code == 200  # now from the cookie
        token = csrf_of(c)
        assert c.post(f"/media/{library.demo_ids[9]}/rerun", data={"stage": "ollama_title",
                                                                   "csrf_token": token}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_on_loopback_and_refuses_a_public_host_without_token(library: WebLibrary, tmp_path: Path) -> None:
    """`ollama-pipeline web` serves /healthz under uvicorn; --host 0.0.0.0 without a token (or a short one) exits 2."""
    s = library.settings
    config = tmp_path / "ollama_pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "ollama": {"base_url": str(s.ollama.base_url), "model": {"default": s.ollama.model.default},
                   "timeout_ms": s.ollama.timeout_ms, "max_image_bytes": s.ollama.max_image_bytes},
        "database": {"url": s.database.url}, "media_root": str(s.media_root), "logs_dir": str(s.logs_dir)}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    refused = subprocess.run([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), "web",
                              "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "error [validation/validation.config]" in refused.stderr
    short = tmp_path / "short_token.yaml"
    short.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "pipeline": {"web_token": "abc"}}))
    refused = subprocess.run([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(short), "web",
                              "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "at least 16" in refused.stderr and "Traceback" not in refused.stderr
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), "web",
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "web server did not start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["ok"] is True
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- scale -----------------------------------------------------------------------------------------


def test_gallery_pages_are_right_on_100000_items(tmp_path: Path) -> None:
    """Keyset pages (first, middle, last, filtered, searched) on 100,000 media rows hold the right items.

    Their speed is measured by the benchmark (`python -m ollama_pipeline.bench.web_queries`), not here."""
    engine = make_engine(f"sqlite:///{tmp_path / 'big.db'}")
    init_db(engine)
    n = 100_000
    web_queries.fill_library(engine, n)
    cases = web_queries.page_cases(n)
    for name, (filters, after) in cases.items():
        page = queries.gallery_page(engine, filters, after=after)
        assert page.cards, name
        if after is not None:
            assert all(c.id < after for c in page.cards) or all(c.id > after for c in page.cards), name
    rare = queries.gallery_page(engine, queries.GalleryFilters(q="fox 99999"))
    assert [c.id for c in rare.cards] == [99999]
    engine.dispose()
