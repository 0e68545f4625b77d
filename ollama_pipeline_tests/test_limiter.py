"""The slot limit shared across worker processes (PostgreSQL advisory locks, core/limiter.py): two
workers that each may send `parallel` calls never send more than that together, and a worker that dies
frees its slots at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.hosts import Host
from ollama_pipeline.core.limiter import PostgresSlotGate
from ollama_pipeline.core.runner import Pipeline, run_stage
from ollama_pipeline_tests.conftest import make_settings
from ollama_pipeline_tests.test_hosts import EmulatorProcess


def test_two_workers_together_stay_within_the_hosts_slots(tmp_path: Path, pg_database: str) -> None:
    """Two workers (own clients, own database sessions) share one host with 2 slots: the emulator never
    sees more than 2 calls at once, and every item is written."""
    host = EmulatorProcess("--parallel", "8", "--latency-ms", "80")
    try:
        settings = make_settings(db_url=f"sqlite:///{tmp_path / 'library.db'}", media_root=tmp_path / "media",
                                 logs_dir=tmp_path / "LOGS", base_url=host.base_url,
                                 ollama__hosts=[{"base_url": host.base_url, "parallel": 2}],
                                 pipeline__slot_limiter_url=pg_database, pipeline__concurrency=4)
        engine = make_engine(settings.database.url)
        init_db(engine)
        ids = sorted(add_media_rows(engine, settings.media_root, 16).media_ids)
        workers = [Pipeline.from_settings(settings) for _ in range(2)]
        outcomes: list[Any] = []

        def work(pipeline: Pipeline, part: list[int]) -> None:
            outcomes.extend(run_stage(pipeline, "ollama_caption", part, concurrency=4))

        threads = [threading.Thread(target=work, args=(w, ids[i::2])) for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(o.media_id for o in outcomes) == ids and {o.status for o in outcomes} == {"written"}
        stats = httpx.get(f"{host.base_url}/_emulator/stats").json()
        assert stats["max_inflight_seen"] <= 2 and stats["model_calls"] == len(ids)
        engine.dispose()
    finally:
        host.kill()


def test_a_worker_that_dies_frees_its_slots(pg_database: str) -> None:
    """A process holding both slots of a host is killed: another worker gets a slot within seconds."""
    target = Host(index=0, base_url="http://127.0.0.1:1", weight=1.0, slots=2, models=None)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from ollama_pipeline.core.hosts import Host\n"
        "from ollama_pipeline.core.limiter import PostgresSlotGate\n"
        "gate = PostgresSlotGate(sys.argv[1])\n"
        "h = Host(index=0, base_url='http://127.0.0.1:1', weight=1.0, slots=2, models=None)\n"
        "tokens = [gate.try_acquire(h), gate.try_acquire(h)]\n"
        "print('held' if all(tokens) else 'not held', flush=True)\n"
        "time.sleep(600)\n"), pg_database], stdout=subprocess.PIPE, text=True)
    gate = PostgresSlotGate(pg_database)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert gate.try_acquire(target) is None and gate.held(target) == 2
        holder.kill()
        holder.wait(timeout=10)
        deadline = time.monotonic() + 15
        token = None
        while token is None:
            assert time.monotonic() < deadline, "the dead worker's slots were never freed"
            token = gate.try_acquire(target)
            time.sleep(0.05)
        gate.release(target, token)
    finally:
        if holder.poll() is None:
            holder.kill()
        if holder.stdout is not None:
            holder.stdout.close()
        gate.close()
