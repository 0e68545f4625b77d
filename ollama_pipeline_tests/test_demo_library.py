"""Tests of the demo library builder: real files that match their rows, determinism, idempotence, test data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

from ollama_pipeline.app.demo_library import (
    INJECTION_INDEX,
    INJECTION_TEXT,
    DemoLibraryReport,
    add_media_rows,
    build_demo_library,
    canonical_json,
    plan_demo_items,
)
from ollama_pipeline.core.db.engine import make_engine
from ollama_pipeline.core.db.models import Base, Media, MediaMeta, MediaTag, Prompt, ScanResult, Tag

LIBRARY_SIZE = 30


@dataclass
class Library:
    engine: Engine
    root: Path
    report: DemoLibraryReport


def _sqlite_library(base: Path, count: int, **kwargs: Any) -> Library:
    base.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{base / 'library.db'}")
    report = build_demo_library(engine, base / "media", count, **kwargs)
    return Library(engine, base / "media", report)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    lib = _sqlite_library(tmp_path_factory.mktemp("demo"), LIBRARY_SIZE)
    yield lib
    lib.engine.dispose()


@pytest.fixture
def pg_engine(pg_database: str) -> Iterator[Engine]:
    """The PostgreSQL database of this test run (made and dropped by conftest), emptied for this test."""
    engine = make_engine(pg_database)
    Base.metadata.drop_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _media_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(Media.__table__).order_by(Media.id)))


def _snapshot(lib: Library) -> dict[str, tuple[Any, ...]]:
    """Per path: file bytes, media facts, prompt row, tag rows, scan row and meta rows (ids left out)."""
    out: dict[str, tuple[Any, ...]] = {}
    with lib.engine.connect() as conn:
        for m in conn.execute(select(Media.__table__)):
            prompt = conn.execute(
                select(
                    Prompt.prompt,
                    Prompt.negative_prompt,
                    Prompt.model,
                    Prompt.sampler,
                    Prompt.seed,
                    Prompt.size,
                ).where(Prompt.media_id == m.id)
            ).one()
            tags = sorted(
                conn.execute(
                    select(Tag.name, MediaTag.locked, MediaTag.source, MediaTag.confidence, MediaTag.weight)
                    .join(Tag, Tag.id == MediaTag.tag_id)
                    .where(MediaTag.media_id == m.id)
                ).all()
            )
            scan = conn.execute(
                select(
                    ScanResult.scanner, ScanResult.nsfw_score, ScanResult.flags, ScanResult.raw_json
                ).where(ScanResult.media_id == m.id)
            ).one()
            meta = sorted(
                conn.execute(select(MediaMeta.key, MediaMeta.value).where(MediaMeta.media_id == m.id))
            )
            facts = (m.width, m.height, m.rating, m.has_nsfw, m.hash, m.status)
            data = (lib.root / m.path).read_bytes()
            out[m.path] = (
                data,
                facts,
                tuple(prompt),
                tuple(map(tuple, tags)),
                tuple(scan),
                tuple(map(tuple, meta)),
            )
    return out


def _assert_files_match_rows(lib: Library) -> None:
    rows = _media_rows(lib.engine)
    assert rows
    for row in rows:
        assert "\\" not in row.path and not Path(row.path).is_absolute()
        file = lib.root / row.path
        data = file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.hash
        with Image.open(file) as image:
            image.load()
            assert image.size == (row.width, row.height)
        assert row.type == "image" and row.status == "active"
        assert row.quality_status is None and row.quality_score is None
        assert row.rating is None or 0 <= row.rating <= 5


def test_every_media_row_points_to_a_decodable_file_with_its_size_and_sha256(library: Library) -> None:
    """Each media row's file exists under media_root, decodes, and has the recorded size and hash."""
    _assert_files_match_rows(library)
    assert len(_media_rows(library.engine)) == LIBRARY_SIZE == library.report.created


def test_library_mixes_png_jpeg_and_webp_files(library: Library) -> None:
    """The files are a mix of PNG, JPEG and WebP, and the report counts them."""
    formats = set()
    for row in _media_rows(library.engine):
        with Image.open(library.root / row.path) as image:
            formats.add(image.format)
    assert formats == {"PNG", "JPEG", "WEBP"}
    assert set(library.report.formats) == {"png", "jpeg", "webp"}
    assert sum(library.report.formats.values()) == LIBRARY_SIZE


def test_items_carry_three_to_six_tags_some_locked_and_imported_with_confidence(library: Library) -> None:
    """Every item has 3-6 lower-case tags; some links are locked; imported links carry confidence and weight."""
    with library.engine.connect() as conn:
        per_item = conn.execute(select(MediaTag.media_id, func.count()).group_by(MediaTag.media_id)).all()
        links = conn.execute(select(MediaTag.__table__)).all()
        names = conn.execute(select(Tag.name)).scalars().all()
    assert len(per_item) == LIBRARY_SIZE and all(3 <= n <= 6 for _, n in per_item)
    assert any(link.locked for link in links) and not all(link.locked for link in links)
    assert {link.source for link in links} == {"human", "import"}
    for link in links:
        imported = link.source == "import"
        assert (link.confidence is not None) == imported and (link.weight is not None) == imported
    assert all(name == name.lower() for name in names) and {"cat", "portrait", "sunset"} <= set(names)


def test_every_item_has_one_nsfw_scan_with_json_flags(library: Library) -> None:
    """One nsfw_detector scan per item; NSFW items score high; flags and raw_json are JSON text."""
    with library.engine.connect() as conn:
        scans = conn.execute(
            select(ScanResult.__table__, Media.has_nsfw).join(Media, Media.id == ScanResult.media_id)
        ).all()
    assert len(scans) == LIBRARY_SIZE == len({s.media_id for s in scans})
    assert any(s.has_nsfw for s in scans) and not all(s.has_nsfw for s in scans)
    for scan in scans:
        assert scan.scanner == "nsfw_detector" and 0.0 <= scan.nsfw_score <= 1.0
        assert isinstance(json.loads(scan.flags), list) and isinstance(json.loads(scan.raw_json), dict)
        if scan.has_nsfw:
            assert scan.nsfw_score >= 0.7 and json.loads(scan.flags)


def test_prompts_look_like_stable_diffusion_prompts(library: Library) -> None:
    """One prompt row per item with SD-style text, a negative prompt, model, sampler, 32-bit seed and size."""
    with library.engine.connect() as conn:
        prompts = conn.execute(select(Prompt.__table__)).all()
    assert len(prompts) == LIBRARY_SIZE
    assert all("best quality" in p.prompt or "8k" in p.prompt or "masterpiece" in p.prompt for p in prompts)
    assert sum(p.negative_prompt is not None for p in prompts) >= LIBRARY_SIZE // 2
    assert all(p.model and p.sampler and 0 <= p.seed < 2**32 for p in prompts)
    assert all(len(p.size.split("x")) == 2 for p in prompts)


def test_meta_values_are_canonical_json(library: Library) -> None:
    """media_meta holds exif/votes/curation values as canonical JSON text."""
    with library.engine.connect() as conn:
        metas = conn.execute(select(MediaMeta.key, MediaMeta.value)).all()
    assert {key for key, _ in metas} == {"exif", "votes", "curation"}
    for _key, value in metas:
        assert canonical_json(json.loads(value)) == value


def test_exactly_one_prompt_carries_the_prompt_injection(library: Library) -> None:
    """Only the injection item's prompt asks the model to ignore its instructions."""
    with library.engine.connect() as conn:
        hits = conn.execute(select(Prompt.media_id).where(Prompt.prompt.contains("ignore previous"))).all()
    assert [h.media_id for h in hits] == [library.report.injection_media_id]
    assert library.report.media_ids[INJECTION_INDEX] == library.report.injection_media_id
    assert INJECTION_TEXT in plan_demo_items(1, start_index=INJECTION_INDEX)[0].scene.prompt


def test_near_duplicates_share_prompt_and_seed_but_not_bytes(library: Library) -> None:
    """Near-duplicate items repeat an earlier item's prompt and seed with different file bytes."""
    assert library.report.near_duplicates
    snap = _snapshot(library)
    for variant, original in library.report.near_duplicates:
        assert snap[variant][2] == snap[original][2]  # prompt row
        assert snap[variant][0] != snap[original][0]  # file bytes


def test_same_seed_gives_identical_files_and_rows(library: Library, tmp_path: Path) -> None:
    """A second library with the same seed in another folder has identical bytes, prompts, tags and scans."""
    other = _sqlite_library(tmp_path, 14)
    try:
        mine, theirs = _snapshot(library), _snapshot(other)
        assert set(theirs) <= set(mine) and len(theirs) == 14
        for path, item in theirs.items():
            assert item == mine[path], path
    finally:
        other.engine.dispose()


def test_different_seed_gives_different_library() -> None:
    """Another seed gives other prompts and other images."""
    first, second = plan_demo_items(6, seed=1), plan_demo_items(6, seed=2)
    assert [p.scene.prompt for p in first] != [p.scene.prompt for p in second]


def test_building_twice_adds_nothing(library: Library) -> None:
    """Calling again with the same arguments skips every existing path and leaves row counts unchanged."""
    seen: list[tuple[int, int]] = []
    again = build_demo_library(
        library.engine, library.root, LIBRARY_SIZE, progress=lambda d, t: seen.append((d, t))
    )
    assert again.created == 0 and again.skipped == LIBRARY_SIZE and again.media_ids == []
    assert seen[-1] == (LIBRARY_SIZE, LIBRARY_SIZE)
    with library.engine.connect() as conn:
        for table in (Media, Prompt, ScanResult):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == LIBRARY_SIZE


def test_start_index_appends_the_same_items_a_single_build_makes(tmp_path: Path) -> None:
    """Building 0-3 then 4-7 gives the same library as building 0-7 at once."""
    whole = _sqlite_library(tmp_path / "whole", 8, max_side=512)
    parts = _sqlite_library(tmp_path / "parts", 4, max_side=512)
    appended = build_demo_library(parts.engine, parts.root, 4, start_index=4, max_side=512)
    try:
        assert appended.created == 4
        assert _snapshot(whole) == _snapshot(parts)
    finally:
        whole.engine.dispose()
        parts.engine.dispose()


def test_large_images_stay_rare() -> None:
    """Plans keep >= 2048 px images to a few percent and at most one 4096x4096 per 50 items."""
    plans = plan_demo_items(1000)
    large = [p for p in plans if max(p.width, p.height) >= 2048]
    huge = [p.index for p in plans if (p.width, p.height) == (4096, 4096)]
    assert 0 < len(large) <= 50
    assert huge and all(b - a >= 50 for a, b in zip(huge, huge[1:], strict=False))
    assert max(max(p.width, p.height) for p in plan_demo_items(200, max_side=1024)) <= 1024
    assert sum(p.variant_of is not None for p in plans) >= 1000 // 14


def test_small_profile_keeps_images_at_most_512_px(tmp_path: Path) -> None:
    """add_media_rows writes small images (<= 512 px) with all their rows."""
    engine = make_engine(f"sqlite:///{tmp_path / 'bench.db'}")
    try:
        report = add_media_rows(engine, tmp_path / "media", 20, start_index=100)
        assert report.created == 20
        lib = Library(engine, tmp_path / "media", report)
        _assert_files_match_rows(lib)
        assert all(max(r.width, r.height) <= 512 for r in _media_rows(engine))
    finally:
        engine.dispose()


def test_library_persists_on_postgresql(pg_engine: Engine, tmp_path: Path) -> None:
    """On PostgreSQL the rows match the files, and a second call adds nothing."""
    report = build_demo_library(pg_engine, tmp_path / "media", 12, max_side=1024)
    lib = Library(pg_engine, tmp_path / "media", report)
    assert report.created == 12 and report.injection_media_id is not None
    _assert_files_match_rows(lib)
    again = build_demo_library(pg_engine, tmp_path / "media", 12, max_side=1024)
    assert again.created == 0 and again.skipped == 12
    snap = _snapshot(lib)
    assert len(snap) == 12
    with pg_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(MediaTag)).scalar_one() >= 36
        assert conn.execute(select(func.max(Prompt.seed))).scalar_one() < 2**32
