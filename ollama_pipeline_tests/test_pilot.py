"""`ollama-pipeline pilot --items N`: every stage on an evenly spread sample, the model time per item and
an ETA for the library on the configured hosts, results reviewable in the web UI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.app.pilot import PILOT_STAGES, sample_ids
from ollama_pipeline.app.web.app import create_app
from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline_tests.test_hosts import EmulatorProcess


def test_sample_is_spread_over_the_library() -> None:
    """The first and last ids and evenly spaced ones between; all ids when the library is smaller."""
    assert sample_ids(list(range(1, 101)), 5) == [1, 26, 51, 75, 100]
    assert sample_ids([3, 4], 20) == [3, 4]


def test_pilot_runs_every_stage_on_a_sample_and_prints_the_eta(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """4 of 10 items get all eight stages; the output names model time per item, the ETA and the item
    pages, and the web UI's item page shows the pilot's caption."""
    host = EmulatorProcess("--profile", "rtx3090-parallel4", "--time-scale", "200")
    try:
        config = tmp_path / "ollama_pipeline.yaml"
        config.write_text(json.dumps({
            "ollama": {"base_url": host.base_url, "model": {"default": "llava:7b"}, "timeout_ms": 30000,
                       "max_image_bytes": 1_000_000, "vision_model": "llava:7b", "text_model": "llama3.2:3b"},
            "database": {"url": f"sqlite:///{tmp_path / 'library.db'}"}, "media_root": "media",
            "logs_dir": "LOGS"}))
        settings = load_settings(config)
        engine = make_engine(settings.database.url)
        init_db(engine)
        ids = sorted(add_media_rows(engine, settings.media_root, 10).media_ids)
        assert cli_main(["--config", str(config), "pilot", "--items", "4"]) == 0
        out = capsys.readouterr().out
        sample = sample_ids(ids, 4)
        assert f"pilot: 4 of 10 item(s), all {len(PILOT_STAGES)} stages" in out
        assert "model time per item: median" in out and "ETA on the configured hosts:" in out
        assert all(f"/media/{i}" in out for i in sample)
        with engine.connect() as conn:
            rows = conn.execute(select(OllamaStageResult.media_id, OllamaStageResult.stage,
                                       OllamaStageResult.status)).all()
        assert {(r.media_id, r.stage) for r in rows if r.status == "ok"} >= {
            (i, s) for i in sample for s in PILOT_STAGES if s != "ollama_duplicate_assist"}
        assert {r.media_id for r in rows} == set(sample)
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as web:
            page = web.get(f"/media/{sample[0]}")
        assert page.status_code == 200 and "ollama.caption" in page.text
        engine.dispose()
    finally:
        host.kill()


def test_pilot_on_an_empty_library_is_a_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No media rows: one error line and exit code 2."""
    config = tmp_path / "ollama_pipeline.yaml"
    config.write_text(json.dumps({
        "ollama": {"base_url": "http://127.0.0.1:9", "model": {"default": "llava:7b"}, "timeout_ms": 1000,
                   "max_image_bytes": 100_000}, "database": {"url": f"sqlite:///{tmp_path / 'l.db'}"},
        "media_root": "."}))
    init_db(make_engine(load_settings(config).database.url))
    assert cli_main(["--config", str(config), "pilot"]) == 2
    assert "no media items" in capsys.readouterr().err
