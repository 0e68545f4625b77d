"""`make cluster-demo`: the multi-machine deployment on one machine, with stock Dagster parts only.

Dagster's instance in PostgreSQL, the queued run coordinator (dequeued by `dagster-daemon`), and
`dagster_celery.CeleryRunLauncher`: each run is a Celery task over RabbitMQ that any of the Celery workers
(separate processes, `dagster-celery worker start`) executes. The library (PostgreSQL) is split into one run
per block of media (`dagster job backfill` over the `ollama_library_blocks` job), and each emulated Ollama
host's slot count holds across all workers through the shared limiter (`pipeline.slot_limiter_url`,
PostgreSQL advisory locks, core/limiter.py). At the end it checks that every item·stage was done exactly
once and that no host ever served more calls at once than its slots (the emulators' counters).

Everything it starts is stopped and both databases it made are dropped, also when it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import create_engine, func, select, text

DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
JOB = "ollama_library_blocks"
_URL = re.compile(r"http://127\.0\.0\.1:\d+")
BIN = Path(sys.executable).parent


class ClusterDemoError(RuntimeError):
    """A part of the demo did not start or a run did not finish in time (one line)."""


@contextmanager
def _database(admin_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _stop(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM to the process group it leads, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            _stop(proc)


@contextmanager
def _emulator(args: Sequence[str], log: Path) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.emulator", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = _URL.search(line)
        if not match:
            raise ClusterDemoError(f"an emulator did not start (see {log.name})")
        yield match.group(0)
    finally:
        _stop(proc)


def _celery_config(broker: str, dagster_db: str) -> dict[str, Any]:
    """Broker, a result backend every process can read (the daemon's run monitoring asks a task's state:
    `rpc://` answers only the process that sent it) and STARTED states (else a running task reads PENDING,
    which run monitoring takes for a lost worker)."""
    return {"broker": broker, "backend": "db+" + dagster_db, "config_source": {"task_track_started": True}}


def _dagster_yaml(dagster_db: str, broker: str, home: Path) -> dict[str, Any]:
    return {
        "storage": {"postgres": {"postgres_url": dagster_db}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"max_concurrent_runs": 4}},
        "run_launcher": {"module": "dagster_celery.launcher", "class": "CeleryRunLauncher",
                         "config": _celery_config(broker, dagster_db)},
        # A run whose worker was lost is failed, not resumed on another worker; its block is re-run by hand
        # ("retry failed"), and the items it had finished cost no model call then.
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 300, "poll_interval_seconds": 5,
                           "max_resume_run_attempts": 0},
        "compute_logs": {"module": "dagster.core.storage.local_compute_log_manager",
                         "class": "LocalComputeLogManager", "config": {"base_dir": str(home / "compute_logs")}},
        "run_retries": {"enabled": False},
        "telemetry": {"enabled": False},
    }


def run_cluster_demo(workdir: Path, *, items: int = 24, partition_size: int = 4, workers: int = 2,
                     hosts: int = 2, slots: int = 2, latency_ms: int = 150,
                     pg_admin_url: str = DEFAULT_PG, broker: str = DEFAULT_BROKER,
                     timeout_s: float = 600.0) -> dict[str, Any]:
    """Start the cluster, process a generated library of `items` once, check it, stop everything.
    Returns the report (also written to workdir/cluster_report.json)."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.db.models import OllamaStageResult
    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.core.stages import STAGES
    from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "dagster_home"
    home.mkdir(exist_ok=True)
    queue = f"ollama-cluster-{uuid.uuid4().hex[:8]}"  # its own queue: other workers on the broker never see it
    started = time.monotonic()
    with ExitStack() as stack:
        dagster_db = stack.enter_context(_database(pg_admin_url, "ollama_cluster_dagster"))
        library_db = stack.enter_context(_database(pg_admin_url, "ollama_cluster_library"))
        urls = [stack.enter_context(_emulator(["--parallel", str(slots), "--latency-ms", str(latency_ms)],
                                              workdir / f"emulator{n + 1}.log")) for n in range(hosts)]
        engine = make_engine(library_db)
        stack.callback(engine.dispose)
        init_db(engine)
        media_root = workdir / "media"
        ids = sorted(add_media_rows(engine, media_root, items).media_ids)
        settings = {
            "ollama": {"base_url": urls[0], "model": {"default": "llava:7b"}, "vision_model": "llava:7b",
                       "text_model": "llama3.2:3b", "timeout_ms": 60_000, "max_image_bytes": 5_000_000,
                       "hosts": [{"base_url": url, "parallel": slots} for url in urls], "warm_up": False},
            "database": {"url": library_db},
            "media_root": str(media_root), "logs_dir": str(workdir / "LOGS"),
            "pipeline": {"concurrency": slots * hosts, "partition_size": partition_size,
                         "slot_limiter_url": library_db},
        }
        config_file = workdir / "ollama_pipeline.yaml"
        config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
        (home / "dagster.yaml").write_text(yaml.safe_dump(_dagster_yaml(dagster_db, broker, home)), encoding="utf-8")
        celery_yaml = workdir / "celery.yaml"
        celery_yaml.write_text(yaml.safe_dump({"execution": {"config": _celery_config(broker, dagster_db)}}),
                               encoding="utf-8")
        workspace = workdir / "workspace.yaml"
        workspace.write_text(yaml.safe_dump({"load_from": [{"python_module": {
            "module_name": "ollama_pipeline.definitions", "location_name": "ollama_pipeline"}}]}), encoding="utf-8")
        env = {**os.environ, "DAGSTER_HOME": str(home), "OLLAMA_PIPELINE_CONFIG": str(config_file),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

        instance = DagsterInstance.from_config(str(home))
        stack.callback(instance.dispose)
        keys = Partitioning(size=partition_size).keys_of(ids)
        instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, keys)

        worker_procs = [stack.enter_context(_process(
            [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(celery_yaml),
             "-n", f"ollama-worker{n + 1}@%h", "-q", queue], workdir / f"worker{n + 1}.log", env, workdir))
            for n in range(workers)]
        daemon = stack.enter_context(_process([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
                                              workdir / "daemon.log", env, workdir))
        launch = subprocess.run(
            [str(BIN / "dagster"), "job", "backfill", "-w", str(workspace), "-j", JOB, "--noprompt",
             "--partitions", ",".join(keys),
             "--tags", json.dumps({"dagster-celery/queue": queue})],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        if launch.returncode != 0:
            raise ClusterDemoError("dagster job backfill failed: " + (launch.stderr or launch.stdout).strip()
                                   .splitlines()[-1])
        deadline = time.monotonic() + timeout_s
        runs: list[Any] = []
        finished = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
        while True:
            for proc, name in [*((p, f"worker{n + 1}") for n, p in enumerate(worker_procs)), (daemon, "daemon")]:
                if proc.poll() is not None:
                    raise ClusterDemoError(f"the {name} process exited (see {name}.log)")
            runs = instance.get_runs(RunsFilter(job_name=JOB))
            if len(runs) == len(keys) and all(r.status in finished for r in runs):
                break
            if time.monotonic() > deadline:
                states = sorted(r.status.value for r in runs)
                raise ClusterDemoError(f"runs not finished within {timeout_s:.0f} s: {states}")
            time.sleep(0.5)
        wall = time.monotonic() - started

        outcomes: dict[tuple[int, str], int] = {}
        by_worker: dict[str, int] = {}
        calls = failed = 0
        log_file = workdir / "LOGS" / "ollama_jobs.jsonl"
        for line in (log_file.read_text(encoding="utf-8").splitlines() if log_file.is_file() else []):
            record = json.loads(line)
            if record.get("event") not in ("stage_succeeded", "stage_failed", "stage_skipped"):
                continue
            pair = (int(record["media_id"]), str(record["job_type"]))
            outcomes[pair] = outcomes.get(pair, 0) + 1
            calls += int(record.get("calls") or 0)
            failed += record["event"] == "stage_failed"
            worker = _worker_of(record.get("pid"), worker_procs)
            by_worker[worker] = by_worker.get(worker, 0) + 1
        with engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(OllamaStageResult)
                                  .where(OllamaStageResult.status == "ok")).scalar_one()
        host_stats = [httpx.get(f"{url}/_emulator/stats", timeout=10).json() for url in urls]
        served = sum(int(s["model_calls"]) for s in host_stats)
        report = {
            "items": len(ids), "stages": len(STAGES), "partitions": len(keys), "runs": len(runs),
            "runs_by_status": _count(r.status.value for r in runs),
            "item_stages": len(outcomes), "item_stages_by_worker": by_worker, "failed": failed,
            "stored_ok": stored,
            "exactly_once": bool(outcomes) and set(outcomes.values()) == {1} and len(outcomes) == len(ids) * len(STAGES),
            "model_calls_logged": calls, "model_calls_served": served,
            "hosts": [{"host": f"host{n + 1}", "slots": slots, "model_calls": s["model_calls"],
                       "max_inflight_seen": s["max_inflight_seen"]} for n, s in enumerate(host_stats)],
            "within_slots": all(int(s["max_inflight_seen"]) <= slots for s in host_stats),
            "wall_s": round(wall, 1),
        }
    (workdir / "cluster_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def _worker_of(pid: int | None, workers: Sequence[subprocess.Popen[bytes]]) -> str:
    """Which worker process (by its place) the pid belongs to: the worker itself or a child of its pool."""
    seen = pid
    for _ in range(5):
        if seen is None:
            break
        for n, proc in enumerate(workers):
            if seen == proc.pid:
                return f"worker{n + 1}"
        try:
            status = Path(f"/proc/{seen}/status").read_text()
        except OSError:
            break
        match = re.search(r"^PPid:\s+(\d+)", status, re.M)
        seen = int(match.group(1)) if match else None
    return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_pipeline.app.cluster_demo",
                                     description="Dagster + PostgreSQL + queued runs + dagster-celery workers "
                                                 "over RabbitMQ + emulated Ollama hosts, on this machine.")
    parser.add_argument("--workdir", type=Path, default=Path("cluster_demo"))
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--partition-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=150)
    parser.add_argument("--pg", default=os.environ.get("OLLAMA_PIPELINE_TEST_PG", DEFAULT_PG),
                        help="PostgreSQL admin URL (databases are made and dropped)")
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    args = parser.parse_args(argv)
    try:
        report = run_cluster_demo(args.workdir, items=args.items, partition_size=args.partition_size,
                                  workers=args.workers, hosts=args.hosts, slots=args.slots,
                                  latency_ms=args.latency_ms, pg_admin_url=args.pg, broker=args.broker)
    except ClusterDemoError as exc:
        print(f"cluster-demo: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report["exactly_once"] and report["within_slots"] else 1


if __name__ == "__main__":
    sys.exit(main())
