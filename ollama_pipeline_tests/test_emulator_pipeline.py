"""The pipeline against the faithful emulator: it detects what a real Ollama does silently or refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ollama_pipeline.app.demo_library import build_demo_library
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.defs.assets import index_media


def _pipeline(settings: Any, count: int = 3) -> tuple[Pipeline, list[int]]:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, settings.media_root, count=count, seed=3, max_side=256)
    list(index_media(pipeline, report.media_ids))
    return pipeline, report.media_ids


def _vision_stage() -> str:
    return next(job for job, stage in STAGES.items() if stage.model_kind == "vision")


def _text_stage() -> str:
    return next(job for job, stage in STAGES.items() if stage.model_kind == "text")


def test_a_vision_stage_refuses_a_model_without_vision(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """vision_model set to a text-only model: each item fails with validation.model_not_vision, no image is sent."""
    pipeline, ids = _pipeline(settings_factory(sqlite_url, ollama__vision_model="llama3.2:3b"))
    emulator.reset_stats()
    outcomes = list(run_stage(pipeline, _vision_stage(), ids))
    assert {o.status for o in outcomes} == {"failed"}
    assert {o.error["code"] for o in outcomes} == {"validation.model_not_vision"}
    assert emulator.stats()["model_calls"] == 0


def test_a_thinking_text_model_is_asked_not_to_think(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """text_model qwen3:4b (thinks by default in Ollama): the pipeline sends think=false, no thinking tokens are spent."""
    pipeline, ids = _pipeline(settings_factory(sqlite_url, ollama__text_model="qwen3:4b"))
    for job in STAGES:  # upstream stages first, then the text stage has its inputs
        if STAGES[job].model_kind == "vision":
            list(run_stage(pipeline, job, ids))
    emulator.reset_stats()
    outcomes = list(run_stage(pipeline, _text_stage(), ids))
    assert {o.status for o in outcomes} <= {"written", "unchanged", "skipped"}, [o.error for o in outcomes]
    stats = emulator.stats()
    assert stats["by_model"].get("qwen3:4b", 0) >= 1  # it was asked
    assert stats["models"]["qwen3:4b"]["thinking_tokens"] == 0



def _png(width: int, height: int, colour: tuple[int, int, int]) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_pipelines_num_ctx_fits_a_pair_of_large_images_that_ollamas_default_refuses(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """Two 1000 px images for llava (2,943 tokens each): 400 at Ollama's default 4,096, answered at the pipeline's."""
    import pytest

    from ollama_pipeline.core.errors import InvalidResponseFormatError

    pipeline = Pipeline.from_settings(settings_factory(sqlite_url))
    stage = STAGES["ollama_duplicate_assist"]
    options = pipeline.options_for(stage)
    pair = [_png(1000, 700, (200, 20, 20)), _png(1000, 700, (20, 20, 200))]
    with pytest.raises(InvalidResponseFormatError) as err:
        pipeline.client.analyze_image(pair, "Same picture?", options.model_copy(update={"num_ctx": None}))
    assert "exceeds the available context size" in err.value.message
    answer = pipeline.client.analyze_image(pair, "Same picture?", options)
    assert answer.prompt_eval_count > 2 * 2900 and answer.done_reason == "stop"


def test_every_call_of_a_run_carries_one_num_ctx(
        sqlite_url: str, settings_factory: Callable[..., Any], emulator: Any) -> None:
    """All stages over 12 items, run twice: every request has the same num_ctx, so the second run reloads no model."""
    import httpx

    pipeline = Pipeline.from_settings(settings_factory(sqlite_url))
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, pipeline.settings.media_root, count=12, seed=7, max_side=768)
    list(index_media(pipeline, report.media_ids))
    for job in STAGES:  # the first run loads (or reloads) what earlier users of this emulator left loaded
        assert {o.status for o in run_stage(pipeline, job, report.media_ids)} == {"written"}, job
    emulator.reset_stats()
    for job in STAGES:
        outcomes = list(run_stage(pipeline, job, report.media_ids, force=True))
        assert {o.status for o in outcomes} <= {"written", "unchanged"}, [o.error for o in outcomes]
    requests = httpx.get(emulator.base_url + "/_emulator/requests?limit=200").json()["requests"]
    assert requests and {r["options"].get("num_ctx") for r in requests} == {8192}
    assert emulator.stats()["reloads"] == 0
