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
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from ollama_pipeline.bench.harness import (
    EmulatorProcess,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one scale probe (started by `ollama-pipeline bench --scale-check`)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--slice", type=int, default=200)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(probe(Path(args.config), args.slice, Path(args.workdir)), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
