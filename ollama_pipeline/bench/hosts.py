"""Request shaping and several hosts, in modeled GPU time (issue 15): `python -m ollama_pipeline.bench.hosts`.

Scenarios, each on a fresh copy of one library and fresh emulator processes with a cost profile:

- `shaping`: one Dagster run (the `ollama_library` step, in process, Dagster's own SQLite storage) over all
  items and the chosen stages, with `pipeline.combine_vision_stages` off and on: model calls per item,
  prompt tokens served from the prefix cache, image tokens prefilled, loads and reloads, GPU busy seconds,
  and wall (modeled: wall × time scale) against the work's lower bound on that host.
- `hosts`: the same work item by item (`run_stages`) on N = 1, 2 and 4 emulator processes (`ollama.hosts`),
  throughput against N × one host's; then 4 hosts with one killed (SIGKILL) at half of the calls: every
  item·stage written once, and what the dead host lost.

Orchestration CPU (one host): this process's CPU seconds during the run (every thread; the emulators are
other processes) against the modeled GPU seconds (target ≤ 2 %), and per item·stage beyond the raw
client's CPU per call (a loop of prepared-image calls through `OllamaClient`, no database: measure.py's
`raw_client_loop`), against that raw CPU per call (target ≤ 1.0 ×).

The lower bound of the work on one host: every distinct image prefilled once per model, the output
tokens decoded once, one load per model, all slots busy. Timing belongs here, never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from ollama_pipeline.bench.gpu import lower_bound
from ollama_pipeline.bench.harness import EmulatorProcess, bench_config, copy_sqlite_library, dagster_home
from ollama_pipeline.core.config import settings_from_dict

ALL_STAGES = ("ollama_caption", "ollama_title", "ollama_tags_normalize", "ollama_quality", "ollama_duplicate_assist",
              "ollama_prompt_recon", "ollama_score_multi", "ollama_policy_flags")


def _library(workdir: Path, items: int) -> tuple[Path, list[int]]:
    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.core.db.engine import init_db, make_engine

    base = workdir / "hosts.base.db"
    engine = make_engine(f"sqlite:///{base}")
    init_db(engine)
    ids = sorted(add_media_rows(engine, workdir / "media", items).media_ids)
    engine.dispose()
    return base, ids


def _settings(workdir: Path, db: Path, urls: list[str], *, slots: int, combine: bool = False) -> Any:
    data = bench_config(workdir, urls[0], concurrency=slots)
    data["database"]["url"] = f"sqlite:///{db}"
    data["logs_dir"] = str(db.with_suffix(".logs"))  # one jobs log per run: written-once is counted per run
    data["ollama"]["timeout_ms"] = 600_000
    data["pipeline"]["combine_vision_stages"] = combine
    if len(urls) > 1:
        data["ollama"]["hosts"] = [{"base_url": u, "parallel": slots} for u in urls]
    return settings_from_dict(data)


def _figures(stats: dict[str, Any], items: int, wall: float, scale: float, bound: float) -> dict[str, Any]:
    gpu = stats["gpu_s"]
    return {"calls": stats["model_calls"], "calls_per_item": round(stats["model_calls"] / items, 2),
            "cache_hit_rate": round(stats["cached_tokens"] / max(1, stats["prompt_tokens"]), 3),
            "image_tokens": stats["image_tokens"], "image_tokens_cached": stats["image_tokens_cached"],
            "prompt_tokens": stats["prompt_tokens"], "output_tokens": stats["output_tokens"],
            "loads": stats["loads"], "reloads": stats["reloads"], "evictions": stats["evictions"],
            "gpu_busy_s": round(gpu["busy_s"], 1), "load_s": round(gpu["load_s"], 1),
            "wall_s": round(wall * scale, 1), "bound_s": round(bound, 1),
            "wall_to_bound": round(wall * scale / bound, 2) if bound else None,
            "gpu_to_bound": round((gpu["busy_s"] + gpu["load_s"]) / bound, 2) if bound else None,
            "load1": round(os.getloadavg()[0], 1)}


def shaping(workdir: Path, *, items: int, profile: str, scale: float, stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """One Dagster run per setting of combine_vision_stages."""
    from dagster import DagsterInstance

    from ollama_pipeline.defs.launch import materialize_stages

    base, ids = _library(workdir, items)
    rows = []
    for combine in (False, True):
        db = workdir / f"shaping.{combine}.db"
        copy_sqlite_library(base, db)
        with EmulatorProcess(profile=profile, time_scale=scale) as emulator, dagster_home(workdir, "sqlite") as home:
            info = httpx.get(f"{emulator.base_url}/_emulator/profile", timeout=10).json()
            slots = max(1, int(info.get("num_parallel") or 4))
            settings = _settings(workdir, db, [emulator.base_url], slots=slots, combine=combine)
            with DagsterInstance.from_config(str(home)) as instance:
                started, cpu = time.perf_counter(), time.process_time()
                summary = materialize_stages(settings, None, list(stages), instance, log_level="WARNING")
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            stats = emulator.stats()
        row = {"scenario": "shaping", "profile": profile, "combine_vision_stages": combine, "items": items,
               "stages": len(stages), "all_ok": summary.all_items_ok,
               **_figures(stats, items, wall, scale, lower_bound(stats, info)),
               "cpu_s": round(cpu, 1), "cpu_to_gpu_busy": round(cpu / max(1e-9, stats["gpu_s"]["busy_s"]), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _run_on(workdir: Path, base: Path, ids: list[int], n: int, *, profile: str, scale: float, stages: tuple[str, ...],
            kill_at_half: bool = False) -> dict[str, Any]:
    from ollama_pipeline.core.runner import Pipeline, run_stages
    from ollama_pipeline.core.stages import get_stage

    db = workdir / f"hosts.{n}.{kill_at_half}.db"
    copy_sqlite_library(base, db)
    hosts = [EmulatorProcess(profile=profile, time_scale=scale).__enter__() for _ in range(n)]
    try:
        info = httpx.get(f"{hosts[0].base_url}/_emulator/profile", timeout=10).json()
        slots = max(1, int(info.get("num_parallel") or 4))
        settings = _settings(workdir, db, [h.base_url for h in hosts], slots=slots)
        pipeline = Pipeline.from_settings(settings)
        expected = len(ids) * len(stages)
        killer = None
        if kill_at_half:
            def kill() -> None:
                while sum(r["ok"] for r in pipeline.client.host_stats()) < expected // 2:
                    time.sleep(0.05)
                assert hosts[-1].proc is not None
                hosts[-1].proc.kill()
            killer = threading.Thread(target=kill, daemon=True)
            killer.start()
        for stage in {get_stage(j).model_kind: get_stage(j) for j in stages}.values():
            pipeline.warm_up(stage)  # loads every model on every host before the clock starts
        started, cpu = time.perf_counter(), time.process_time()
        outcomes = list(run_stages(pipeline, stages, ids))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        per_host = pipeline.client.host_stats()
        stats = [h.stats() if h.proc is not None and h.proc.poll() is None else None for h in hosts]
        bound = lower_bound(stats[0], info) - sum(info["models"][m]["rates"][2] for m in stats[0]["models"]
                                                 if stats[0]["models"][m].get("requests")) if n == 1 else None
        written = Counter((o.stage, o.media_id) for o in outcomes if o.status == "written")
        log = settings.logs_dir / "ollama_jobs.jsonl"
        succeeded = Counter((e["job_type"], e["media_id"]) for e in map(json.loads, log.read_text().splitlines())
                            if e.get("event") == "stage_succeeded" and e.get("run_id") is None)
        pipeline.client.close()
        cpu_row: dict[str, Any] = {}
        if n == 1 and stats[0] is not None:
            from ollama_pipeline.bench.measure import raw_client_loop

            calls = sum(r["ok"] for r in per_host)
            sample = min(calls, 256)
            _, raw_cpu, _, _ = raw_client_loop(settings, sample, slots)
            raw_per_call = raw_cpu / max(1, sample)
            orchestration = max(0.0, cpu - raw_per_call * calls) / expected
            cpu_row = {"cpu_s": round(cpu, 1),
                       "cpu_to_gpu_busy": round(cpu / max(1e-9, stats[0]["gpu_s"]["busy_s"]), 4),
                       "raw_client_cpu_ms_per_call": round(raw_per_call * 1000, 2),
                       "orchestration_cpu_ms_per_item_stage": round(orchestration * 1000, 2),
                       "orchestration_to_raw_per_call": round(orchestration / max(1e-9, raw_per_call), 2)}
    finally:
        for h in hosts:
            h.__exit__()
    modeled_busy = [round(s["gpu_s"]["busy_s"], 1) if s else None for s in stats]
    return {"scenario": "hosts", "profile": profile, "hosts": n, "killed_one": kill_at_half, "items": len(ids),
            "stages": len(stages), "wall_s": round(wall * scale, 1),
            "bound_s": round(bound, 1) if bound else None,  # one host, models loaded before the clock
            "wall_to_bound": round(wall * scale / bound, 2) if bound else None,
            "item_stages_per_modeled_s": round(expected / (wall * scale), 3), "written": sum(written.values()),
            "expected": expected, "written_once": all(v == 1 for v in succeeded.values()) and len(succeeded) == expected,
            "calls_per_host": [r["ok"] for r in per_host], "failed_per_host": [r["failed"] for r in per_host],
            "most_at_once": [s["max_inflight_seen"] if s else None for s in stats], "gpu_busy_s": modeled_busy,
            **cpu_row, "load1": round(os.getloadavg()[0], 1)}


def several_hosts(workdir: Path, *, items: int, profile: str, scale: float, stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """N = 1, 2, 4 hosts, then 4 with one killed at half time; throughput ratios against one host."""
    base, ids = _library(workdir, items)
    rows = []
    one = None
    for n, kill in ((1, False), (2, False), (4, False), (4, True)):
        row = _run_on(workdir, base, ids, n, profile=profile, scale=scale, stages=stages, kill_at_half=kill)
        one = one or row["item_stages_per_modeled_s"]
        row["throughput_vs_n_times_one"] = round(row["item_stages_per_modeled_s"] / (n * one), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_pipeline.bench.hosts", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["shaping", "hosts", "all"], default="all")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--profile", default="rtx3090-parallel4")
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--stages", default=",".join(ALL_STAGES), help="job types, comma-separated")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    workdir = Path(tempfile.mkdtemp(prefix="ollama-bench-hosts-"))
    try:
        rows: list[dict[str, Any]] = []
        if args.scenario in ("shaping", "all"):
            rows += shaping(workdir, items=args.items, profile=args.profile, scale=args.time_scale, stages=stages)
        if args.scenario in ("hosts", "all"):
            rows += several_hosts(workdir, items=args.items, profile=args.profile, scale=args.time_scale, stages=stages)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
