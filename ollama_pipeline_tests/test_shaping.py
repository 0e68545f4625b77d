"""Requests shaped for Ollama's prompt cache and scheduler: a shared prefix for an item's vision prompts
(images go in front of the prompt text, ollama server/prompt.go chatPrompt), one num_ctx per model
(server/sched.go needsReload reloads a model whose options change), a warm-up load per model, and an
item's vision stages back to back on one slot (the slot's cache, runner/ollamarunner/cache.go), observed
through the emulator's counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline.core.runner import Pipeline, run_stage, run_stages
from ollama_pipeline.core.shaping import stage_order
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.core.stages.base import combined_schema, item_prefix
from ollama_pipeline.emulator.__main__ import build_parser as emulator_parser
from ollama_pipeline_tests.conftest import make_settings
from ollama_pipeline_tests.test_hosts import EmulatorProcess

VISION = [j for j, s in STAGES.items() if s.model_kind == "vision" and j != "ollama_duplicate_assist"]
HAS_COST_MODEL = any("--profile" in a.option_strings for a in emulator_parser()._actions)
needs_cost_model = pytest.mark.skipif(not HAS_COST_MODEL, reason="needs the emulator's profiles and cache counters")


def _settings(tmp_path: Path, base_url: str, **overrides: Any) -> Any:
    return make_settings(db_url=f"sqlite:///{tmp_path / 'library.db'}", media_root=tmp_path / "media",
                         logs_dir=tmp_path / "LOGS", base_url=base_url, **overrides)


def _library(settings: Any, count: int) -> list[int]:
    engine = make_engine(settings.database.url)
    init_db(engine)
    ids = sorted(add_media_rows(engine, settings.media_root, count).media_ids)
    engine.dispose()
    return ids


def test_an_items_vision_prompts_share_image_and_facts_and_end_with_their_question(library) -> None:
    """Every vision request of an item sends the item's image first and starts with the same facts; the
    stage's own question follows, so the shared part is a prefix Ollama can reuse."""
    settings, engine, ids = library
    inputs = repository.load_inputs_many(engine, ids[:1])[ids[0]]
    prefix = item_prefix(inputs)
    assert str(inputs.media.width) in prefix
    for job_type in VISION:
        stage = STAGES[job_type]
        (request,) = stage.plan(stage, inputs)
        assert request.images[0].media_id == inputs.media.id
        assert request.prompt.startswith(prefix)
        assert request.prompt[len(prefix):].startswith(stage.template.split("\n", 1)[0])


def test_vision_work_comes_before_text(tmp_path: Path) -> None:
    """Item-by-item runs order the stages vision first, then text, in registry order."""
    assert stage_order(["ollama_title", "ollama_policy_flags", "ollama_caption"]) == [
        "ollama_caption", "ollama_policy_flags", "ollama_title"]


@needs_cost_model
def test_vision_stages_item_by_item_reuse_the_cached_image_and_never_reload(tmp_path: Path) -> None:
    """Six vision stages item by item on a 4-slot host: most image tokens come from the prefix cache,
    each model is loaded once (by the warm-up, before the first item) and never reloaded, also not by a
    later run of other stages."""
    host = EmulatorProcess("--profile", "rtx3090-parallel4", "--time-scale", "200")
    try:
        settings = _settings(tmp_path, host.base_url)
        ids = _library(settings, 8)
        pipeline = Pipeline.from_settings(settings)
        outcomes = list(run_stages(pipeline, [*VISION, "ollama_title"], ids))
        assert {o.status for o in outcomes} == {"written"} and len(outcomes) == 8 * (len(VISION) + 1)
        stats = httpx.get(f"{host.base_url}/_emulator/stats").json()
        assert stats["image_tokens_cached"] >= 0.6 * stats["image_tokens"]
        assert stats["loads"] == 2 and stats["reloads"] == 0 and stats["max_inflight_seen"] <= 4
        events = [json.loads(line)["event"] for line in (settings.logs_dir / "ollama_jobs.jsonl").read_text().splitlines()]
        assert events.index("model_loaded") < events.index("stage_succeeded")
        list(run_stage(pipeline, "ollama_caption", ids, force=True))
        again = httpx.get(f"{host.base_url}/_emulator/stats").json()
        assert again["reloads"] == 0 and again["loads"] == 2
    finally:
        host.kill()


@needs_cost_model
def test_stage_by_stage_prefills_every_image_again(tmp_path: Path) -> None:
    """The contrast: the same stages one after another over all items find no image in the cache."""
    host = EmulatorProcess("--profile", "rtx3090-parallel4", "--time-scale", "200")
    try:
        settings = _settings(tmp_path, host.base_url)
        ids = _library(settings, 8)
        pipeline = Pipeline.from_settings(settings)
        for job_type in VISION[:3]:
            assert {o.status for o in run_stage(pipeline, job_type, ids)} == {"written"}
        stats = httpx.get(f"{host.base_url}/_emulator/stats").json()
        assert stats["image_tokens_cached"] < 0.2 * stats["image_tokens"] and stats["reloads"] == 0
    finally:
        host.kill()



def _stored(settings: Any, job_types: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    engine = make_engine(settings.database.url)
    with engine.connect() as conn:
        rows = conn.execute(select(OllamaStageResult).where(OllamaStageResult.stage.in_(job_types))).mappings()
        return {(r["stage"], int(r["media_id"])): dict(r) for r in rows}


def _jobs_log(settings: Any, event: str) -> list[dict[str, Any]]:
    path = settings.logs_dir / "ollama_jobs.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == event]


@needs_cost_model
def test_a_dagster_run_serves_each_items_image_from_the_cache_and_never_reloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`ollama-pipeline run` (one Dagster step) runs an item's vision stages back to back on one slot of
    its host, then the text stage: most image tokens come from Ollama's prefix cache
    (runner/ollamarunner/cache.go), no model is reloaded (server/sched.go needsReload), every value is stored."""
    host = EmulatorProcess("--profile", "rtx3090-parallel4", "--time-scale", "200")
    try:
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        settings = _settings(tmp_path, host.base_url)
        ids = _library(settings, 4)
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
        stages = [*VISION, "ollama_title"]
        assert cli_main(["--config", str(config), "run", "--stages", ",".join(stages)]) == 0, capsys.readouterr()
        stats = httpx.get(f"{host.base_url}/_emulator/stats").json()
        assert stats["image_tokens_cached"] >= 0.6 * stats["image_tokens"]
        assert stats["loads"] == 2 and stats["reloads"] == 0 and stats["max_inflight_seen"] <= 4
        stored = _stored(settings, stages)
        assert {(j, i) for j in stages for i in ids} == set(stored)
        assert {r["status"] for r in stored.values()} == {"ok"}
    finally:
        host.kill()


def test_combined_schema_nests_every_stages_schema_with_its_definitions() -> None:
    """The combined format holds each stage's own schema under its job type; nested definitions keep resolving."""
    stages = [STAGES[j] for j in VISION]
    schema = combined_schema(stages)
    assert schema["required"] == VISION and set(schema["properties"]) == set(VISION)
    text = json.dumps(schema)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/$defs/')[1:]}:
        assert ref in schema["$defs"]


def test_combined_request_makes_one_call_per_image_and_stores_each_stage_on_its_own(library, emulator) -> None:
    """With pipeline.combine_vision_stages one call per image answers every vision stage (the duplicate
    check, which compares two images, keeps its own); each stage is stored with its own version and
    fingerprint, and the call's tokens are shared out to the stages without loss."""
    settings, engine, ids = library
    off = Pipeline.from_settings(settings)
    assert {o.status for o in run_stages(off, VISION, ids)} == {"written"}
    calls_off = emulator.stats()["model_calls"]
    emulator.reset_stats()
    on = Pipeline.from_settings(settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
        update={"combine_vision_stages": True})}))
    outcomes = list(run_stages(on, VISION, ids, force=True))
    assert {o.status for o in outcomes} <= {"written", "unchanged"}
    assert calls_off == len(VISION) * len(ids) and emulator.stats()["model_calls"] == len(ids)
    stored = _stored(settings, VISION)
    for job_type in VISION:
        assert {stored[(job_type, i)]["version"] for i in ids} == {STAGES[job_type].version}
    events = _jobs_log(settings, "stage_succeeded")[-len(VISION) * len(ids):]
    assert {e["request"] for e in events} == {"combined"} and sum(e["calls"] for e in events) == len(ids)
    prompt = [e["prompt_eval_count"] for e in events]
    assert all(n > 0 for n in prompt) and sum(prompt) == emulator.stats()["prompt_tokens"]
    assert sum(e["eval_count"] for e in events) == emulator.stats()["output_tokens"]


def test_a_failed_part_of_a_combined_answer_falls_back_to_its_own_request(library, emulator) -> None:
    """The emulator breaks one part of every combined answer (fault bad_part): that stage alone asks its
    own question and is stored; the other parts are stored from the combined call."""
    settings, engine, ids = library
    pipeline = Pipeline.from_settings(settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
        update={"combine_vision_stages": True})}))
    broken = VISION.index("ollama_quality")
    emulator.set_faults([{"kind": "bad_part", "arg": broken, "match": "Return one JSON object with the keys"}])
    outcomes = list(run_stages(pipeline, VISION, ids))
    assert {o.status for o in outcomes} == {"written"} and len(outcomes) == len(VISION) * len(ids)
    assert emulator.stats()["model_calls"] == 2 * len(ids)  # the combined call, then quality's own
    rejected = _jobs_log(settings, "combined_part_rejected")
    assert {e["job_type"] for e in rejected} == {"ollama_quality"} and len(rejected) == len(ids)
    assert {e["code"] for e in rejected} == {"validation.schema"}
    requests = {(e["job_type"], e["request"]) for e in _jobs_log(settings, "stage_succeeded")}
    assert ("ollama_quality", "own") in requests and ("ollama_quality", "combined") not in requests
    assert {r for j, r in requests if j != "ollama_quality"} == {"combined"}
    assert {r["status"] for r in _stored(settings, VISION).values()} == {"ok"}


def test_toggling_combine_reruns_once_and_one_stages_change_reruns_only_that_stage(library, emulator) -> None:
    """Turning combine on is a deliberate re-run of the vision stages; a second run costs no call; a
    change to one stage's inputs (max_tags) re-runs only that stage, with its own request."""
    settings, engine, ids = library
    list(run_stages(Pipeline.from_settings(settings), VISION, ids))

    def with_(**pipeline_fields: Any) -> Pipeline:
        return Pipeline.from_settings(settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
            update=pipeline_fields)}))

    emulator.reset_stats()
    assert {o.status for o in run_stages(with_(combine_vision_stages=True), VISION, ids)} <= {"written", "unchanged"}
    assert emulator.stats()["model_calls"] == len(ids)
    emulator.reset_stats()
    assert {o.status for o in run_stages(with_(combine_vision_stages=True), VISION, ids)} == {"skipped"}
    assert emulator.stats()["model_calls"] == 0
    outcomes = list(run_stages(with_(combine_vision_stages=True, max_tags=3), VISION, ids))
    assert {o.stage for o in outcomes if o.status != "skipped"} == {"ollama_tags_normalize"}
    assert emulator.stats()["model_calls"] == len(ids)
    emulator.reset_stats()
    assert "skipped" not in {o.status for o in run_stages(with_(max_tags=3), VISION, ids)}
    assert emulator.stats()["model_calls"] == len(VISION) * len(ids)


def test_a_dagster_run_item_by_item_stops_on_its_circuit_breaker_and_leaves_the_rest_untouched(
        library, emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every call answers 500 in a run of two vision stages item by item: the run stops after
    pipeline.circuit_breaker failures in a row (exit 1, STOPPED), and items never tried have no result."""
    settings, engine, ids = library
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    settings = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
        update={"circuit_breaker": 2, "concurrency": 1})})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    emulator.set_faults(["http_500"])
    code = cli_main(["--config", str(config), "run", "--stages", "caption,quality"])
    out = capsys.readouterr().out
    assert code == 1 and "STOPPED" in out and "circuit breaker" in out
    stored = _stored(settings, ["ollama_caption", "ollama_quality"])
    assert 2 <= len(stored) < 2 * len(ids) and {r["status"] for r in stored.values()} == {"failed"}
    tried = {media_id for _, media_id in stored}
    assert len(tried) < len(ids)  # the rest untouched: no stage result at all
