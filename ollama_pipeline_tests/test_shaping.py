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

from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.runner import Pipeline, run_stage, run_stages
from ollama_pipeline.core.shaping import stage_order
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.core.stages.base import item_prefix
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

