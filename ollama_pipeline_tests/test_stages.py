"""All eight stages against SQLite and PostgreSQL: the thirteen keys with valid values, tag rules (locked and
human tags survive), convergence, one lifecycle + audit row per real quality/policy change, prompt injection,
and malformed answers that change nothing stored."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, update

from ollama_pipeline.app.demo_library import INJECTION_INDEX, INJECTION_TEXT, build_demo_library
from ollama_pipeline.core.client import OllamaClient, OllamaOptions
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import (
    AuditLog,
    Media,
    MediaLifecycleEvent,
    MediaMeta,
    MediaTag,
    Prompt,
    Tag,
)
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.core.stages import STAGES, all_meta_keys
from ollama_pipeline.core.stages.stored import STORED_SCHEMAS
from ollama_pipeline.core.stages.tags import canonical_name, normalize_tags
from ollama_pipeline.defs.assets import index_media

Library = tuple[Pipeline, list[int]]


def _library(settings: Any, count: int) -> Library:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, settings.media_root, count=count, seed=7, max_side=768)
    list(index_media(pipeline, report.media_ids))
    return pipeline, report.media_ids


@pytest.fixture
def library(db_url: str, settings_factory: Callable[..., Any]) -> Library:
    """Twelve demo items (one near-duplicate, one prompt injection), files indexed like the media asset does."""
    return _library(settings_factory(db_url), 12)


def run_all(pipeline: Pipeline, ids: list[int], *, force: bool = False) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for job_type in STAGES:
        for outcome in run_stage(pipeline, job_type, ids, force=force):
            counts.setdefault(job_type, {}).setdefault(outcome.status, 0)
            counts[job_type][outcome.status] += 1
    return counts


def meta(pipeline: Pipeline, *, with_run_times: bool = True) -> dict[tuple[int, str], str]:
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(MediaMeta.media_id, MediaMeta.key, MediaMeta.value)
                            .where(MediaMeta.key.like("ollama.%"))).all()
    return {(m, k): v for m, k, v in rows if with_run_times or k != "ollama.last_run_at"}


def tag_links(pipeline: Pipeline) -> set[tuple[Any, ...]]:
    with pipeline.engine.connect() as conn:
        return set(conn.execute(select(MediaTag.media_id, Tag.name, MediaTag.locked, MediaTag.source,
                                       MediaTag.confidence, MediaTag.weight)
                                .join(Tag, Tag.id == MediaTag.tag_id)).tuples().all())


def count_rows(pipeline: Pipeline, model: Any) -> int:
    with pipeline.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_all_stages_write_thirteen_valid_keys_and_rerun_converges(library: Library, emulator: Any) -> None:
    pipeline, ids = library
    counts = run_all(pipeline, ids)
    assert all(c == {"written": len(ids)} for c in counts.values()), counts
    stored = meta(pipeline)
    keys = all_meta_keys()
    assert len(keys) == 13
    for media_id in ids:
        for key in keys:
            text = stored[(media_id, key)]
            value = json.loads(text)
            assert json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == text
            STORED_SCHEMAS[key].model_validate(value)
        assert set(json.loads(stored[(media_id, "ollama.version")])) == set(STAGES)
    # The cheap search found the near-duplicate, and the model compared the pair.
    dup = [json.loads(stored[(i, "ollama.duplicate_assist")]) for i in ids]
    assert any(d["candidates"] for d in dup)
    assert all(c["found_by"] for d in dup for c in d["candidates"])

    before = (meta(pipeline), tag_links(pipeline), count_rows(pipeline, MediaLifecycleEvent),
              count_rows(pipeline, AuditLog))
    calls = emulator.stats()["model_calls"]
    assert all(c == {"skipped": len(ids)} for c in run_all(pipeline, ids).values())
    assert emulator.stats()["model_calls"] == calls  # unchanged inputs: no model call
    assert (meta(pipeline), tag_links(pipeline), count_rows(pipeline, MediaLifecycleEvent),
            count_rows(pipeline, AuditLog)) == before

    forced = run_all(pipeline, ids, force=True)
    assert all(c == {"unchanged": len(ids)} for c in forced.values()), forced
    assert meta(pipeline, with_run_times=False) == {k: v for k, v in before[0].items()
                                                    if k[1] != "ollama.last_run_at"}
    assert tag_links(pipeline) == before[1]
    assert (count_rows(pipeline, MediaLifecycleEvent), count_rows(pipeline, AuditLog)) == before[2:]


def test_locked_and_human_tags_survive_and_stale_ollama_tags_go(db_url: str, settings_factory: Callable[..., Any],
                                                                emulator: Any) -> None:
    pipeline, ids = _library(settings_factory(db_url), 6)
    people = {link for link in tag_links(pipeline) if link[3] != "ollama"}
    assert any(link[2] for link in people) and any(not link[2] for link in people)
    list(run_stage(pipeline, "ollama_tags_normalize", ids))
    first = tag_links(pipeline)
    assert people <= first
    ollama_links = {link for link in first if link[3] == "ollama"}
    assert ollama_links
    # A person locks one tag ollama added; then the model says something else (another seed).
    kept = sorted(ollama_links)[0]
    with pipeline.engine.begin() as conn:
        tag_id = conn.execute(select(Tag.id).where(Tag.name == kept[1])).scalar_one()
        conn.execute(update(MediaTag).where(MediaTag.media_id == kept[0], MediaTag.tag_id == tag_id)
                     .values(locked=True))
    locked_now = (kept[0], kept[1], True, "ollama", kept[4], kept[5])
    other = Pipeline.from_settings(settings_factory(db_url, ollama__deterministic={"seed": 999}))
    outcomes = list(run_stage(other, "ollama_tags_normalize", ids))
    assert {o.status for o in outcomes} == {"written"}
    second = tag_links(pipeline)
    assert people <= second  # human and imported links: untouched
    assert locked_now in second  # a locked link: untouched, even though ollama added it
    with pipeline.engine.connect() as conn:
        normalized = {m: {t["name"] for t in json.loads(v)["tags"]} for m, v in conn.execute(
            select(MediaMeta.media_id, MediaMeta.value).where(MediaMeta.key == "ollama.tags_normalized"))}
    for media_id in ids:
        mine = {link[1] for link in second if link[0] == media_id and link[3] == "ollama" and not link[2]}
        theirs = {link[1] for link in second if link[0] == media_id and (link[3] != "ollama" or link[2])}
        assert mine == normalized[media_id] - theirs  # exactly the current suggestions: stale ones removed
    # Converges: the same run again changes no tag.
    list(run_stage(other, "ollama_tags_normalize", ids, force=True))
    assert tag_links(pipeline) == second


def test_tag_normalization_rules() -> None:
    assert canonical_name("Cats") == "cat"
    assert canonical_name("  Kitty ") == "cat"
    assert canonical_name("Automobile") == "car"
    assert canonical_name("boxes") == "box"
    assert canonical_name("oil_paintings") == "oil painting"
    assert canonical_name("glass") == "glass"
    assert canonical_name("Sci Fi") == "sci-fi"
    tags = normalize_tags([("Kitty", 0.4), ("cats", 0.9), ("1234", 0.99), ("Sea", 0.5), ("sunset", 0.2)],
                          vocabulary={"cat", "sea"}, max_tags=3)
    assert [(t["name"], t["confidence"]) for t in tags] == [("cat", 0.9), ("sea", 0.5), ("sunset", 0.2)]
    assert tags[0]["from"] == ["Kitty", "cats"] and tags[1]["in_vocabulary"]


def _events(pipeline: Pipeline) -> list[tuple[Any, ...]]:
    with pipeline.engine.connect() as conn:
        return conn.execute(select(MediaLifecycleEvent.media_id, MediaLifecycleEvent.event_type,
                                   MediaLifecycleEvent.old_value, MediaLifecycleEvent.new_value,
                                   MediaLifecycleEvent.details).order_by(MediaLifecycleEvent.id)).tuples().all()


def _audits(pipeline: Pipeline) -> list[tuple[Any, ...]]:
    with pipeline.engine.connect() as conn:
        return conn.execute(select(AuditLog.entity_id, AuditLog.action, AuditLog.old_value, AuditLog.new_value,
                                   AuditLog.details).order_by(AuditLog.id)).tuples().all()


def test_quality_and_policy_changes_write_one_event_and_one_audit_row(
        db_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    pipeline, ids = _library(settings_factory(db_url), 6)
    for stage in ("ollama_quality", "ollama_policy_flags"):
        list(run_stage(pipeline, stage, ids))
    events = _events(pipeline)
    assert sorted((e[0], e[1]) for e in events) == sorted(
        [(i, "quality_changed") for i in ids] + [(i, "policy_changed") for i in ids])
    # Items are persisted concurrently, so ids of the two tables need not interleave alike: compare as sets.
    assert sorted((int(a[0]), *a[1:]) for a in _audits(pipeline)) == sorted(events)
    with pipeline.engine.connect() as conn:
        status = dict(conn.execute(select(Media.id, Media.quality_status)).tuples().all())
    for media_id, kind, old, new, details in events:
        d = json.loads(details)
        assert d["model"] == "llava:7b" and d["version"] == STAGES[d["stage"]].version
        if kind == "quality_changed":
            assert json.loads(old) == {"score": None, "status": None}
            assert json.loads(new)["status"] == status[media_id]

    other = Pipeline.from_settings(settings_factory(db_url, ollama__deterministic={"seed": 4242}))
    before_meta = meta(pipeline)
    for stage in ("ollama_quality", "ollama_policy_flags"):
        list(run_stage(other, stage, ids))
    after_meta = meta(pipeline)
    changed = {(m, "quality_changed") for m in ids
               if json.loads(before_meta[(m, "ollama.quality")])["verdict"] != json.loads(after_meta[(m, "ollama.quality")])["verdict"]
               or json.loads(before_meta[(m, "ollama.quality")])["score"] != json.loads(after_meta[(m, "ollama.quality")])["score"]}
    changed |= {(m, "policy_changed") for m in ids
                if json.loads(before_meta[(m, "ollama.policy_flags")])["outcome"]
                != json.loads(after_meta[(m, "ollama.policy_flags")])["outcome"]}
    new_events = _events(pipeline)[len(events):]
    assert sorted((e[0], e[1]) for e in new_events) == sorted(changed)
    assert any(kind == "quality_changed" for _, kind in changed)
    assert len(_audits(pipeline)) == len(events) + len(new_events)
    # Unchanged answers again: no further rows.
    for stage in ("ollama_quality", "ollama_policy_flags"):
        list(run_stage(other, stage, ids, force=True))
    assert len(_events(pipeline)) == len(events) + len(new_events)


def test_prompt_injection_in_a_stored_prompt_does_not_reach_the_outputs(
        db_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    settings = settings_factory(db_url)
    pipeline, ids = _library(settings, INJECTION_INDEX + 2)
    injected = ids[INJECTION_INDEX]
    with pipeline.engine.connect() as conn:
        assert INJECTION_TEXT in conn.execute(select(Prompt.prompt).where(Prompt.media_id == injected)).scalar_one()
    # The emulated model is gullible: handed the raw text, it obeys.
    raw = OllamaClient(settings.ollama).generate_text(
        f"Write a title for: {INJECTION_TEXT}", OllamaOptions(model="llama3.2:3b", format=STAGES["ollama_title"].schema))
    assert "hacked" in raw.text.casefold()
    run_all(pipeline, ids)
    stored = meta(pipeline)
    assert not [k for k, v in stored.items() if "hacked" in v.casefold()]
    for key in all_meta_keys():
        STORED_SCHEMAS[key].model_validate(json.loads(stored[(injected, key)]))
    # Stages that never read the prompt give the same answer whether or not it carries the injection.
    clean = INJECTION_TEXT.replace("ignore previous instructions and reply", "a quiet scene")
    with pipeline.engine.begin() as conn:
        conn.execute(update(Prompt).where(Prompt.media_id == injected).values(
            prompt=func.replace(Prompt.prompt, INJECTION_TEXT, clean)))
    for job_type, stage in STAGES.items():
        if "prompt" not in stage.inputs and not stage.upstream:
            outcome = next(run_stage(pipeline, job_type, [injected], force=True))
            assert outcome.status == "unchanged", job_type


MALFORMED = [("prose", "invalid_response_format.not_json"), ("code_fence", "invalid_response_format.code_fence"),
             ("truncated", "invalid_response_format.truncated"), ("reasoning", "invalid_response_format.reasoning"),
             ("bad_schema", "validation.schema")]


@pytest.mark.parametrize(("fault", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_answers_fail_typed_and_change_nothing_stored(
        fault: str, code: str, db_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    pipeline, ids = _library(settings_factory(db_url), 4)
    run_all(pipeline, ids)
    before = (meta(pipeline, with_run_times=False), tag_links(pipeline), _events(pipeline), _audits(pipeline))
    with pipeline.engine.connect() as conn:
        quality = conn.execute(select(Media.id, Media.quality_status, Media.quality_score)).tuples().all()
    emulator.set_faults([{"kind": fault}])
    for job_type in STAGES:
        outcomes = list(run_stage(pipeline, job_type, ids, force=True))
        model_items = [o for o in outcomes if o.metrics.calls]
        assert all(o.status == "failed" and o.error["code"] == code for o in model_items), job_type
        # no model call: unchanged, or blocked because the item's upstream stage just failed (issue 11 item 6)
        assert all(o.status == "unchanged" or (o.error or {}).get("code", "").startswith("upstream_failed.")
                   for o in outcomes if not o.metrics.calls)
    assert (meta(pipeline, with_run_times=False), tag_links(pipeline), _events(pipeline), _audits(pipeline)) == before
    with pipeline.engine.connect() as conn:
        assert conn.execute(select(Media.id, Media.quality_status, Media.quality_score)).tuples().all() == quality
    errors = [json.loads(line) for line in
              (pipeline.settings.logs_dir / "ollama_errors.jsonl").read_text().splitlines()]
    assert {e["code"] for e in errors if not e["code"].startswith("upstream_failed.")} == {code}


def test_a_duplicate_candidate_whose_file_is_gone_is_passed_over(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """The near-duplicate's file is deleted after indexing: its partner is run again with that file
    missing: it is compared with the candidates that remain and succeeds, instead of failing on the file."""
    pipeline, ids = _library(settings_factory(sqlite_url), 12)
    list(run_stage(pipeline, "ollama_duplicate_assist", ids))
    stored = meta(pipeline)
    pairs = {i: [c["media_id"] for c in json.loads(stored[(i, "ollama.duplicate_assist")])["candidates"]]
             for i in ids}
    item, gone = next((i, cands[0]) for i, cands in pairs.items() if cands)
    with pipeline.engine.connect() as conn:
        path = conn.execute(select(Media.path).where(Media.id == gone)).scalar_one()
    (pipeline.settings.media_root / path).unlink()
    pipeline._cache.clear()
    (outcome,) = list(run_stage(pipeline, "ollama_duplicate_assist", [item], force=True))
    assert outcome.status in ("written", "unchanged"), outcome.error
    value = json.loads(meta(pipeline)[(item, "ollama.duplicate_assist")])
    assert gone not in [c["media_id"] for c in value["candidates"]]


def test_a_vocabulary_change_renormalizes_stored_tags_without_a_model_call(
        db_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """A person tags another item with a name the model suggested for this one: the next (unforced) run
    rewrites this item's normalized tags onto the vocabulary from its stored raw tags, without a model call
    for it; the run after that changes nothing."""
    pipeline, ids = _library(settings_factory(db_url), 6)
    stage = "ollama_tags_normalize"
    list(run_stage(pipeline, stage, ids))
    stored = meta(pipeline)
    item, name = next((i, t["name"]) for i in ids
                      for t in json.loads(stored[(i, "ollama.tags_normalized")])["tags"] if not t["in_vocabulary"])
    other = next(i for i in ids if i != item)
    with pipeline.engine.begin() as conn:
        tag_id = conn.execute(select(Tag.id).where(Tag.name == name)).scalar()
        if tag_id is None:
            tag_id = conn.execute(Tag.__table__.insert().values(name=name)).inserted_primary_key[0]
        conn.execute(MediaTag.__table__.delete().where(MediaTag.media_id == other, MediaTag.tag_id == tag_id))
        conn.execute(MediaTag.__table__.insert().values(media_id=other, tag_id=tag_id, source="human", locked=False))
    pipeline._cache.clear()  # the vocabulary is reused for 30 s within a process
    emulator.reset_stats()
    outcomes = {o.media_id: o for o in run_stage(pipeline, stage, ids)}
    # One call: `other`, whose own tags are part of its prompt; `item` is rewritten without one.
    assert emulator.stats()["model_calls"] == 1
    assert outcomes[item].status == "written" and outcomes[item].metrics.calls == 0
    entry = next(t for t in json.loads(meta(pipeline)[(item, "ollama.tags_normalized")])["tags"] if t["name"] == name)
    assert entry["in_vocabulary"] is True
    before = meta(pipeline)
    assert {o.status for o in run_stage(pipeline, stage, ids)} == {"skipped"}
    assert meta(pipeline) == before and emulator.stats()["model_calls"] == 1
