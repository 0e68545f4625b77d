"""Security regressions of issue 11 through the CLI, the job API and the database: credentials in URLs are
redacted everywhere (stderr, LOGS, the Dagster instance), and planted prompt injections never reach what
is stored."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml
from sqlalchemy import Engine

from ollama_pipeline.core.config import Settings

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "SECRETpw4711"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_file(settings: Settings, path: Path, base_url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "ollama": {"base_url": base_url, "model": {"default": settings.ollama.model.default},
                   "timeout_ms": 2000, "max_image_bytes": settings.ollama.max_image_bytes,
                   "retry": {"max_attempts": 1, "backoff_ms": 0}},
        "database": {"url": settings.database.url}, "media_root": str(settings.media_root),
        "logs_dir": str(settings.logs_dir)}))
    return path


def _cli(config: Path, dagster_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(dagster_home)}
    return subprocess.run([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=config.parent)


def _files_holding(root: Path, needle: str) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            yield path


def test_password_in_ollama_url_never_reaches_stderr_logs_or_the_dagster_instance(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path) -> None:
    """A bad and an unreachable `ollama.base_url` with user:password: shown as user:***@ everywhere."""
    settings, _, ids = library
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    bad = _config_file(settings, tmp_path / "bad.yaml", f"http://user:{PASSWORD}@127.0.0.1:99999")
    refused = _cli(bad, home, "run", "--stages", "caption")
    assert refused.returncode == 2 and "user:***@127.0.0.1" in refused.stderr, refused.stderr
    down = _config_file(settings, tmp_path / "down.yaml", f"http://user:{PASSWORD}@127.0.0.1:{_closed_port()}")
    failed = _cli(down, home, "run", "--stages", "caption")
    assert failed.returncode == 1 and "network.connect" in failed.stdout, failed.stdout + failed.stderr
    # README's `dagster asset materialize` reads the bad file inside the run: its failure events carry the error.
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home), "OLLAMA_PIPELINE_CONFIG": str(bad)}
    in_run = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "ollama_pipeline.definitions",
                             "--select", "ollama_caption", "--partition", str(ids[0])], capture_output=True,
                            text=True, env=env, timeout=300, cwd=tmp_path)
    assert in_run.returncode != 0 and "user:***@127.0.0.1" in in_run.stdout + in_run.stderr, in_run.stderr[-3000:]
    for output in (refused.stdout, refused.stderr, failed.stdout, failed.stderr, in_run.stdout, in_run.stderr):
        assert PASSWORD not in output
    assert list(home.rglob("*")), "the run left no Dagster instance files"
    assert list(_files_holding(home, PASSWORD)) == []
    assert list(_files_holding(settings.logs_dir, PASSWORD)) == []
