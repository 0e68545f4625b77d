"""The `ollama` and `library` Dagster resources: filled from the settings file, passwords hidden in what the
code location shows, and a password given through `dagster.EnvVar` reaching Ollama and the database."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import EnvVar, build_resources
from sqlalchemy import Engine

from ollama_pipeline.core.errors import ConfigError
from ollama_pipeline.defs.resources import (
    DATABASE_PASSWORD_ENV,
    OLLAMA_PASSWORD_ENV,
    LibraryResource,
    OllamaResource,
    PipelineResource,
    shown_resources,
)


def _write_config(tmp_path: Path, base_url: str, db_url: str, **ollama: Any) -> Path:
    data = {"ollama": {"base_url": base_url, "model": {"default": "llava:7b"}, "timeout_ms": 4000,
                       "max_image_bytes": 1_000_000, "keep_alive": "30m", "num_ctx": 4096,
                       "hosts": [{"base_url": "http://carol:host-pw@127.0.0.1:9", "parallel": 2,
                                  "models": ["llava:7b"]}], **ollama},
            "database": {"url": db_url}, "media_root": str(tmp_path / "media"), "logs_dir": str(tmp_path / "LOGS"),
            "pipeline": {"concurrency": 3}}
    path = tmp_path / "ollama_pipeline.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class _Recorder(BaseHTTPRequestHandler):
    """A loopback HTTP server that answers /api/version like Ollama and keeps each Authorization header."""

    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"version": "0.32.15"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_resources_show_the_settings_file_with_every_password_hidden(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Base URL, hosts, models, timeouts, keep_alive and the database come from the YAML; no password shows."""
    config = _write_config(tmp_path, "http://alice:ollama-pw@127.0.0.1:11434",
                           "postgresql://bob:db-pw@127.0.0.1:5432/library")
    monkeypatch.setenv("OLLAMA_PIPELINE__OLLAMA__TIMEOUT_MS", "7000")  # env overrides still apply
    ollama, library = shown_resources(str(config))
    assert ollama.base_url == "http://alice:***@127.0.0.1:11434"
    assert [(h.base_url, h.parallel, h.models) for h in ollama.hosts or []] == [
        ("http://carol:***@127.0.0.1:9", 2, ["llava:7b"])]
    assert (ollama.model, ollama.timeout_ms, ollama.keep_alive, ollama.num_ctx, ollama.concurrency) == (
        "llava:7b", 7000, "30m", 4096, 3)
    assert library.database_url == "postgresql://bob:***@127.0.0.1:5432/library"
    shown = ollama.model_dump_json() + library.model_dump_json()
    assert not any(secret in shown for secret in ("ollama-pw", "host-pw", "db-pw"))


def test_shown_resources_run_with_the_settings_files_passwords(tmp_path: Path) -> None:
    """A hidden password is the settings file's: the run's settings carry the real URLs again."""
    config = _write_config(tmp_path, "http://alice:ollama-pw@127.0.0.1:11434", f"sqlite:///{tmp_path}/lib.db")
    ollama, library = shown_resources(str(config))
    resource = PipelineResource(config_path=str(config), ollama=ollama, library=library)
    settings = resource.resolved_settings()
    assert settings.ollama.base_url.password == "ollama-pw"
    assert settings.ollama.hosts[0].base_url.password == "host-pw"
    assert settings.ollama.keep_alive == "30m"


def test_a_hidden_password_without_its_source_is_a_one_line_config_error(tmp_path: Path) -> None:
    """A shown URL whose password is neither in the file nor in the EnvVar fails with the variable to set."""
    config = _write_config(tmp_path, "http://127.0.0.1:11434", f"sqlite:///{tmp_path}/lib.db")
    resource = PipelineResource(config_path=str(config),
                                ollama=OllamaResource(base_url="http://alice:***@127.0.0.1:11434"))
    with pytest.raises(ConfigError, match=OLLAMA_PASSWORD_ENV) as raised:
        resource.resolved_settings()
    assert "\n" not in str(raised.value)


def test_envvar_passwords_reach_ollama_and_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recording_server: tuple[str, list[str | None]],
        pg_database: str, engine_for: Callable[[str], Engine]) -> None:
    """EnvVar('OLLAMA_PIPELINE_OLLAMA_PASSWORD') becomes the Basic auth of every Ollama request, and
    EnvVar('OLLAMA_PIPELINE_DATABASE_PASSWORD') the password of the database connection."""
    import base64

    address, seen = recording_server
    engine_for(pg_database)  # the gallery's tables, so the run-start check passes
    config = _write_config(tmp_path, f"http://alice@{address}", pg_database, hosts=[])
    monkeypatch.setenv(OLLAMA_PASSWORD_ENV, "env-ollama-pw")
    monkeypatch.setenv(DATABASE_PASSWORD_ENV, "env-db-pw")
    ollama, library = shown_resources(str(config))
    assert isinstance(ollama.password, EnvVar) and isinstance(library.password, EnvVar)
    resource = PipelineResource(config_path=str(config), ollama=ollama, library=library)
    with build_resources({"pipeline": resource}) as resources:
        pipeline = resources.pipeline.pipeline()
        assert pipeline.client.health().ok
        assert pipeline.engine.url.password == "env-db-pw"
    token = base64.b64encode(b"alice:env-ollama-pw").decode()
    assert seen and set(seen) == {f"Basic {token}"}


def test_library_resource_fields_replace_the_settings_files_values(tmp_path: Path) -> None:
    """A field set on the resource (in the code location or a run's resource config) wins over the file."""
    config = _write_config(tmp_path, "http://127.0.0.1:11434", f"sqlite:///{tmp_path}/lib.db")
    other = tmp_path / "other.db"
    resource = PipelineResource(config_path=str(config), library=LibraryResource(database_url=f"sqlite:///{other}"),
                                ollama=OllamaResource(keep_alive="-1", model="qwen2.5vl:7b"))
    settings = resource.resolved_settings()
    assert settings.database.url == f"sqlite:///{other}"
    assert (settings.ollama.keep_alive, settings.ollama.model.default) == ("-1", "qwen2.5vl:7b")
