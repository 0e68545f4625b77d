"""Several Ollama hosts (`ollama.hosts`): stickiness by item, per-host slots, failover when a host dies
mid-run (exactly-once results), per-host health and counters. Each host is a separate emulator process on
loopback, killed with SIGKILL like a machine that goes away."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ollama_pipeline.app.cli import main as cli_main
from ollama_pipeline.app.demo_library import add_media_rows
from ollama_pipeline.core.config import settings_from_dict
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.errors import ConfigError
from ollama_pipeline.core.hosts import BALANCE_EPSILON, Host, HostPool
from ollama_pipeline.core.runner import Pipeline, run_items, run_stage
from ollama_pipeline_tests.conftest import make_settings

_URL = re.compile(r"http://127\.0\.0\.1:\d+")


class EmulatorProcess:
    """`ollama-pipeline emulator` in its own process, on a free loopback port."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.emulator", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the emulator prints its URL once it listens
        match = _URL.search(line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"emulator did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.base_url = match.group(0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def hosts() -> Iterator[Callable[..., EmulatorProcess]]:
    started: list[EmulatorProcess] = []

    def start(*args: str) -> EmulatorProcess:
        started.append(EmulatorProcess(*args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        for stream in (proc.proc.stdout, proc.proc.stderr):
            if stream is not None:
                stream.close()


def _library(tmp_path: Path, base_url: str, count: int, **overrides: Any) -> tuple[Any, list[int]]:
    settings = make_settings(db_url=f"sqlite:///{tmp_path / 'library.db'}", media_root=tmp_path / "media",
                             logs_dir=tmp_path / "LOGS", base_url=base_url, **overrides)
    engine = make_engine(settings.database.url)
    init_db(engine)
    ids = sorted(add_media_rows(engine, settings.media_root, count).media_ids)
    engine.dispose()
    return settings, ids


def _events(logs_dir: Path, event: str) -> list[dict[str, Any]]:
    path = logs_dir / "ollama_jobs.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in lines if e.get("event") == event]


def test_an_items_calls_stick_to_one_host_and_the_hosts_share_the_items(tmp_path: Path, hosts) -> None:
    """Every call of an item goes to its rendezvous host; both hosts get items; per-host slots hold."""
    a, b = hosts("--parallel", "2"), hosts("--parallel", "2")
    settings, ids = _library(tmp_path, a.base_url, 16, ollama__hosts=[
        {"base_url": a.base_url, "parallel": 2}, {"base_url": b.base_url, "parallel": 2}])
    pipeline = Pipeline.from_settings(settings)
    for stage in ("ollama_caption", "ollama_tags_normalize", "ollama_quality"):
        outcomes = list(run_stage(pipeline, stage, ids))
        assert {o.status for o in outcomes} == {"written"}
    pool = pipeline.client.pool
    expected = Counter(pool.ranked("llava:7b", str(i))[0].label for i in ids)
    calls = {row["host"]: row["ok"] for row in pipeline.client.host_stats()}
    assert calls == {host: 3 * n for host, n in expected.items()}  # three vision calls per item, same host
    assert len(expected) == 2
    assert all(row["failed"] == 0 and row["in_flight"] == 0 for row in pipeline.client.host_stats())


def test_a_host_killed_mid_run_costs_only_its_in_flight_calls(tmp_path: Path, hosts) -> None:
    """SIGKILL one of two hosts mid-run: every item is written exactly once, nothing fails, and the dead
    host lost at most its slots' worth of calls, which the other host answered."""
    a, b = hosts("--parallel", "2", "--latency-ms", "150"), hosts("--parallel", "2", "--latency-ms", "150")
    settings, ids = _library(tmp_path, a.base_url, 24, ollama__hosts=[
        {"base_url": a.base_url, "parallel": 2}, {"base_url": b.base_url, "parallel": 2}])
    pipeline = Pipeline.from_settings(settings)
    outcomes: list[Any] = []
    runner = threading.Thread(target=lambda: outcomes.extend(run_stage(pipeline, "ollama_caption", ids)))
    runner.start()
    deadline = time.monotonic() + 60
    while pipeline.client.host_stats()[0]["ok"] < 2:
        assert time.monotonic() < deadline and runner.is_alive(), "host A never answered"
        time.sleep(0.01)
    a.kill()
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert sorted(o.media_id for o in outcomes) == ids and {o.status for o in outcomes} == {"written"}
    succeeded = Counter(e["media_id"] for e in _events(settings.logs_dir, "stage_succeeded"))
    assert succeeded == dict.fromkeys(ids, 1) and not _events(settings.logs_dir, "stage_failed")
    dead, alive = pipeline.client.host_stats()
    assert not dead["up"] and dead["downs"] == 1 and 1 <= dead["failed"] <= 2
    assert dead["ok"] + alive["ok"] == len(ids) and alive["failed"] == 0
    health = pipeline.client.health()
    assert health.ok and [h.ok for h in health.hosts] == [False, True]
    (logged,) = _events(settings.logs_dir, "hosts")  # the run's per-host state, in the jobs log
    assert [h["up"] for h in logged["hosts"]] == [False, True] and logged["hosts"][1]["ok"] == alive["ok"]


def test_a_call_moves_to_a_host_that_serves_its_model(tmp_path: Path, hosts) -> None:
    """A host listing its models gets only calls for those; text calls go to the host that has the text model."""
    a, b = hosts(), hosts()
    settings, ids = _library(tmp_path, a.base_url, 4, ollama__hosts=[
        {"base_url": a.base_url, "models": ["llava:7b"]}, {"base_url": b.base_url, "models": ["Llama3.2:3b"]}])
    pipeline = Pipeline.from_settings(settings)
    assert {o.status for o in run_stage(pipeline, "ollama_caption", ids)} == {"written"}
    assert {o.status for o in run_stage(pipeline, "ollama_title", ids)} == {"written"}
    vision, text = pipeline.client.host_stats()
    assert vision["ok"] == 4 and text["ok"] == 4


def test_health_command_lists_every_host(tmp_path: Path, hosts, capsys: pytest.CaptureFixture[str]) -> None:
    """`ollama-pipeline health` checks every host; one host down still exits 0, all down exits 2."""
    a = hosts()
    config = tmp_path / "ollama_pipeline.yaml"
    data = {"ollama": {"base_url": a.base_url, "model": {"default": "llava:7b"}, "timeout_ms": 3000,
                       "max_image_bytes": 1_000_000,
                       "hosts": [{"base_url": "http://127.0.0.1:9", "weight": 2, "parallel": 1}]},
            "database": {"url": f"sqlite:///{tmp_path / 'x.db'}"}, "media_root": str(tmp_path)}
    config.write_text(json.dumps(data))
    assert cli_main(["--config", str(config), "health"]) == 0
    out = capsys.readouterr().out
    assert f"host {a.base_url}: up" in out and "host http://127.0.0.1:9: DOWN (network.connect)" in out
    a.kill()
    assert cli_main(["--config", str(config), "health"]) == 2


def test_host_entries_are_validated() -> None:
    """A bad host entry is a typed config error naming the key."""
    base = {"ollama": {"base_url": "http://127.0.0.1:11434", "model": {"default": "m"}, "timeout_ms": 1000,
                       "max_image_bytes": 100_000}, "database": {"url": "sqlite://"}, "media_root": "."}
    for bad, needle in (({"base_url": "nope"}, "ollama.hosts.0.base_url"),
                        ({"base_url": "http://x:1", "parallel": 0}, "ollama.hosts.0.parallel"),
                        ({"base_url": "http://x:1", "slots": 2}, "unknown key 'ollama.hosts.0.slots'")):
        with pytest.raises(ConfigError) as err:
            settings_from_dict({**base, "ollama": {**base["ollama"], "hosts": [bad]}})
        assert needle in str(err.value)


def test_rendezvous_moves_only_the_items_of_a_host_that_leaves() -> None:
    """With a third host down, items of the other two keep their host; weights share items in proportion."""
    def pool(weights: list[float]) -> HostPool:
        return HostPool([Host(index=i, base_url=f"http://h{i}:1", weight=w, slots=1, models=None)
                         for i, w in enumerate(weights)], probe=lambda h: True)

    three = pool([1, 1, 1])
    keys = [str(i) for i in range(3000)]
    first = {k: three.ranked(None, k)[0].index for k in keys}
    second = {k: three.ranked(None, k)[1].index for k in keys}
    three.hosts[2].up = False
    moved = {k for k in keys if first[k] == 2}
    for k in keys:
        up = [h for h in three.ranked(None, k) if h.up][0].index
        assert up == (second[k] if k in moved else first[k])
    shares = Counter(pool([3, 1]).ranked(None, k)[0].index for k in keys)
    assert 0.70 < shares[0] / len(keys) < 0.80


def _pool(weights: list[float]) -> HostPool:
    return HostPool([Host(index=i, base_url=f"http://h{i}:1", weight=w, slots=1, models=None)
                     for i, w in enumerate(weights)], probe=lambda h: True)


def _bound(items: int, share: float) -> int:
    return math.ceil((1 + BALANCE_EPSILON) * items * share)


def test_a_runs_items_are_split_over_equal_hosts_within_the_bound() -> None:
    """64 items over 2 and 4 equal hosts: no host gets more than ceil((1 + ε) × its share), every host
    gets items, and the assignment is what later calls of those items are ranked by."""
    keys = [str(i) for i in range(1, 65)]
    for n in (2, 4):
        pool = _pool([1.0] * n)
        plan = pool.assign(keys)
        counts = Counter(h.index for h in plan.values())
        assert sum(counts.values()) == 64 and len(counts) == n
        assert max(counts.values()) <= _bound(64, 1 / n)
        assert all(pool.ranked(None, k)[0] is plan[k] for k in keys)
        assert pool.assign(keys) == plan  # decided by the run's items alone: the same run, the same hosts


def test_weights_are_respected_by_the_bounded_assignment() -> None:
    """Weights 3:1 over 200 items: each host within ceil((1 + ε) × its weighted share), so the heavy host
    takes about three quarters; a host of weight 0 gets nothing while another has room."""
    keys = [str(i) for i in range(200)]
    counts = Counter(h.index for h in _pool([3.0, 1.0]).assign(keys).values())
    assert counts[0] <= _bound(200, 0.75) and counts[1] <= _bound(200, 0.25)
    assert counts[0] + counts[1] == 200 and counts[0] >= 200 - _bound(200, 0.25)
    assert set(Counter(h.index for h in _pool([1.0, 1.0, 0.0]).assign(keys).values())) == {0, 1}


def test_an_assigned_items_calls_fail_over_in_rendezvous_order() -> None:
    """When an item's assigned host is down its calls go to the first up host of its rendezvous order;
    the hosts of other items do not change."""
    pool = _pool([1.0, 1.0, 1.0])
    keys = [str(i) for i in range(300)]
    plan = pool.assign(keys)
    moved = [k for k in keys if pool.ranked(None, k)[0].index != _pool([1.0, 1.0, 1.0]).ranked(None, k)[0].index]
    assert moved  # some items were moved off their first choice by the bound
    pool.hosts[0].up = False
    for k in keys:
        up = [h for h in pool.ranked(None, k) if h.up][0]
        if plan[k].index != 0:
            assert up is plan[k]
        else:
            rest = [h for h in _pool([1.0, 1.0, 1.0]).ranked(None, k) if h.index != 0]
            assert up.index == rest[0].index


def test_a_run_over_two_hosts_splits_its_items_evenly_and_keeps_each_items_calls_on_one_host(
        tmp_path: Path, hosts) -> None:
    """run_items over three vision stages and 32 items on two emulated hosts: each host serves three
    calls for each of its items and no more than ceil((1 + ε) × 16) items; all written once."""
    a, b = hosts("--parallel", "2"), hosts("--parallel", "2")
    settings, ids = _library(tmp_path, a.base_url, 32, ollama__hosts=[
        {"base_url": a.base_url, "parallel": 2}, {"base_url": b.base_url, "parallel": 2}])
    pipeline = Pipeline.from_settings(settings)
    stages = ["ollama_caption", "ollama_tags_normalize", "ollama_quality"]
    outcomes = list(run_items(pipeline, stages, ids))
    assert len(outcomes) == 96 and {o.status for o in outcomes} == {"written"}
    items = Counter(pipeline.client.pool.ranked("llava:7b", str(i))[0].label for i in ids)
    calls = {row["host"]: row["ok"] for row in pipeline.client.host_stats()}
    assert calls == {host: 3 * n for host, n in items.items()}
    assert len(items) == 2 and max(items.values()) <= _bound(32, 0.5)
    succeeded = Counter((e["job_type"], e["media_id"]) for e in _events(settings.logs_dir, "stage_succeeded"))
    assert len(succeeded) == 96 and set(succeeded.values()) == {1}


def _host_metadata(home: Path, asset: str) -> list[list[dict[str, Any]]]:
    """The `hosts` metadata of every materialization of an asset, newest first."""
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(asset)), limit=50).records
        return [r.asset_materialization.metadata["hosts"].value for r in records]


def test_a_dagster_runs_metadata_shows_each_hosts_health_and_throughput(
        tmp_path: Path, hosts, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`ollama-pipeline run` over two hosts: each partition's materialization names both hosts with their
    state and this run's calls, tokens and model time; after one host died, the next run shows it down
    and the other serving every item."""
    import yaml

    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    a, b = hosts("--parallel", "2"), hosts("--parallel", "2")
    settings, ids = _library(tmp_path, a.base_url, 8, pipeline__partition_size=4, ollama__hosts=[
        {"base_url": a.base_url, "parallel": 2}, {"base_url": b.base_url, "parallel": 2}])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    assert cli_main(["--config", str(config), "run", "--stages", "caption"]) == 0, capsys.readouterr()
    final = _host_metadata(home, "ollama_caption")[0]  # the run's last partition: its figures so far
    assert [row["host"] for row in final] == [a.base_url, b.base_url] and all(row["up"] for row in final)
    assert sum(row["ok"] for row in final) == len(ids) and all(row["ok"] > 0 for row in final)
    assert all(row["output_tokens"] > 0 and row["model_s"] >= 0 for row in final)
    b.kill()
    assert cli_main(["--config", str(config), "run", "--stages", "caption", "--force"]) == 0, capsys.readouterr()
    alive, dead = _host_metadata(home, "ollama_caption")[0]
    assert not dead["up"] and dead["downs"] == 1 and dead["ok"] == 0 and alive["ok"] == len(ids)
