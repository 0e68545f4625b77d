"""Media selections and bad CLI input (issue 11 items 7 and 9): one parser for every command, ranges
resolved in SQL without materializing them, every bad value a typed one-line error with exit code 2 and
nothing stored changed, and one table deciding which error codes are retried."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, func, select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.models import MediaMeta, OllamaJob, OllamaStageResult
from ollama_pipeline.core.errors import (
    ERROR_CLASSES,
    ERROR_CODES,
    OllamaPipelineError,
    PersistenceError,
    QueueLimitError,
    ValidationError,
)
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.queue.bulk import enqueue_selection
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.selection import parse_media_selection


def _config(tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in process like a shell would: argparse's exits become the exit code."""
    from ollama_pipeline.app.cli import main

    try:
        code = main(["--config", str(config), *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _state(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return (int(conn.execute(select(func.count()).select_from(OllamaJob)).scalar() or 0),
                int(conn.execute(select(func.count()).select_from(MediaMeta)).scalar() or 0),
                int(conn.execute(select(func.count()).select_from(OllamaStageResult)).scalar() or 0))


# Every bad value the issue names, plus its neighbours; each must be refused before anything runs.
BAD_INPUTS: list[tuple[str, ...]] = [
    ("run", "--media", "abc"),
    ("run", "--media", ""),
    ("run", "--media", "5-1"),
    ("run", "--media", "-3"),
    ("run", "--media", "0"),
    ("run", "--media", "99999999999999999999999"),
    ("run", "--media", "1,99999"),
    ("run", "--stages", ""),
    ("run", "--stages", "bogus"),
    ("enqueue", "ollama_caption", "abc"),
    ("enqueue", "ollama_caption", ""),
    ("enqueue", "ollama_caption", "5-1"),
    ("enqueue", "ollama_caption", "1-2x"),
    ("enqueue", "bogus", "1"),
    ("enqueue", "ollama_caption"),
    ("enqueue", "ollama_caption", "1", "--priority", "-1"),
    ("process", "--concurrency", "0"),
    ("process", "--limit", "-5"),
    ("process", "--type", "bogus"),
    ("process", "--job", "abc"),
    ("jobs", "list", "--media", "abc"),
    ("jobs", "list", "--limit", "0"),
    ("jobs", "list", "--type", "bogus"),
    ("jobs", "retry", "0"),
    ("jobs", "cancel", "x"),
    ("jobs", "problems", "--limit", "0"),
    ("demo-library", "--count", "-1"),
]


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=lambda a: " ".join(a) or "''")
def test_bad_cli_input_is_a_typed_one_line_error_with_exit_code_2_and_changes_nothing(
        argv: tuple[str, ...], library: tuple[Settings, Engine, list[int]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad value of issue 11 item 9 exits 2 with one `error [channel/code]: …` line and no traceback."""
    settings, engine, _ids = library
    config = _config(tmp_path, settings)
    before = _state(engine)
    code, out, err = _cli(capsys, config, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [validation/validation."), err
    assert "Traceback" not in err + out
    assert _state(engine) == before


def test_bad_input_in_a_real_process_prints_no_traceback(library: tuple[Settings, Engine, list[int]],
                                                         tmp_path: Path) -> None:
    """`ollama-pipeline run --media 1-500x` as a user types it: exit 2, one line, no traceback."""
    settings, _engine, _ids = library
    config = _config(tmp_path, settings)
    proc = subprocess.run([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), "run",
                           "--media", "1-500x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error [validation/validation.payload]: '1-500x' is not a media id")
    assert "Traceback" not in proc.stderr


def test_selection_parser_merges_ranges_and_lists_without_materializing_them() -> None:
    """`3,1-5,4-9,20` is one range 1-9 plus id 20; `1-20000000` is two numbers, not a list."""
    sel = parse_media_selection("3,1-5,4-9,20")
    assert sel.ranges == ((1, 9),) and sel.ids == (20,) and sel.requested == 10
    huge = parse_media_selection(["1-20000000"])
    assert huge.ranges == ((1, 20_000_000),) and huge.ids == () and huge.requested == 20_000_000
    assert parse_media_selection("7,all").everything
    assert parse_media_selection(None, default_all=True).everything
    text_ids = parse_media_selection("a1b2,c3", integer_ids=False)
    assert text_ids.ids == ("a1b2", "c3")
    with pytest.raises(ValidationError, match="ranges apply to integer ids"):
        parse_media_selection("1-5", integer_ids=False)
    with pytest.raises(ValidationError, match="no media selection given"):
        parse_media_selection(None)


def test_enqueue_of_a_twenty_million_id_range_queues_the_existing_items_in_bounded_memory(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`enqueue ollama_caption 1-20000000` on six items: six jobs, a note on the missing ids, < 20 MB."""
    settings, engine, ids = library
    pipeline = Pipeline.from_settings(settings)
    tracemalloc.start()
    try:
        report = enqueue_selection(pipeline, ["ollama_caption"], parse_media_selection("1-20000000"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.error is None and report.queued == len(ids) and report.last_media_id == ids[-1]
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MB"
    code, out, err = _cli(capsys, _config(tmp_path, settings), "enqueue", "ollama_title", "1-20000000", "--quiet")
    assert code == 0 and out.strip() == f"enqueue: {len(ids)} queued, 0 deduplicated"
    assert f"{20_000_000 - len(ids):,} id(s) in '1-20000000' have no media row" in err
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(OllamaJob)).scalar() == 2 * len(ids)


def test_enqueue_stopped_by_a_queue_limit_reports_exactly_which_items_it_queued(
        db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """max_queued=4, `enqueue … all` over six items: four queued, the report names the last one, exit 2
    (SQLite and PostgreSQL); a second enqueue of the same items deduplicates the four."""
    from ollama_pipeline.app.demo_library import add_media_rows

    settings = settings_factory(db_url, pipeline__queue={"max_queued": 4})
    pipeline = Pipeline.from_settings(settings)
    ids = sorted(add_media_rows(pipeline.engine, settings.media_root, 6).media_ids)
    code, out, err = _cli(capsys, _config(tmp_path, settings), "enqueue", "ollama_caption", "all", "--quiet")
    assert code == 2
    assert out.strip() == (f"enqueue: 4 queued, 0 deduplicated; stopped by [queue_limit/queue_limit.overflow]: "
                           f"every selected item up to media {ids[3]} has its job(s), nothing after it was queued")
    assert err.strip().startswith("error [queue_limit/queue_limit.overflow]: ") and len(err.strip().splitlines()) == 1
    with pipeline.engine.connect() as conn:
        queued = sorted(conn.execute(select(OllamaJob.media_id)).scalars())
    assert queued == ids[:4]
    code, out, _err = _cli(capsys, _config(tmp_path, settings), "enqueue", "ollama_caption",
                           f"{ids[0]}-{ids[3]}", "--quiet")
    assert code == 0 and out.strip() == "enqueue: 0 queued, 4 deduplicated"


def test_listed_ids_missing_from_the_library_are_named_and_nothing_is_queued(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`enqueue ollama_caption 1,99999`: exit 2 naming 99999; the existing item 1 gets no job either."""
    settings, engine, ids = library
    code, _out, err = _cli(capsys, _config(tmp_path, settings), "enqueue", "ollama_caption", f"{ids[0]},99999")
    assert code == 2
    assert err.startswith("error [validation/validation.media_missing]: no media row with id 99999 ")
    assert _state(engine)[0] == 0


def test_run_over_a_media_range_materializes_exactly_the_items_in_it(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README's `run --stages caption --media A-B`: one Dagster run over the existing items of the range."""
    settings, engine, ids = library
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    code, out, err = _cli(capsys, _config(tmp_path, settings), "run", "--stages", "caption",
                          "--media", f"{ids[1]}-{ids[3]}")
    assert code == 0, (out, err)
    assert out.startswith("3 media item(s), 1 Dagster run(s)")
    with engine.connect() as conn:
        done = sorted(conn.execute(select(OllamaStageResult.media_id).where(
            OllamaStageResult.stage == "ollama_caption")).scalars())
    assert done == ids[1:4]


# ---- item 7: one table decides retryable -----------------------------------------------------------


def test_every_error_class_reads_retryable_from_the_error_code_table() -> None:
    """For each code of ERROR_CODES, the exception of its channel says what the table (and README) says."""
    by_channel = {cls.channel: cls for cls in ERROR_CLASSES} | {"internal": OllamaPipelineError,
                                                                "blocked": OllamaPipelineError}
    for code, (channel, retryable, _meaning) in ERROR_CODES.items():
        concrete = code.replace("<asset>", "ollama_caption")
        assert by_channel[channel]("x", code=concrete).retryable is retryable, code
    assert PersistenceError("locked").retryable is True  # default code persistence.db
    assert PersistenceError("x", code="persistence.locked").to_dict()["retryable"] is True
    assert QueueLimitError("x").retryable is True
    assert ValidationError("x").retryable is False


def test_a_job_failing_on_a_locked_database_goes_back_to_the_queue(
        library: tuple[Settings, Engine, list[int]]) -> None:
    """A `persistence.locked` failure (README: retried) requeues the job with backoff instead of failing it."""
    settings, engine, ids = library
    pipeline = Pipeline.from_settings(settings)
    jobs.enqueue_ollama(pipeline, "ollama_caption", ids[0])
    [job] = jobs.claim_jobs(pipeline, "w1", 1)
    error: dict[str, Any] = PersistenceError("database stayed locked", code="persistence.locked").to_dict()
    jobs.finish_claimed(pipeline, job, error)
    with engine.connect() as conn:
        status, code = conn.execute(select(OllamaJob.status, OllamaJob.error_code)).one()
    assert (status, code) == ("queued", "persistence.locked")
