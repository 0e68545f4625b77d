"""Config, client, images, persistence and the caption stage end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update

from ollama_pipeline.app.demo_library import build_demo_library
from ollama_pipeline.core.client import OllamaClient, OllamaOptions
from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaStageResult
from ollama_pipeline.core.errors import (
    ConfigError,
    InvalidResponseFormatError,
    NetworkError,
    PersistenceError,
    ValidationError,
)
from ollama_pipeline.core.images import prepare_image
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline_tests.conftest import make_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "ollama_pipeline.example.yaml"


def _meta(engine, key: str = "ollama.caption") -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(MediaMeta.media_id, MediaMeta.value).where(MediaMeta.key == key)).all())


@pytest.fixture
def library(db_url: str, settings_factory):
    """A six-item demo library and a Pipeline pointed at the emulator."""
    settings = settings_factory(db_url)
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    report = build_demo_library(pipeline.engine, settings.media_root, count=6, seed=3)
    return pipeline, report.media_ids


# ---- §4 configuration ----------------------------------------------------------------------------


def test_example_config_loads_and_env_overrides_it(tmp_path: Path) -> None:
    """The shipped example is valid; OLLAMA_PIPELINE__* variables override keys."""
    settings = load_settings(EXAMPLE, env={"OLLAMA_PIPELINE__OLLAMA__TIMEOUT_MS": "1234",
                                           "OLLAMA_PIPELINE__OLLAMA__MODEL__DEFAULT": "x:1b"})
    assert settings.ollama.timeout_ms == 1234 and settings.ollama.model.default == "x:1b"
    assert settings.ollama.model_for("vision") == "llava:7b"


@pytest.mark.parametrize(("text", "needle"), [
    ("ollama: {model: {default: m}, timeout_ms: 10, max_image_bytes: 100000}\ndatabase: {url: sqlite://}\nmedia_root: m",
     "'ollama.base_url' is missing"),
    ("ollama: {base_url: 'http://x', model: {default: m}, timeout_ms: nope, max_image_bytes: 100000}\n"
     "database: {url: sqlite://}\nmedia_root: m", "ollama.timeout_ms"),
])
def test_bad_config_stops_with_one_message_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    """A missing or wrong key is a ConfigError that names it."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert needle in str(err.value) and err.value.code == "validation.config"


# ---- §7 client and §6 network / model channels ---------------------------------------------------


def _client(base_url: str, **overrides) -> OllamaClient:
    settings = make_settings(db_url="sqlite://", media_root=Path("."), logs_dir=Path("."), base_url=base_url,
                             **overrides)
    return OllamaClient(settings.ollama, sleep=lambda s: None)


def test_client_health_models_and_text(emulator) -> None:
    """health, list_models with digests and generate_text through the official client."""
    client = _client(emulator.base_url)
    assert client.health().ok
    assert client.model_digest("llava:7b")
    answer = client.generate_text("hello", OllamaOptions(model="llama3.2:3b", format="json"))
    assert json.loads(answer.text) and answer.eval_count


def test_connect_error_is_network_channel() -> None:
    """Nothing listening → network.connect after the configured attempts."""
    client = _client("http://127.0.0.1:9")
    with pytest.raises(NetworkError) as err:
        client.generate_text("x", OllamaOptions(model="m"))
    assert err.value.code == "network.connect" and err.value.details["attempts"] == 2
    assert not client.health().ok


def test_server_errors_are_retried_then_typed(emulator) -> None:
    """One 500 is retried away; persistent 503 ends as network.busy; 404 is never retried."""
    client = _client(emulator.base_url)
    emulator.set_faults([{"kind": "http_500", "count": 1}])
    assert client.generate_text("x", OllamaOptions(model="llama3.2:3b")).attempts == 2
    emulator.set_faults([{"kind": "http_503"}])
    with pytest.raises(NetworkError) as err:
        client.generate_text("x", OllamaOptions(model="llama3.2:3b"))
    assert err.value.code == "network.busy" and err.value.http_status == 503
    emulator.set_faults([])
    calls = emulator.stats()["model_calls"]
    with pytest.raises(InvalidResponseFormatError) as err:
        client.generate_text("x", OllamaOptions(model="missing:1b"))
    assert err.value.code == "invalid_response_format.model_not_found"
    assert emulator.stats()["model_calls"] == calls


def test_timeout_is_network_timeout(emulator) -> None:
    """A hanging model call becomes network.timeout within the configured timeout."""
    client = _client(emulator.base_url, ollama__timeout_ms=300, ollama__retry__max_attempts=1)
    with pytest.raises(NetworkError) as err:
        client.generate_text("[[fault:hang]]", OllamaOptions(model="llama3.2:3b"))
    assert err.value.code == "network.timeout"


# ---- §1 media file ------------------------------------------------------------------------------


def test_images_are_downscaled_and_checked(tmp_path: Path) -> None:
    """Big images fit the pixel budget and byte limit; outside paths and corrupt files are refused."""
    root = tmp_path / "media"
    root.mkdir()
    Image.new("RGB", (4096, 4096), (200, 30, 30)).save(root / "big.png")
    prepared = prepare_image(root, "big.png", max_image_bytes=200_000, max_pixels=1_048_576)
    assert prepared.width * prepared.height <= 1_048_576 and prepared.sent_bytes <= 200_000
    assert "b64" not in repr(prepared) and len(repr(prepared)) < 200
    (root / "bad.png").write_bytes(b"not an image")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for path, code in [("bad.png", "validation.image_corrupt"), ("../secret.png", "validation.path_outside_root"),
                       ("link.png", "validation.path_outside_root"), ("/etc/passwd", "validation.path_outside_root"),
                       ("gone.png", "validation.file_missing")]:
        with pytest.raises(ValidationError) as err:
            prepare_image(root, path, max_image_bytes=200_000, max_pixels=1_048_576)
        assert err.value.code == code, path


# ---- the caption stage end to end (§3 ollama_caption, §8) ---------------------------------------


def test_caption_stage_writes_canonical_json_and_reruns_byte_identical(library, emulator) -> None:
    """Every item gets ollama.caption + provenance keys; a forced re-run rewrites identical bytes;
    an unchanged re-run makes no model call."""
    pipeline, ids = library
    outcomes = list(run_stage(pipeline, "ollama_caption", ids))
    assert {o.status for o in outcomes} == {"written"}
    first = _meta(pipeline.engine)
    assert set(first) == set(ids)
    for value in first.values():
        assert json.dumps(json.loads(value), sort_keys=True, separators=(",", ":")) == value
        assert json.loads(value)["text"]
    for key in ("ollama.model", "ollama.version", "ollama.last_run_at"):
        assert set(_meta(pipeline.engine, key)) == set(ids)
    calls = emulator.stats()["model_calls"]
    assert {o.status for o in run_stage(pipeline, "ollama_caption", ids)} == {"skipped"}
    assert emulator.stats()["model_calls"] == calls
    assert {o.status for o in run_stage(pipeline, "ollama_caption", ids, force=True)} == {"unchanged"}
    assert _meta(pipeline.engine) == first


def test_failures_keep_stored_values_and_other_items(library, emulator) -> None:
    """A corrupt file and a model that keeps answering prose fail only their items; stored captions stay."""
    pipeline, ids = library
    list(run_stage(pipeline, "ollama_caption", ids))
    before = _meta(pipeline.engine)
    with pipeline.engine.begin() as conn:
        path = conn.execute(select(Media.path).where(Media.id == ids[0])).scalar_one()
    (pipeline.settings.media_root / path).write_bytes(b"garbage")
    emulator.set_faults([{"kind": "prose"}])
    outcomes = {o.media_id: o for o in run_stage(pipeline, "ollama_caption", ids, force=True)}
    assert outcomes[ids[0]].error["code"] == "validation.image_corrupt"
    assert outcomes[ids[1]].error["code"] == "invalid_response_format.not_json"
    assert outcomes[ids[1]].metrics.repairs == 1
    assert _meta(pipeline.engine) == before
    with pipeline.engine.connect() as conn:
        states = dict(conn.execute(select(OllamaStageResult.media_id, OllamaStageResult.error_code)).all())
    assert states[ids[0]] == "validation.image_corrupt"
    errors = (pipeline.settings.logs_dir / "ollama_errors.jsonl").read_text().splitlines()
    assert any(json.loads(line)["code"] == "invalid_response_format.not_json" for line in errors)


def test_locked_sqlite_database_is_a_persistence_error(tmp_path: Path, settings_factory, emulator) -> None:
    """A write lock held elsewhere is retried, then persistence.locked; nothing stored is lost."""
    db = tmp_path / "library.db"
    settings = settings_factory(f"sqlite:///{db}", database__busy_timeout_ms=50, database__lock_retries=1)
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    ids = build_demo_library(pipeline.engine, settings.media_root, count=2, seed=1).media_ids
    list(run_stage(pipeline, "ollama_caption", ids[:1]))
    before = _meta(pipeline.engine)
    blocker = sqlite3.connect(db, timeout=0.1)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        outcome = next(iter(run_stage(pipeline, "ollama_caption", ids[1:])))
    finally:
        blocker.rollback()
        blocker.close()
    assert outcome.error["channel"] == "persistence" and outcome.error["code"] == "persistence.locked"
    assert _meta(pipeline.engine) == before


def test_constraint_violation_is_a_persistence_error(db_url: str) -> None:
    """A duplicate media_meta key refused by the database maps to persistence.constraint."""
    from ollama_pipeline.core.db.repository import with_retry

    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:
        conn.execute(Media.__table__.insert().values(id=1, path="a.png"))
        conn.execute(MediaMeta.__table__.insert().values(media_id=1, key="k", value="1"))
    with pytest.raises(PersistenceError) as err:
        with_retry(engine, lambda c: c.execute(MediaMeta.__table__.insert().values(media_id=1, key="k", value="2")))
    assert err.value.code == "persistence.constraint"
    with engine.connect() as conn:
        assert conn.execute(select(MediaMeta.value)).scalar_one() == "1"
        conn.execute(update(Media).values(rating=1))  # connection still usable
    engine.dispose()
