"""`make cluster-demo` end to end: Dagster on PostgreSQL with the queued run coordinator and dagster-celery's
run launcher, two Celery worker processes over RabbitMQ (127.0.0.1:5672), two emulated Ollama hosts with
two slots each held across the workers by the PostgreSQL limiter (core/limiter.py)."""

from __future__ import annotations

from pathlib import Path

from ollama_pipeline.app.cluster_demo import run_cluster_demo
from ollama_pipeline.core.stages import STAGES


def test_cluster_demo_processes_each_item_and_stage_exactly_once_within_every_hosts_slots(
        tmp_path: Path, pg_database: str) -> None:
    """Two blocks as two Celery-run Dagster runs: both succeed, every item·stage has one outcome, the calls
    the pipeline logged are the calls the hosts served, and no host saw more than 2 calls at once."""
    report = run_cluster_demo(tmp_path / "cluster", items=4, partition_size=2, latency_ms=50,
                              pg_admin_url=pg_database.rsplit("/", 1)[0] + "/postgres", timeout_s=300)
    assert report["runs_by_status"] == {"SUCCESS": 2}
    assert report["exactly_once"] and report["item_stages"] == 4 * len(STAGES) == report["stored_ok"]
    assert report["model_calls_logged"] == report["model_calls_served"] > 0
    assert report["within_slots"] and all(h["max_inflight_seen"] <= 2 for h in report["hosts"])
    assert set(report["item_stages_by_worker"]) <= {"worker1", "worker2"}
