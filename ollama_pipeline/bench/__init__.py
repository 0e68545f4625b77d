"""`ollama-pipeline bench` (`make bench`): throughput through Dagster against the model server's limit.

Builds a library of `--items` small images, starts the emulator with `--latency-ms L --parallel P` in its
own process, and for every scenario (stage selection × Dagster instance storage) measures one Dagster run
over all items against the ideal `calls × L / P`, the raw client loop at the same concurrency, per-item
runs on a sample, the CPU the pipeline spends per item and stage, and the unchanged re-run. Prints a table
and writes JSON (`--out`). `--scale-check` adds the library-scale probe (sensor ticks and a run over a slice
at 1,000 and at `--scale-items` media rows, each in a fresh process). See README "Throughput".
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ollama_pipeline.bench.gpu import GpuRow, gpu_bench, render_gpu_table
from ollama_pipeline.bench.harness import EmulatorProcess, bench_config, copy_sqlite_library, write_config
from ollama_pipeline.bench.measure import ScenarioResult, run_scenario
from ollama_pipeline.core.config import settings_from_dict

DEFAULT_OUT = Path("bench_results") / "bench.json"


class BenchReport(BaseModel):
    """What `ollama-pipeline bench` writes: the context of the run and one entry per scenario."""

    started_at: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    scenarios: list[ScenarioResult] = Field(default_factory=list)
    scale: dict[str, Any] | None = None
    images: dict[str, Any] | None = None
    gpu: list[GpuRow] = Field(default_factory=list)


def _machine() -> dict[str, Any]:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform(terse=True)}


def _scenarios(stages: str, instance: str) -> list[tuple[list[str] | None, str]]:
    selections: list[list[str] | None] = []
    if stages.strip() == "none":  # e.g. only --scale-check
        return []
    for part in stages.split(";"):
        part = part.strip()
        selections.append(None if part == "all" else [s.strip() for s in part.split(",") if s.strip()])
    kinds = {"both": ["sqlite", "postgres"], "all": ["sqlite-dagster", "sqlite", "postgres"]}.get(instance, [instance])
    return [(sel, kind) for sel in selections for kind in kinds]


def render_table(report: BenchReport) -> str:
    head = (f"{'stages':<10} {'instance':<14} {'items':>6} {'calls':>6} {'ideal s':>8} {'wall s':>8} {'ideal/wall':>10} "
            f"{'raw s':>7} {'per-item x':>10} {'cpu ms':>7} {'orch ms':>8} {'rerun':>6} {'rss MB':>7}")
    lines = [head, "-" * len(head)]
    for s in report.scenarios:
        label = "all" if len(s.stages) == 8 else ",".join(x.removeprefix("ollama_") for x in s.stages)
        lines.append(f"{label:<10} {s.instance:<14} {s.items:>6} {s.model_calls:>6} {s.ideal_s:>8.1f} {s.wall_s:>8.1f} "
                     f"{s.ratio_to_ideal:>10.2f} {s.raw_client_s:>7.1f} {s.per_item_run_speedup:>10.1f} "
                     f"{s.cpu_ms_per_item_stage:>7.2f} {s.orchestration_cpu_ms_per_item_stage:>8.2f} "
                     f"{s.rerun_model_calls:>6} {s.peak_rss_mb:>7.0f}")
    if report.gpu:
        lines.append("")
        lines.append("GPU time (modeled seconds on emulated GPUs; see README \"GPU-time benchmark\")")
        lines.append(render_gpu_table(report.gpu))
    if report.images:
        i = report.images
        lines.append("")
        lines.append(f"images {i['side_px']} px: {i['source_bytes_mean']:,} B as file vs {i['sent_bytes_mean']:,} B "
                     f"prepared ({i['bytes_ratio']}x fewer); {i['original_ms_per_call']} vs "
                     f"{i['prepared_ms_per_call']} ms per call in the pipeline (preparation included)")
    if report.scale:
        lines.append("")
        lines.append("scale: " + json.dumps(report.scale, sort_keys=True))
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> BenchReport:
    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.core.db.engine import init_db, make_engine

    workdir = Path(tempfile.mkdtemp(prefix="ollama_bench_"))
    concurrency = args.concurrency or args.parallel
    report = BenchReport(started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=_machine(),
                         settings={"items": args.items, "latency_ms": args.latency_ms, "parallel": args.parallel,
                                   "concurrency": concurrency, "stages": args.stages, "instance": args.instance,
                                   "per_item_sample": args.per_item_sample, "cli_sample": args.cli_sample})
    try:
        if args.gpu:
            profiles = tuple(p.strip() for p in args.gpu_profiles.split(",") if p.strip())
            print(f"GPU time: {args.gpu_items} items, profiles {', '.join(profiles)}, time scale {args.gpu_time_scale}")
            gpu_dir = workdir / "gpu"
            gpu_dir.mkdir()
            report.gpu = gpu_bench(gpu_dir, items=args.gpu_items, time_scale=args.gpu_time_scale,
                                   concurrency=concurrency, profiles=profiles)
            save(report, Path(args.out))
        with EmulatorProcess(latency_ms=args.latency_ms, parallel=args.parallel) as emulator:
            base = bench_config(workdir, emulator.base_url, concurrency=concurrency)
            base_db = workdir / "library.base.db"
            engine = make_engine(f"sqlite:///{base_db}")
            init_db(engine)
            started = time.perf_counter()
            add_media_rows(engine, workdir / "media", args.items)
            engine.dispose()
            print(f"library: {args.items} media items built in {time.perf_counter() - started:.1f} s")
            for number, (stages, kind) in enumerate(_scenarios(args.stages, args.instance)):
                lib = workdir / f"library.{number}.db"
                copy_sqlite_library(base_db, lib)
                data = {**base, "database": {**base["database"], "url": f"sqlite:///{lib}"}}
                config_path = write_config(workdir / f"config.{number}.yaml", data)
                settings = settings_from_dict(data)
                result = run_scenario(settings, config_path, emulator, workdir, stages=stages, instance_kind=kind,
                                      latency_ms=args.latency_ms, parallel=args.parallel, concurrency=concurrency,
                                      per_item_sample=args.per_item_sample, cli_sample=args.cli_sample)
                report.scenarios.append(result)
                save(report, Path(args.out))
                print(f"  -> ideal/wall {result.ratio_to_ideal:.2f}, per-item speedup {result.per_item_run_speedup}x, "
                      f"orchestration {result.orchestration_cpu_ms_per_item_stage:.2f} ms CPU per item and stage, "
                      f"re-run calls {result.rerun_model_calls}")
        if args.image_check:
            from ollama_pipeline.bench.images import image_effect

            print(f"images: {args.image_count} PNGs of {args.image_side} px, original vs prepared")
            report.images = image_effect(workdir, count=args.image_count, side=args.image_side)
            save(report, Path(args.out))
        if args.scale_check:
            from ollama_pipeline.bench.scale import scale_check

            report.scale = scale_check(workdir, small=args.items, large=args.scale_items, slice_items=args.slice_items,
                                       latency_ms=args.latency_ms, parallel=args.parallel)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def save(report: BenchReport, out: Path) -> None:
    """Write the JSON (after every scenario, so a long bench that is stopped keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=2) + "\n")


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    started, load_before = time.perf_counter(), os.getloadavg()
    report = run_bench(args)
    report.machine.update(duration_s=round(time.perf_counter() - started, 1),
                          load_before=[round(x, 2) for x in load_before],
                          load_after=[round(x, 2) for x in os.getloadavg()])
    out = Path(args.out)
    save(report, out)
    print()
    print(render_table(report))
    m = report.machine
    print(f"\nbench took {m['duration_s'] / 60:.1f} min; load average (1, 5, 15 min) before {m['load_before']}, "
          f"after {m['load_after']} on {m['cpus']} cores")
    print(f"written: {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=500,
                   help="media items in the bench library (default 500: the default run fits in 30 minutes on 2 "
                        "shared cores)")
    p.add_argument("--stages", default="caption;all",
                   help="stage selections separated by ';', each 'all' or stage names with commas, or 'none' "
                        "(default 'caption;all')")
    p.add_argument("--instance", choices=["sqlite", "postgres", "sqlite-dagster", "both", "all"], default="sqlite",
                   help="Dagster instance storage: sqlite (as shipped), postgres (as documented), sqlite-dagster "
                        "(Dagster's own storage, no event batches: the baseline); both = sqlite + postgres, "
                        "all = the three (default sqlite)")
    p.add_argument("--latency-ms", type=int, default=200, help="emulator time per model call (default 200)")
    p.add_argument("--parallel", type=int, default=4, help="emulator calls served at once (default 4)")
    p.add_argument("--concurrency", type=int, default=None, help="model calls at once in a run (default --parallel)")
    p.add_argument("--per-item-sample", type=int, default=5, help="per-item runs in process (default 5)")
    p.add_argument("--cli-sample", type=int, default=2, help="per-item runs through the dagster CLI (default 2)")
    p.add_argument("--no-image-check", dest="image_check", action="store_false",
                   help="skip the large-image measurement (original file vs downscaled)")
    p.add_argument("--image-count", type=int, default=4)
    p.add_argument("--image-side", type=int, default=4096)
    p.add_argument("--scale-check", action="store_true", help="also probe memory and sensor time at --scale-items")
    p.add_argument("--scale-items", type=int, default=100_000)
    p.add_argument("--slice-items", type=int, default=200, help="items of the run over a slice in the scale probe")
    p.add_argument("--no-gpu", dest="gpu", action="store_false", help="skip the GPU-time scenarios")
    p.add_argument("--gpu-items", type=int, default=24, help="items of the GPU-time scenarios (default 24)")
    p.add_argument("--gpu-time-scale", type=float, default=20.0,
                   help="the emulated GPUs run this many times faster than real time (default 20)")
    p.add_argument("--gpu-profiles", default="rtx3090,rtx4060-8g",
                   help="emulator host profiles of the GPU-time scenarios (default rtx3090,rtx4060-8g)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="throughput through Dagster vs the model server's limit (make bench)")
    add_arguments(p)
    p.set_defaults(handler=_cmd_bench)
