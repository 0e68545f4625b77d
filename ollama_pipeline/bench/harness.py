"""What a bench run stands on: the emulator in its own process, a library, settings and Dagster instances.

The emulator runs as a separate process (`python -m ollama_pipeline.emulator`) so that its CPU time is not
counted as the pipeline's; the calls it served are read from `/_emulator/stats`. Each Dagster instance
lives in its own temporary DAGSTER_HOME: SQLite files (the shipped default) or a PostgreSQL database made
for the run and dropped at its end (dagster-postgres).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from sqlalchemy import create_engine, text

from ollama_pipeline.core.config import Settings, settings_from_dict

InstanceKind = Literal["sqlite", "postgres"]
PG_ADMIN_URL_ENV = "OLLAMA_PIPELINE_BENCH_PG"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


class EmulatorProcess:
    """`ollama-pipeline emulator` in a child process, with its served-call counter."""

    def __init__(self, *, latency_ms: float = 0, parallel: int | None = None, max_queue: int = 512,
                 profile: str | None = None, time_scale: float | None = None, extra: tuple[str, ...] = ()) -> None:
        self.args = ["--latency-ms", str(latency_ms), "--max-queue", str(max_queue), *extra]
        if parallel is not None:
            self.args += ["--parallel", str(parallel)]
        if profile is not None:
            self.args += ["--profile", profile]
        if time_scale is not None:
            self.args += ["--time-scale", str(time_scale)]
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> EmulatorProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.emulator", "--port", "0", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.__exit__()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.base_url = line.rsplit(" ", 1)[1].strip()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/_emulator/stats", timeout=10).json()

    def calls(self) -> int:
        return int(self.stats()["model_calls"])


def bench_settings(workdir: Path, base_url: str, *, db_url: str | None = None, concurrency: int = 4) -> Settings:
    """Settings for the bench library under workdir (SQLite unless db_url), Ollama = the emulator."""
    data = bench_config(workdir, base_url, db_url=db_url, concurrency=concurrency)
    return settings_from_dict(data)


def bench_config(workdir: Path, base_url: str, *, db_url: str | None = None, concurrency: int = 4) -> dict[str, Any]:
    return {
        "ollama": {"base_url": base_url, "model": {"default": "llava:7b"}, "timeout_ms": 120_000,
                   "max_image_bytes": 1_000_000, "vision_model": "llava:7b", "text_model": "llama3.2:3b",
                   "retry": {"max_attempts": 3, "backoff_ms": 200}},
        "database": {"url": db_url or f"sqlite:///{workdir / 'library.db'}", "busy_timeout_ms": 30_000,
                     "lock_retries": 5},
        "media_root": str(workdir / "media"),
        "logs_dir": str(workdir / "LOGS"),
        "pipeline": {"concurrency": concurrency},
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_sqlite_library(source: Path, target: Path) -> None:
    """A fresh copy of a built library (the database file only; media files are shared)."""
    for suffix in ("", "-wal", "-shm"):
        if (target.parent / (target.name + suffix)).exists():
            (target.parent / (target.name + suffix)).unlink()
    shutil.copyfile(source, target)


def postgres_instance_config(url: str) -> dict[str, Any]:
    """Instance storage on PostgreSQL as README documents it: dagster-postgres run, event log and schedule
    storage (Dagster's own classes)."""
    return {
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage",
                        "config": {"postgres_url": url}},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage",
                              "config": {"postgres_url": url}},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": {"postgres_url": url}},
    }


def _admin(url: str, statement: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE) on the PostgreSQL server at url."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(statement))
    finally:
        admin.dispose()


@contextmanager
def dagster_home(workdir: Path, kind: InstanceKind, *, plain: bool = False) -> Iterator[Path]:
    """A temporary DAGSTER_HOME configured as the project ships it (dagster.yaml, README): Dagster's own
    SQLite storage, or dagster-postgres on a PostgreSQL database made here and dropped at the end.
    plain is kept for callers; both SQLite variants are Dagster's own storage now."""
    home = workdir / f"dagster_home_{kind}_{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True)
    config: dict[str, Any] = {"telemetry": {"enabled": False}}
    database = None
    admin_url = os.environ.get(PG_ADMIN_URL_ENV, DEFAULT_PG_ADMIN_URL)
    if kind == "postgres":
        database = f"ollama_bench_{uuid.uuid4().hex[:10]}"
        _admin(admin_url, f'CREATE DATABASE "{database}"')
        config.update(postgres_instance_config(admin_url.rsplit("/", 1)[0] + f"/{database}"))
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    try:
        yield home
    finally:
        if database is not None:
            _admin(admin_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, all threads."""
    times = os.times()
    return times.user + times.system


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: a child started by a big parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stopwatch:
    """Wall and CPU time of a block."""

    def __enter__(self) -> Stopwatch:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = cpu_seconds() - self.cpu0
