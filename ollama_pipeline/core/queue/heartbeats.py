"""Run heartbeats in the pipeline's own table (`ollama_run_heartbeats`, keyed by run id).

A run renews its row every `pipeline.heartbeat_seconds` while it works (`Heartbeat`, a background thread).
A process killed with SIGKILL cannot say that it stopped, and a process id means nothing on another
machine, so a row still `running` whose heartbeat is older than STALE_INTERVALS of its own interval is
taken for dead: `reap_stale` marks it failed with the reason, and the Dagster layer then fails the
Dagster run of that id so the run queue moves on. This module must not import Dagster.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import Connection, insert, select, update

from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.models import OllamaRunHeartbeat
from ollama_pipeline.core.errors import OllamaPipelineError
from ollama_pipeline.core.runner import Pipeline

STALE_INTERVALS = 4
_ready: set[int] = set()
_ready_lock = threading.Lock()


def _ensure_table(pipeline: Pipeline) -> None:
    """The table is new: a library made by an older version gets it on first use."""
    key = id(pipeline.engine)
    with _ready_lock:
        if key not in _ready:
            OllamaRunHeartbeat.__table__.create(pipeline.engine, checkfirst=True)
            _ready.add(key)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class StaleRun(BaseModel):
    """A run whose heartbeat stopped: marked failed in `ollama_run_heartbeats`."""

    run_id: str
    host: str | None
    pid: int | None
    heartbeat_at: datetime
    reason: str


class Heartbeat:
    """Renews the heartbeat row of one run from a background thread; `with Heartbeat(...)` ends it."""

    def __init__(self, pipeline: Pipeline, run_id: str, *, interval_s: float | None = None) -> None:
        self.pipeline = pipeline
        self.run_id = run_id
        self.interval = float(interval_s or pipeline.settings.pipeline.heartbeat_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, conn: Connection, **values: object) -> None:
        now = _now()
        done = conn.execute(update(OllamaRunHeartbeat).where(OllamaRunHeartbeat.run_id == self.run_id)
                            .values(heartbeat_at=now, **values)).rowcount
        if not done:
            row = {"run_id": self.run_id, "status": "running", "host": socket.gethostname()[:255],
                   "pid": os.getpid(), "interval_s": self.interval, "started_at": now, "heartbeat_at": now}
            conn.execute(insert(OllamaRunHeartbeat).values({**row, **values}))

    def beat(self, **values: object) -> None:
        _ensure_table(self.pipeline)
        retries = self.pipeline.settings.database.lock_retries
        repository.with_retry(self.pipeline.engine, lambda conn: self._write(conn, **values), retries=retries,
                              what=f"heartbeat of run {self.run_id}")

    def __enter__(self) -> Heartbeat:
        self.beat(status="running", interval_s=self.interval, ended_at=None, reason=None)
        self._thread = threading.Thread(target=self._run, name="ollama-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.beat(status="ended", ended_at=_now())
        except OllamaPipelineError as error:  # stale after 4 intervals; reaping it then is harmless
            self.pipeline.logs.error(error, operation="heartbeat_end", run_id=self.run_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except OllamaPipelineError as error:  # the next beat tries again
                self.pipeline.logs.error(error, operation="heartbeat", run_id=self.run_id)


def reap_stale(pipeline: Pipeline, *, now: datetime | None = None) -> list[StaleRun]:
    """Mark every `running` row whose heartbeat is older than STALE_INTERVALS of its interval as failed."""
    _ensure_table(pipeline)

    def work(conn: Connection) -> list[StaleRun]:
        at = now or _now()
        rows = conn.execute(select(OllamaRunHeartbeat).where(OllamaRunHeartbeat.status == "running")).mappings()
        found = []
        for row in rows:
            silent = at - row["heartbeat_at"]
            if silent <= timedelta(seconds=STALE_INTERVALS * float(row["interval_s"] or 10.0)):
                continue
            reason = (f"no heartbeat for {silent.total_seconds():.0f} s (interval {row['interval_s']:g} s) from "
                      f"{row['host']} pid {row['pid']}: the process was killed or lost; marked failed")
            marked = conn.execute(update(OllamaRunHeartbeat).where(
                OllamaRunHeartbeat.run_id == row["run_id"], OllamaRunHeartbeat.status == "running",
                OllamaRunHeartbeat.heartbeat_at == row["heartbeat_at"])
                .values(status="failed", ended_at=at, reason=reason)).rowcount
            if marked:
                found.append(StaleRun(run_id=row["run_id"], host=row["host"], pid=row["pid"],
                                      heartbeat_at=row["heartbeat_at"], reason=reason))
        return found

    stale = repository.with_retry(pipeline.engine, work, retries=pipeline.settings.database.lock_retries,
                                  what="reap stale runs")
    for run in stale:
        pipeline.logs.job_event("run_reaped", run_id=run.run_id, host=run.host, pid=run.pid, reason=run.reason)
    return stale


def reaped_runs(pipeline: Pipeline, run_ids: list[str]) -> dict[str, str]:
    """Run id -> reason, for the given runs that were marked failed for a stopped heartbeat."""
    if not run_ids:
        return {}
    with pipeline.engine.connect() as conn:
        rows = conn.execute(select(OllamaRunHeartbeat.run_id, OllamaRunHeartbeat.reason).where(
            OllamaRunHeartbeat.run_id.in_(run_ids), OllamaRunHeartbeat.status == "failed")).all()
    return {str(r): str(reason or "") for r, reason in rows}
