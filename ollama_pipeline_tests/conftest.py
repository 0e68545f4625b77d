"""Shared fixtures: real SQLite files and a real PostgreSQL database per test run, the Ollama emulator
over loopback, and settings that point every piece of state (logs, media, database) at tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, instance_for_test
from sqlalchemy import Engine, create_engine, text

from ollama_pipeline.core.config import Settings, settings_from_dict
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Base

PG_ADMIN_URL = os.environ.get("OLLAMA_PIPELINE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


REPO = Path(__file__).resolve().parents[1]
RAM_DISK = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    """Scratch files (tmp_path, tempfile, the commands the tests start) on the machine's RAM disk when it
    has one and neither --basetemp nor TMPDIR says where they go. They are the same real SQLite files; what
    goes away is the flush to disk at every commit, and Dagster's SQLite instance storage commits every
    event: 12 ms per commit on this machine's disk under load, 0.2 ms on tmpfs. (pyproject keeps only the
    folders of failed tests, so the RAM disk does not fill up run after run.)"""
    if config.option.basetemp or os.environ.get("TMPDIR"):
        return
    if RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK):
        os.environ["TMPDIR"] = str(RAM_DISK)
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def _tracked_outputs() -> dict[str, tuple[int, int]] | None:
    """mtime and size of the tracked files a test could overwrite by mistake: everything but the code and
    Markdown (which a developer may be editing while the suite runs). None outside a git checkout."""
    import subprocess

    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    state: dict[str, tuple[int, int]] = {}
    for raw in listed.stdout.split(b"\0"):
        name = raw.decode("utf-8", "surrogateescape")
        if not name or name.endswith(".md") or name.startswith(("ollama_pipeline/", "ollama_pipeline_tests/")):
            continue
        try:
            st = (REPO / name).stat()
        except FileNotFoundError:
            st = None
        state[name] = (st.st_mtime_ns, st.st_size) if st else (0, -1)
    return state


@pytest.fixture(scope="session", autouse=True)
def _tracked_files_stay_unchanged() -> Iterator[None]:
    """`make test` never modifies tracked files (issue 11 item 15): screenshots and other outputs go to
    tmp_path or test-artifacts/. Checked once at the end of the session."""
    before = _tracked_outputs()
    yield
    after = _tracked_outputs()
    if before is not None and after is not None:
        changed = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
        assert not changed, f"the test run modified tracked files: {changed}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads a user's config, OLLAMA_HOST or API key."""
    for name in list(os.environ):
        if name.startswith("OLLAMA_PIPELINE") and name != "OLLAMA_PIPELINE_TEST_PG":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database made for this test run and dropped at its end."""
    name = f"ollama_pipeline_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from ollama_pipeline.core.db import engine as engine_mod

        for key in [k for k in engine_mod._engines if k == url]:
            engine_mod._engines.pop(key).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    from ollama_pipeline.core.db import gallery

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:  # the migration bookkeeping tables are not models
        conn.execute(text("DROP TABLE IF EXISTS ollama_alembic_version, ollama_added_columns"))
    engine.dispose()
    gallery.forget_all()  # the next test reflects its own tables


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty library database: a SQLite file, then the PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'library.db'}"
    url = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'library.db'}"


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[Any]:
    from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

    server = EmulatorServer(EmulatorConfig(host="127.0.0.1", port=0, latency_ms=0, parallel=8))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator(emulator_server: Any) -> Iterator[Any]:
    """The loopback emulator with no faults and zeroed counters."""
    emulator_server.set_faults([])
    emulator_server.reset_stats()
    yield emulator_server
    emulator_server.set_faults([])


def make_settings(*, db_url: str, media_root: Path, logs_dir: Path, base_url: str,
                  **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "ollama": {
            "base_url": base_url,
            "model": {"default": "llava:7b"},
            "timeout_ms": 5000,
            "max_image_bytes": 1_000_000,
            "vision_model": "llava:7b",
            "text_model": "llama3.2:3b",
            "retry": {"max_attempts": 2, "backoff_ms": 10},
        },
        "database": {"url": db_url, "lock_retries": 3},
        "media_root": str(media_root),
        "logs_dir": str(logs_dir),
        "pipeline": {"concurrency": 4},
    }
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return settings_from_dict(data)


@pytest.fixture
def settings_factory(tmp_path: Path, emulator: Any) -> Callable[..., Settings]:
    """Settings for a database URL, with media and logs under tmp_path and Ollama = the emulator.
    Keyword overrides use double underscores: pipeline__write_tags=False."""

    def factory(db_url: str, **overrides: Any) -> Settings:
        return make_settings(db_url=db_url, media_root=tmp_path / "media", logs_dir=tmp_path / "LOGS",
                             base_url=emulator.base_url, **overrides)

    return factory


@pytest.fixture
def engine_for() -> Iterator[Callable[[str], Engine]]:
    """Engines made by a test, initialised and disposed afterwards."""
    made: list[Engine] = []

    def factory(url: str) -> Engine:
        engine = make_engine(url)
        init_db(engine)
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.dispose()


# ---- Dagster -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _empty_instance_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of an empty SQLite Dagster instance, made once per session: Dagster creates and stamps its
    three databases in about 0.3 s of CPU, a copy of them takes 0.05 s."""
    home = tmp_path_factory.mktemp("dagster_home_empty")
    with instance_for_test(temp_dir=str(home)):
        pass
    return home


@pytest.fixture
def instance(tmp_path: Path, _empty_instance_files: Path) -> Iterator[DagsterInstance]:
    """A real SQLite Dagster instance (Dagster's own storage, as the shipped dagster.yaml leaves it) in a
    temporary DAGSTER_HOME, empty: it starts from a copy of a new instance's databases."""
    home = tmp_path / "dagster_home"
    shutil.copytree(_empty_instance_files, home)
    with instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def library(sqlite_url: str, settings_factory: Callable[..., Settings]) -> tuple[Settings, Engine, list[int]]:
    """Six small demo images with their gallery rows (SQLite). Test files with a library of their own
    define a `library` fixture that replaces this one."""
    from ollama_pipeline.app.demo_library import add_media_rows

    settings = settings_factory(sqlite_url)
    engine = make_engine(settings.database.url)
    init_db(engine)
    report = add_media_rows(engine, settings.media_root, 6)
    return settings, engine, sorted(report.media_ids)
