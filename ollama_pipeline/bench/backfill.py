"""Benchmark of a targeted backfill: select + store + launch for 1 % of a 100,000-item library (issue 13
target: ≤ 10 s).

    python -m ollama_pipeline.bench.backfill [--items 100000] [--percent 1] [--out bench_results/backfill.json]

Builds the library in a temporary SQLite file (media rows and a caption result per item, every 100th made by
an older model, so `--where stale=caption` selects 1 % of the items spread over every partition), starts
`dagster-webserver` on a temporary instance (not timed) and times `ollama-pipeline backfill --where
stale=caption` end to end in this process: the SQL selection stored under an id, the partitions registered
and ONE Dagster backfill launched. Two routes: the webserver's GraphQL API (first with every partition new,
then again), and the `dagster-graphql` command on the local instance (no webserver). No daemon runs, so the
backfills stay requested; they are cancelled at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import insert

from ollama_pipeline.app.backfill import cancel, http_graphql, run_backfill, stop_group
from ollama_pipeline.core.backfill import parse_where, select_items
from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Media, OllamaStageResult
from ollama_pipeline.core.stages import STAGES

TARGET_S = 10.0
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def fill_library(url: str, items: int, every: int) -> int:
    """`items` media rows, each with a caption result; every `every`-th one by an older model (stale)."""
    engine = make_engine(url)
    init_db(engine)
    version = STAGES["ollama_caption"].version
    with engine.begin() as conn:
        conn.execute(insert(Media), [{"id": i, "path": f"2025/{i:06d}.jpg", "type": "image"}
                                     for i in range(1, items + 1)])
        conn.execute(insert(OllamaStageResult), [
            {"media_id": i, "stage": "ollama_caption", "status": "ok", "version": version,
             "model": "old-model:1b" if i % every == 0 else "llava:7b"} for i in range(1, items + 1)])
    engine.dispose()
    return items // every


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_webserver(env: dict[str, str], log: Path, timeout: float = 180.0) -> tuple[subprocess.Popen[bytes], str]:
    import requests

    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-m", "ollama_pipeline.definitions", "-h",
                                 "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    query = '{ assetNodeOrError(assetKey: {path: ["media"]}) { __typename } }'
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited: {log.read_text()[-2000:]}")
        try:
            answer = requests.post(f"{base}/graphql", json={"query": query}, timeout=5).json()
            if (answer.get("data") or {}).get("assetNodeOrError", {}).get("__typename") == "AssetNode":
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_group(proc)
    raise RuntimeError(f"dagster-webserver did not load the code location within {timeout:.0f} s")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(items: int, percent: float, workdir: Path) -> dict[str, Any]:
    every = max(1, round(100 / percent))
    url = f"sqlite:///{workdir / 'library.db'}"
    expected = fill_library(url, items, every)
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "ollama": {"base_url": "http://127.0.0.1:9", "model": {"default": "llava:7b"}, "timeout_ms": 5000,
                   "max_image_bytes": 1_000_000, "vision_model": "llava:7b", "text_model": "llama3.2:3b"},
        "database": {"url": url}, "media_root": str(workdir / "media"), "logs_dir": str(workdir / "LOGS"),
        "pipeline": {"partition_size": 1000}}), encoding="utf-8")
    home = workdir / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["OLLAMA_PIPELINE_CONFIG"] = str(config)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    settings = load_settings(config)
    engine = make_engine(url)

    started = time.perf_counter()
    counted = select_items(engine, settings, parse_where(["stale=caption"]), dry_run=True)
    dry_s = time.perf_counter() - started
    started = time.perf_counter()
    stored = select_items(engine, settings, parse_where(["stale=caption"]), source="bench")
    select_s = time.perf_counter() - started

    proc, base = start_webserver(env, workdir / "webserver.log")
    launched: list[str] = []
    timings: dict[str, float] = {}
    cpu_s: dict[str, float] = {}  # this process and its children (the dagster-graphql command); not the webserver
    try:
        for name, webserver in (("webserver_new_partitions", base), ("webserver_again", base),
                                ("dagster_graphql_command", None)):
            started, cpu = time.perf_counter(), _cpu_seconds()
            summary = run_backfill(settings, ["stale=caption"], webserver=webserver, source="bench",
                                   echo=lambda _line: None)
            timings[name] = round(time.perf_counter() - started, 3)
            cpu_s[name] = round(_cpu_seconds() - cpu, 3)
            launched.append(summary["backfill_id"])
            assert summary["items"] == expected, summary
        call = http_graphql(base)
        for backfill_id in launched:
            cancel(call, backfill_id)
    finally:
        stop_group(proc)
        engine.dispose()
    return {"items": items, "selected": stored.items, "partitions": len(stored.partitions),
            "dry_run_count_s": round(dry_s, 3), "select_and_store_s": round(select_s, 3),
            "select_and_launch_s": timings, "cpu_s_here_and_children": cpu_s, "load_average": os.getloadavg(),
            "backfill_ids": launched, "target_s": TARGET_S,
            "target_met": {k: v <= TARGET_S for k, v in timings.items()}, "counted": counted.items}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--out", default="bench_results/backfill.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ollama-backfill-bench-") as tmp:
        report = measure(args.items, args.percent, Path(tmp))
    print(f"{report['selected']:,} of {report['items']:,} items in {report['partitions']} partitions; "
          f"count {report['dry_run_count_s']:.2f} s, select+store {report['select_and_store_s']:.2f} s")
    for name, seconds in report["select_and_launch_s"].items():
        print(f"select + launch ({name}): {seconds:.2f} s (target ≤ {TARGET_S:.0f} s), CPU here and in children "
              f"{report['cpu_s_here_and_children'][name]:.2f} s")
    print("load average: " + ", ".join(f"{v:.2f}" for v in report["load_average"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
