"""The bench (small N, nothing timed): its JSON carries every field, an unchanged re-run makes no model
call, a new prompt version of one stage re-runs that stage only, and the emulator process it starts
answers 503 past its queue limit."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.bench import add_arguments, render_table, run_bench, save
from ollama_pipeline.bench.harness import EmulatorProcess
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline.defs.assets import ordered_stages

REQUIRED = {"items", "stages", "model_calls", "ideal_s", "wall_s", "ratio_to_ideal", "per_item_run_speedup",
            "orchestration_cpu_ms_per_item_stage", "peak_rss_mb", "rerun_model_calls", "dagster_version",
            "instance", "raw_client_s", "sent_image_bytes_mean"}


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--items", "8", "--latency-ms", "0", "--per-item-sample", "1", "--cli-sample", "1",
                              "--image-count", "1", "--image-side", "1600", "--out", str(tmp_path / "bench.json"),
                              "--no-gpu", *extra])


@pytest.mark.parametrize("instance", ["sqlite", "postgres"])
def test_bench_json_has_every_field_and_an_unchanged_rerun_makes_no_model_call(
        tmp_path: Path, instance: str, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One scenario per instance storage: every field present, calls = items, re-run calls = 0."""
    monkeypatch.setenv("OLLAMA_PIPELINE_BENCH_PG", pg_database.rsplit("/", 1)[0] + "/postgres")
    args = _args(tmp_path, "--stages", "caption", "--instance", instance)
    report = run_bench(args)
    save(report, Path(args.out))
    data = json.loads(Path(args.out).read_text())
    (scenario,) = data["scenarios"]
    assert REQUIRED <= set(scenario)
    assert scenario["instance"] == instance and scenario["items"] == 8 and scenario["stages"] == ["ollama_caption"]
    assert scenario["model_calls"] == 8 and scenario["failed_items"] == 0
    assert scenario["rerun_model_calls"] == 0
    assert scenario["per_item_run_cli_s"] > 0 and scenario["per_item_run_speedup"] > 0
    assert scenario["wall_s"] > 0 and scenario["ideal_s"] == 0.0  # latency 0: the ideal is 0 s
    assert "caption" in render_table(report)
    images = data["images"]  # a 1600 px PNG is sent downscaled: far fewer bytes than the file
    assert images["sent_bytes_mean"] * 3 < images["source_bytes_mean"] and images["bytes_ratio"] > 3


def test_new_prompt_version_of_one_stage_reruns_that_stage_only(
        tmp_path: Path, sqlite_url: str, settings_factory: Callable[..., Settings], emulator: Any) -> None:
    """All eight stages over 6 items; then score_multi gets a new prompt version: 6 calls, all its own."""
    settings = settings_factory(sqlite_url)
    engine = make_engine(sqlite_url)
    init_db(engine)
    add_media_rows(engine, settings.media_root, 6)
    pipeline = Pipeline.from_settings(settings)
    from ollama_pipeline.defs.assets import index_media

    list(index_media(pipeline, range(1, 7), workers=2))
    stages = ordered_stages()
    for stage in stages:
        assert {o.status for o in run_stage(pipeline, stage, range(1, 7))} <= {"written", "unchanged"}
    emulator.reset_stats()
    for stage in stages:  # unchanged: nothing is sent to the model
        assert {o.status for o in run_stage(pipeline, stage, range(1, 7))} == {"skipped"}
    assert emulator.stats()["model_calls"] == 0
    bumped = {s.job_type: (replace(s, prompt_version=s.prompt_version + ".1") if s.job_type == "ollama_score_multi"
                           else s) for s in stages}
    statuses = {s.job_type: {o.status for o in run_stage(pipeline, bumped[s.job_type], range(1, 7))} for s in stages}
    assert statuses.pop("ollama_score_multi") <= {"written", "unchanged"}
    assert statuses == {s.job_type: {"skipped"} for s in stages if s.job_type != "ollama_score_multi"}
    assert emulator.stats()["model_calls"] == 6
    engine.dispose()


def test_emulator_process_answers_503_past_its_queue_limit() -> None:
    """`ollama-pipeline emulator --profile rtx3090 --max-queue 1`: of 6 calls arriving while the model loads, some
    get Ollama's 503 (only requests waiting for a load queue, as in server/sched.go); once loaded, none do."""
    with EmulatorProcess(profile="rtx3090", time_scale=10, max_queue=1) as emulator:
        body = {"model": "llama3.2:3b", "prompt": "hi", "stream": False, "format": "json", "options": {"num_predict": 8}}

        def call(_: int) -> httpx.Response:
            return httpx.post(f"{emulator.base_url}/api/generate", json=body, timeout=30)

        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(call, range(6)))
        busy = [r for r in responses if r.status_code == 503]
        assert busy and all("server busy" in r.json()["error"] for r in busy)
        assert {r.status_code for r in responses} <= {200, 503}
        assert emulator.stats()["rejected_busy"] == len(busy)
        assert emulator.calls() == len(responses) - len(busy)
        with ThreadPoolExecutor(max_workers=6) as pool:
            assert [r.status_code for r in pool.map(call, range(6))] == [200] * 6


def test_gpu_time_rows_name_each_loss_against_the_lower_bound(tmp_path: Path) -> None:
    """The GPU-time scenarios on an 8 GiB emulated GPU: both patterns, bound <= modeled GPU time, losses counted."""
    from ollama_pipeline.bench.gpu import gpu_bench, render_gpu_table

    rows = gpu_bench(tmp_path, items=2, time_scale=200, profiles=("rtx4060-8g",))
    pipeline, peer = rows
    assert (pipeline.pattern, peer.pattern) == ("pipeline", "peer")
    for row in rows:
        assert row.failed_calls == 0 and row.calls > 0
        assert 0 < row.lower_bound_s <= row.gpu_busy_s + row.load_s  # no pattern beats the bound in GPU time
        assert row.image_tokens_prefilled >= row.image_tokens_distinct > 0
    assert peer.calls > pipeline.calls  # one call per field
    assert peer.evictions > 0  # MAX_LOADED_MODELS=1 and interleaved stages: the models swap
    assert "wall/bnd" in render_gpu_table(rows)
