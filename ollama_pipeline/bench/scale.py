"""The library-scale probe of the bench: memory and sensor time at 1,000 and at 100,000 media rows.

For each size a library gets that many `media` rows (the first `slice_items` with real image files, the
rest rows only: the sensor reads ids, and only the slice is sent to the model). Then a FRESH process
(`python -m ollama_pipeline.bench.scale`, so peak RSS is its own) evaluates `new_media_sensor` ticks on a
new Dagster instance until every row is a partition (at most 25,000 per tick), and runs the caption stage
over the slice through Dagster. The probe prints its figures as JSON; `scale_check` compares the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from ollama_pipeline.bench.harness import (
    EmulatorProcess,
    InstanceKind,
    bench_config,
    dagster_home,
    peak_rss_mb,
    write_config,
)
from ollama_pipeline.core.config import CONFIG_ENV, load_settings


def build_scale_library(workdir: Path, base_url: str, rows: int, slice_items: int) -> Path:
    """A library of `rows` media rows, the first slice_items with files; returns its config path."""
    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.db.models import Media

    folder = workdir / f"scale_{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    data = bench_config(folder, base_url, concurrency=8)
    engine = make_engine(data["database"]["url"])
    init_db(engine)
    add_media_rows(engine, folder / "media", min(rows, slice_items))
    chunk = 10_000
    with engine.begin() as conn:
        for start in range(slice_items, rows, chunk):
            conn.execute(insert(Media), [{"path": f"rows-only/{i:07d}.png", "type": "image", "width": 512,
                                          "height": 512, "status": "active"}
                                         for i in range(start, min(rows, start + chunk))])
    engine.dispose()
    return write_config(folder / "ollama_pipeline.yaml", data)


def probe(config_path: Path, slice_items: int, workdir: Path) -> dict[str, Any]:
    """In this (fresh) process: sensor ticks until every row is a partition, then one run over the slice."""
    from dagster import DagsterInstance, build_sensor_context

    from ollama_pipeline.definitions import defs
    from ollama_pipeline.defs.launch import materialize_stages
    from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME
    from ollama_pipeline.defs.resources import PipelineResource
    from ollama_pipeline.defs.sensors import new_media_sensor

    settings = load_settings(config_path)
    resources = {"pipeline": PipelineResource.for_settings(settings)}
    rss_start = peak_rss_mb()
    with dagster_home(workdir, "sqlite") as home:
        instance = DagsterInstance.from_config(str(home))
        ticks: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            with build_sensor_context(instance=instance, definitions=defs, resources=resources,
                                      cursor=cursor) as context:  # PipelineResource nests resources: a context manager
                started = time.perf_counter()
                result = new_media_sensor(context)
                elapsed = time.perf_counter() - started
            if not result.run_requests:
                break
            cursor = result.cursor
            ticks.append({"seconds": round(elapsed, 3), "runs_requested": len(result.run_requests),
                          "cursor": cursor})
        partitions = len(instance.get_dynamic_partitions(MEDIA_PARTITIONS_NAME))
        rss_after_sensor = peak_rss_mb()
        started = time.perf_counter()
        summary = materialize_stages(settings, list(range(1, slice_items + 1)), ["ollama_caption"], instance,
                                     log_level="WARNING")
        slice_s = time.perf_counter() - started
        instance.dispose()
    return {"partitions": partitions, "ticks": len(ticks), "max_tick_s": max((t["seconds"] for t in ticks), default=0),
            "tick_seconds": [t["seconds"] for t in ticks], "slice_items": slice_items,
            "slice_run_s": round(slice_s, 3), "slice_ok": summary.ok,
            "rss_at_start_mb": round(rss_start, 1), "rss_after_sensor_mb": round(rss_after_sensor, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def scale_check(workdir: Path, *, small: int, large: int, slice_items: int, latency_ms: int = 0,
                parallel: int = 8, progress: Any = print) -> dict[str, Any]:
    """The probe at `small` and at `large` rows, each in a fresh process; the RSS growth between them."""
    results: dict[str, Any] = {}
    with EmulatorProcess(latency_ms=min(latency_ms, 20), parallel=parallel) as emulator:
        for rows in (small, large):
            progress(f"[scale] library of {rows:,} media rows (first {slice_items} with files)")
            config_path = build_scale_library(workdir, emulator.base_url, rows, slice_items)
            env = {**os.environ, CONFIG_ENV: str(config_path)}
            out = subprocess.run([sys.executable, "-m", "ollama_pipeline.bench.scale", "--config", str(config_path),
                                  "--slice", str(slice_items), "--workdir", str(workdir)],
                                 env=env, capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise RuntimeError(f"scale probe at {rows} rows failed: {out.stderr.strip()[-800:]}")
            results[str(rows)] = json.loads(out.stdout.strip().splitlines()[-1])
            progress(f"[scale] {rows:,} rows: {results[str(rows)]}")
    a, b = results[str(small)], results[str(large)]
    return {"sizes": results, "rss_growth_mb": round(b["peak_rss_mb"] - a["peak_rss_mb"], 1),
            "small": small, "large": large}


def probe_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one scale probe (started by `ollama-pipeline bench --scale-check`)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--slice", type=int, default=200)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(probe(Path(args.config), args.slice, Path(args.workdir)), sort_keys=True))
    return 0




# --- `make bench-scale`: issue 13's scale targets on a generated library of 1,000,000 items -----------------

TARGETS = {  # target name -> (limit, unit); a measurement passes when it is <= the limit
    "sensor_tick_10k_new_rows_s": (2.0, "s"),
    "plan_run_over_all_items_s": (10.0, "s"),
    "all_stage_run_10k_items_peak_rss_mb": (500.0, "MB"),
    "dagster_asset_page_warm_s": (3.0, "s"),
    "dagster_partitions_view_warm_s": (3.0, "s"),
    "backfill_1pct_select_and_launch_s": (10.0, "s"),
    "export_feed_peak_rss_mb": (500.0, "MB"),
}
DISTINCT_FILES = 256  # distinct tiny PNGs; every media row has its own path, a hard link to one of them
STALE_EVERY = 100  # every 100th older item has a caption by an older model: `--where stale=caption` = 1 %
PARTITION_BAR = r"^[\d,]+ Partitions? Selected$"


def _batched(rows: Any, size: int) -> Any:
    from itertools import islice

    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch


def bulk_load(engine: Any, table: str, columns: Sequence[str], rows: Any, chunk: int = 50_000) -> int:
    """Rows into table as fast as the database takes them: COPY on PostgreSQL, executemany on SQLite."""
    import csv
    import io

    count = 0
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "postgresql":
            statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
            for batch in _batched(rows, chunk):
                buf = io.StringIO()
                csv.writer(buf).writerows(batch)
                buf.seek(0)
                cur.copy_expert(statement, buf)
                count += len(batch)
        else:
            statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
            for batch in _batched(rows, chunk):
                cur.executemany(statement, batch)
                count += len(batch)
        raw.commit()
    finally:
        raw.close()
    return count


def _tiny_pngs(folder: Path, count: int) -> list[tuple[Path, str, int]]:
    """count distinct 64 px PNGs (noise of their own seed: distinct dHashes); (path, sha256, size) each."""
    import hashlib
    import random

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        rng = random.Random(n)
        image = Image.frombytes("L", (8, 8), bytes(rng.randrange(256) for _ in range(64))).resize((64, 64))
        path = folder / f"src_{n:04d}.png"
        image.convert("RGB").save(path, format="PNG")
        data = path.read_bytes()
        out.append((path, hashlib.sha256(data).hexdigest(), len(data)))
    return out


def build_million_library(workdir: Path, base_url: str, items: int, new_items: int, db_url: str | None,
                          progress: Any = print) -> tuple[Path, dict[str, Any]]:
    """The library: `items` media rows in the demo's default layout (LocalSupervisor's schema; on
    PostgreSQL, which that layout does not support, the pipeline's own), each with
    a prompt and its own file (a hard link to one of DISTINCT_FILES tiny PNGs). The first items - new_items
    were processed before: indexed (dHash) and captioned (every STALE_EVERY-th by an older model); the last
    new_items are new. Returns the config path and the timings of the build."""
    import random

    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.stages import STAGES

    data = bench_config(workdir, base_url, db_url=db_url, concurrency=8)
    data["pipeline"]["partition_size"] = 1000
    media_root = workdir / "media"
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    sources = _tiny_pngs(workdir / "sources", DISTINCT_FILES)
    for i in range(1, items + 1):
        target = media_root / f"{i // 1000:04d}" / f"{i:07d}.png"
        if i % 1000 == 0 or i == 1:
            target.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % DISTINCT_FILES][0], target)
    timings["files_s"] = round(time.perf_counter() - started, 1)
    progress(f"[scale] {items:,} files (hard links to {DISTINCT_FILES} PNGs) in {timings['files_s']} s")

    engine = make_engine(data["database"]["url"])
    layout = "localsupervisor" if engine.dialect.name == "sqlite" else "pipeline"
    if layout == "localsupervisor":  # the demo's default layout (LocalSupervisor's schema: SQLite only)
        from ollama_pipeline.app.localsupervisor_schema import create_localsupervisor_schema

        create_localsupervisor_schema(engine)
    init_db(engine)
    timings["layout"] = layout
    now = "2026-01-01 00:00:00.000000"
    old = items - new_items
    version = STAGES["ollama_caption"].version
    rng = random.Random(13)
    started = time.perf_counter()
    if layout == "localsupervisor":  # as its importer writes them: absolute paths, unique content hashes
        root = str(media_root.resolve())
        bulk_load(engine, "media", ("id", "path", "type", "source", "width", "height", "filesize", "hash",
                                    "created_at", "imported_at"),
                  ((i, f"{root}/{i // 1000:04d}/{i:07d}.png", "image", "sd", 64, 64, sources[i % DISTINCT_FILES][2],
                    f"{i:064x}", now, now) for i in range(1, items + 1)))
        bulk_load(engine, "prompts", ("id", "media_id", "prompt", "model", "seed", "width", "height"),
                  ((i, i, f"a generated scene number {i % 5000}", "sdxl", str(i), 64, 64) for i in range(1, items + 1)))
    else:
        bulk_load(engine, "media", ("id", "path", "type", "width", "height", "has_nsfw", "hash", "status",
                                    "created_at", "updated_at"),
                  ((i, f"{i // 1000:04d}/{i:07d}.png", "image", 64, 64, False, sources[i % DISTINCT_FILES][1],
                    "active", now, now) for i in range(1, items + 1)))
        bulk_load(engine, "prompts", ("id", "media_id", "prompt", "model", "seed", "size", "created_at"),
                  ((i, i, f"a generated scene number {i % 5000}", "sdxl", i, "64x64", now)
                   for i in range(1, items + 1)))
    bulk_load(engine, "ollama_media_index", ("media_id", "content_sha256", "dhash", "size_bytes", "width", "height",
                                             "updated_at"),
              ((i, sources[i % DISTINCT_FILES][1], f"{rng.getrandbits(64):016x}", sources[i % DISTINCT_FILES][2],
                64, 64, now) for i in range(1, old + 1)))
    bulk_load(engine, "ollama_stage_results", ("media_id", "stage", "status", "model", "version", "last_success_at",
                                               "updated_at"),
              ((i, "ollama_caption", "ok", "old-model:1b" if i % STALE_EVERY == 0 else "llava:7b", version, now, now)
               for i in range(1, old + 1)))
    with engine.begin() as conn:
        from sqlalchemy import text

        if engine.dialect.name == "postgresql":
            for table in ("media", "prompts"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {items})"))
        conn.execute(text("ANALYZE"))
    engine.dispose()
    timings["rows_s"] = round(time.perf_counter() - started, 1)
    progress(f"[scale] {items:,} media rows with prompts, {old:,} indexed and captioned: {timings['rows_s']} s")
    data["media_root"] = str(media_root)
    return write_config(workdir / "ollama_pipeline.yaml", data), timings


# Steps: each runs in a fresh process (`--step NAME`) so that its peak RSS is its own.

def _settings_and_instance(config: Path) -> tuple[Any, Any]:
    from dagster import DagsterInstance

    return load_settings(config), DagsterInstance.get()


def step_prepare(config: Path, items: int, new_items: int) -> dict[str, Any]:
    """Not timed: the partitions of the items processed before exist (a library's steady state)."""
    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.defs.partitions import register_partitions

    settings, instance = _settings_and_instance(config)
    keys = Partitioning(size=settings.pipeline.partition_size).keys_of(range(1, items - new_items + 1))
    register_partitions(instance, keys)
    return {"registered": len(keys)}


def step_sensor(config: Path, items: int, new_items: int) -> dict[str, Any]:
    """Ticks of new_media_sensor (Dagster's build_sensor_context on the instance), in one process as in the
    code server the daemon asks every minute: a first tick over the new_items rows before the new ones
    (their partitions exist: this is the process's warm-up), then the timed tick over the new_items new
    rows, whose partitions it registers. The partitions of the new rows are removed first (not timed), so
    the step can be repeated."""
    from dagster import build_sensor_context

    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.definitions import defs
    from ollama_pipeline.defs.assets import LIBRARY_OP
    from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME
    from ollama_pipeline.defs.resources import PipelineResource
    from ollama_pipeline.defs.sensors import new_media_sensor

    settings, instance = _settings_and_instance(config)
    partitioning = Partitioning(size=settings.pipeline.partition_size)
    old_keys = set(partitioning.keys_of(range(1, items - new_items + 1)))
    for key in partitioning.keys_of(range(items - new_items + 1, items + 1)):
        if key not in old_keys and instance.has_dynamic_partition(MEDIA_PARTITIONS_NAME, key):
            instance.delete_dynamic_partition(MEDIA_PARTITIONS_NAME, key)
    resources = {"pipeline": PipelineResource.for_settings(settings)}
    ticks = []
    for cursor in (items - 2 * new_items, items - new_items):
        with build_sensor_context(instance=instance, definitions=defs, resources=resources,
                                  cursor=str(cursor)) as context:
            started = time.perf_counter()
            result = new_media_sensor(context)
            ticks.append(time.perf_counter() - started)
    requested = sum(len(r.run_config["ops"][LIBRARY_OP]["config"].get("media_ids") or ())
                    for r in result.run_requests or ())
    return {"seconds": round(ticks[1], 3), "first_tick_in_process_s": round(ticks[0], 3),
            "run_requests": len(result.run_requests), "cursor": result.cursor, "items_requested": requested,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def step_plan(config: Path, items: int, new_items: int) -> dict[str, Any]:
    """What `ollama-pipeline run` does over all items before its first model call (materialize_stages up to
    execute_in_process): orphan check, health check, every id, its partition keys, registering them, the job
    and the run request (tags, run config) of each contiguous range."""
    from dagster import AssetKey, Definitions, in_process_executor
    from sqlalchemy import select

    from ollama_pipeline.core.db.models import Media
    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.defs.assets import LIBRARY_OP, all_assets
    from ollama_pipeline.defs.launch import _resource, resolve_asset_names
    from ollama_pipeline.defs.orphans import fail_orphan_runs
    from ollama_pipeline.defs.partitions import contiguous_ranges, range_tags, register_partitions

    settings, instance = _settings_and_instance(config)
    started = time.perf_counter()
    resource = _resource(settings)
    pipeline = resource.pipeline()
    fail_orphan_runs(instance, pipeline)
    assert pipeline.client.health().ok
    with pipeline.engine.connect() as conn:
        ids = list(conn.execute(select(Media.id).order_by(Media.id)).scalars())
    keys = Partitioning(size=settings.pipeline.partition_size).keys_of(ids)
    position = register_partitions(instance, keys).positions
    defs = Definitions(assets=all_assets, resources={"pipeline": resource}, executor=in_process_executor)
    job = defs.resolve_implicit_global_asset_job_def()
    selection = [AssetKey(name) for name in resolve_asset_names(None)]
    requests = [(range_tags(start, end), {"ops": {LIBRARY_OP: {"config": {"force": False}}}})
                for start, end in contiguous_ranges(position, keys)]
    subset = job.get_subset(asset_selection=set(selection))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "items": len(ids), "partitions": len(keys), "runs": len(requests),
            "job": subset.name, "peak_rss_mb": round(peak_rss_mb(), 1)}


def step_run(config: Path, items: int, new_items: int, run_items: int | None = None) -> dict[str, Any]:
    """An all-stage Dagster run (media + every stage) over the first run_items (default: all) new items."""
    from ollama_pipeline.defs.launch import materialize_stages

    settings, instance = _settings_and_instance(config)
    started = time.perf_counter()
    first = items - new_items + 1
    summary = materialize_stages(settings, range(first, first + (run_items or new_items)), None, instance,
                                 log_level="WARNING")
    return {"seconds": round(time.perf_counter() - started, 1), "ok": summary.ok, "runs": len(summary.runs),
            "items": summary.items,
            "counts": summary.counts, "failed_codes": {k: dict(v) for k, v in summary.failed_codes.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def step_export(config: Path, items: int, new_items: int) -> dict[str, Any]:
    """The export feed of the whole library (core.export.write_export)."""
    from ollama_pipeline.core.export import write_export

    settings = load_settings(config)
    started = time.perf_counter()
    path, count = write_export(settings, Path(settings.media_root).parent / "export.jsonl")
    return {"seconds": round(time.perf_counter() - started, 1), "items": count,
            "bytes": path.stat().st_size, "peak_rss_mb": round(peak_rss_mb(), 1)}


def step_backfill(config: Path, items: int, new_items: int, webserver: str) -> dict[str, Any]:
    """`ollama-pipeline backfill --where stale=caption --webserver URL`: select, store, launch (timed), then
    cancelled (no daemon runs it)."""
    from ollama_pipeline.app.backfill import cancel, http_graphql, run_backfill

    settings = load_settings(config)
    started = time.perf_counter()
    summary = run_backfill(settings, ["stale=caption"], webserver=webserver, source="bench", echo=lambda _l: None)
    seconds = time.perf_counter() - started
    cancel(http_graphql(webserver), summary["backfill_id"])
    return {"seconds": round(seconds, 3), "items": summary["items"], "partitions": summary.get("partitions"),
            "route": summary.get("route"), "backfill_id": summary["backfill_id"], "peak_rss_mb": round(peak_rss_mb(), 1)}


STEPS = {"prepare": step_prepare, "sensor": step_sensor, "plan": step_plan, "run": step_run,
         "export": step_export, "backfill": step_backfill}


def run_step(name: str, config: Path, home: Path, items: int, new_items: int, *, extra: Sequence[str] = (),
             timeout: float = 3600) -> dict[str, Any]:
    env = {**os.environ, CONFIG_ENV: str(config), "DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-m", "ollama_pipeline.bench.scale", "--step", name, "--config",
                          str(config), "--items", str(items), "--new-items", str(new_items), *extra],
                         env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def browser_timings(dagster_url: str, stage: str, partitions: int) -> dict[str, Any]:
    """Warm loads in Debian's chromium (Playwright): each page is opened once (cold, not counted), then
    timed from navigation until drawn: the asset page until its name heading shows, the partitions view
    until the partition bar ("N Partitions Selected") shows."""
    import re
    import shutil as _shutil

    from playwright.sync_api import expect, sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    executable = _shutil.which("chromium")
    if executable is None:
        return {"error": "Debian's chromium is not installed: run `make browser`"}
    out: dict[str, Any] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=flags)
        page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
        page.set_default_timeout(120_000)
        bar = re.compile(PARTITION_BAR)

        def asset_page() -> None:  # the asset's name and its tabs drawn
            page.goto(f"{dagster_url}/assets/{stage}")
            expect(page.get_by_text(stage, exact=True).first).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Partitions", exact=True).first).to_be_visible(timeout=120_000)

        def partitions_view() -> None:  # the partition bar drawn
            page.goto(f"{dagster_url}/assets/{stage}?view=partitions")
            expect(page.get_by_text(bar).first).to_be_visible(timeout=120_000)

        for name, load in (("asset_page", asset_page), ("partitions_view", partitions_view)):
            load()  # cold: the bundle, the code location's first answers
            try:
                page.get_by_role("button", name="Skip").click(timeout=2000)  # the first-visit community dialog
            except Exception:  # noqa: BLE001 - it only shows on a first visit
                pass
            runs = []
            for _ in range(3):
                page.goto("about:blank")
                started = time.perf_counter()
                load()
                runs.append(round(time.perf_counter() - started, 3))
            out[name] = {"runs_s": runs, "median_s": sorted(runs)[1]}
        out["partition_bar"] = page.get_by_text(bar).first.inner_text()
        out["expected_partitions"] = partitions
        browser.close()
    return out


def _row(name: str, measured: float | None, note: str = "") -> dict[str, Any]:
    limit, unit = TARGETS[name]
    return {"target": name, "limit": limit, "unit": unit, "measured": measured,
            "pass": measured is not None and measured <= limit, "note": note}


def bench_backend(kind: InstanceKind, workdir: Path, items: int, new_items: int, run_items: int,
                  progress: Any = print, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Every scale measurement on one backend (library database and Dagster instance both SQLite, or both
    PostgreSQL)."""
    import uuid

    from ollama_pipeline.app.backfill import stop_group
    from ollama_pipeline.bench.backfill import start_webserver
    from ollama_pipeline.bench.harness import DEFAULT_PG_ADMIN_URL, PG_ADMIN_URL_ENV, _admin

    folder = workdir / kind
    folder.mkdir(parents=True)
    admin_url = os.environ.get(PG_ADMIN_URL_ENV, DEFAULT_PG_ADMIN_URL)
    library_db = f"ollama_scale_{uuid.uuid4().hex[:10]}" if kind == "postgres" else None
    db_url = admin_url.rsplit("/", 1)[0] + f"/{library_db}" if library_db else None
    result: dict[str, Any] = {"kind": kind, "items": items, "new_items": new_items, "run_items": run_items}
    if library_db:
        _admin(admin_url, f'CREATE DATABASE "{library_db}"')
    try:
        with EmulatorProcess(latency_ms=0, parallel=8, max_queue=4096) as emulator, \
                dagster_home(folder, kind) as home:
            config, result["build"] = build_million_library(folder, emulator.base_url, items, new_items, db_url,
                                                            progress)
            steps: dict[str, Any] = {}
            for name in ("prepare", "sensor", "plan", "run", "export"):
                if name in skip:
                    steps[name] = {"skipped": True}
                    continue
                started = time.perf_counter()
                extra = ("--run-items", str(run_items)) if name == "run" else ()
                steps[name] = run_step(name, config, home, items, new_items, extra=extra)
                progress(f"[scale] {kind} {name} ({time.perf_counter() - started:.0f} s): {steps[name]}")
            env = {**os.environ, CONFIG_ENV: str(config), "DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            proc, base = start_webserver(env, folder / "webserver.log", timeout=600)
            try:
                steps["backfill"] = run_step("backfill", config, home, items, new_items, extra=("--webserver", base))
                progress(f"[scale] {kind} backfill: {steps['backfill']}")
                try:
                    steps["browser"] = browser_timings(base, "ollama_caption", -(-items // 1000))
                except Exception as exc:  # noqa: BLE001 - reported in the table, the other figures stand
                    steps["browser"] = {"error": f"{type(exc).__name__}: {str(exc)[:3000]}"}
                progress(f"[scale] {kind} browser: {steps['browser']}")
            finally:
                stop_group(proc)
            result["steps"] = steps
    finally:
        if library_db:
            _admin(admin_url, f'DROP DATABASE IF EXISTS "{library_db}" WITH (FORCE)')
    s = result["steps"]
    browser = s.get("browser", {})
    result["table"] = [
        _row("sensor_tick_10k_new_rows_s", s["sensor"].get("seconds"),
             f"{s['sensor'].get('items_requested')} items in {s['sensor'].get('run_requests')} run request(s); "
             f"first tick of the process {s['sensor'].get('first_tick_in_process_s')} s"),
        _row("plan_run_over_all_items_s", s["plan"].get("seconds"),
             f"{s['plan'].get('items')} items, {s['plan'].get('partitions')} partitions"),
        _row("all_stage_run_10k_items_peak_rss_mb", s["run"].get("peak_rss_mb"),
             f"{s['run'].get('items')} items, run {s['run'].get('seconds')} s, ok={s['run'].get('ok')}"),
        _row("dagster_asset_page_warm_s", browser.get("asset_page", {}).get("median_s"), "median of 3"),
        _row("dagster_partitions_view_warm_s", browser.get("partitions_view", {}).get("median_s"),
             f"median of 3; bar: {browser.get('partition_bar')}"),
        _row("backfill_1pct_select_and_launch_s", s["backfill"].get("seconds"),
             f"{s['backfill'].get('items')} items selected"),
        _row("export_feed_peak_rss_mb", s["export"].get("peak_rss_mb"),
             f"{s['export'].get('items')} items in {s['export'].get('seconds')} s"),
    ]
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'backend':<9} {'items':>9}  {'target':<38} {'limit':>8} {'measured':>9}  result  note")
    for result in results:
        for row in result["table"]:
            measured = "-" if row["measured"] is None else f"{row['measured']:.2f}"
            print(f"{result['kind']:<9} {result['items']:>9,}  {row['target']:<38} {row['limit']:>6.0f} {row['unit']:<2}"
                  f"{measured:>8}  {'pass' if row['pass'] else 'FAIL':<6}  {row['note']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and "--step" not in argv:
        return probe_main(argv)
    parser = argparse.ArgumentParser(description="issue 13's scale targets on a generated library (make bench-scale)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--new-items", type=int, default=10_000, help="new rows: one sensor tick, the all-stage run")
    parser.add_argument("--run-items", type=int, default=None,
                        help="items of the all-stage run (default: all new items)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--skip", default="", help="steps to leave out, e.g. run,export")
    parser.add_argument("--postgres-items", type=int, default=None, help="a smaller library for PostgreSQL")
    parser.add_argument("--workdir", default=None, help="where the library is built (default: a temporary folder)")
    parser.add_argument("--out", default="bench_results/scale.json")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--webserver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        step = STEPS[args.step]
        extra: dict[str, Any] = ({"webserver": args.webserver} if args.step == "backfill"
                                 else {"run_items": args.run_items} if args.step == "run" else {})
        print(json.dumps(step(Path(args.config), args.items, args.new_items, **extra), sort_keys=True, default=str))
        return 0
    import shutil
    import tempfile

    report: dict[str, Any] = {"load_before": os.getloadavg(), "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ollama-scale-", dir=args.workdir))
    try:
        for kind in [k.strip() for k in args.backends.split(",") if k.strip()]:
            items = args.postgres_items if kind == "postgres" and args.postgres_items else args.items
            print(f"[scale] {kind}: {items:,} items, {args.new_items:,} new (load {os.getloadavg()[0]:.1f})")
            report["results"].append(bench_backend(kind, base, items, args.new_items,  # type: ignore[arg-type]
                                                   args.run_items or args.new_items,
                                                   skip=[k for k in args.skip.split(",") if k]))
            report["load_after"] = os.getloadavg()
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(report["results"])
    print("load average before: " + ", ".join(f"{v:.2f}" for v in report["load_before"])
          + "; after: " + ", ".join(f"{v:.2f}" for v in report.get("load_after", ())))
    print(f"JSON: {out}")
    return 0 if all(r["pass"] for res in report["results"] for r in res["table"]) else 1


if __name__ == "__main__":
    sys.exit(main())
