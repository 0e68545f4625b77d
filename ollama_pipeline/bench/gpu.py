"""The bench in GPU time: the pipeline's request pattern against the work's lower bound on emulated GPUs.

For each host profile (an emulated Ollama with a cost model, `emulator/profiles.py`) and each request
pattern, one emulator process serves a library of items at `--gpu-time-scale`; the emulator's counters give
the modeled GPU time. Patterns:

- `pipeline`: today's pipeline, every stage over all items (core runner, stage after stage, the configured
  concurrency; no Dagster, whose cost the throughput scenarios measure);
- `peer`: a common pattern of other tools — one call per output field, the image re-sent with each call,
  the stages of an item interleaved (vision and text models alternate).

The lower bound of the work: every distinct image prefilled once per model, every output token the
pipeline's answers needed decoded once, one load per model, the host's slots busy all the time, no reloads.
Columns (see README "GPU-time benchmark"): wall (modeled: wall × time scale), lower bound, their ratios,
GPU busy (prefill + decode), load, reloads + evictions, prefix-cache hits (calls) and hit rate (tokens),
image tokens prefilled vs distinct, idle slot time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from ollama_pipeline.bench.harness import EmulatorProcess, bench_config, copy_sqlite_library
from ollama_pipeline.core.config import settings_from_dict

DEFAULT_PROFILES = ("rtx3090", "rtx4060-8g")
PATTERNS = ("pipeline", "peer")


class GpuRow(BaseModel):
    """One pattern on one host profile, in modeled seconds."""

    profile: str
    pattern: str
    items: int
    calls: int
    failed_calls: int
    wall_s: float
    lower_bound_s: float
    wall_to_bound: float
    gpu_to_bound: float  # (busy + load) / bound: GPU time spent against the least the work needs
    gpu_busy_s: float
    load_s: float
    loads: int
    reloads: int
    evictions: int
    cache_hits: int  # calls that reused a prefix of their slot's previous prompt
    cache_hit_rate: float  # cached prompt tokens / prompt tokens
    image_tokens_prefilled: int
    image_tokens_distinct: int
    idle_slot_s: float
    machine_load: float  # 1-minute load average at the end of the row (2 cores here)


def _settings(workdir: Path, base_url: str, db: Path, concurrency: int) -> Any:
    data = bench_config(workdir, base_url, concurrency=concurrency)
    data["database"]["url"] = f"sqlite:///{db}"
    data["ollama"]["timeout_ms"] = 600_000
    return settings_from_dict(data)


def _run_pipeline(settings: Any, ids: list[int]) -> int:
    from ollama_pipeline.core.runner import Pipeline, run_stage
    from ollama_pipeline.core.stages import STAGES
    from ollama_pipeline.defs.assets import index_media

    pipeline = Pipeline.from_settings(settings)
    list(index_media(pipeline, ids))
    failed = 0
    for job in STAGES:  # the registry's order: every stage's upstream comes first
        failed += sum(1 for o in run_stage(pipeline, job, ids) if o.status == "failed")
    pipeline.client.close()
    return failed


def _run_peer(settings: Any, ids: list[int], concurrency: int) -> int:
    """One call per output field, the image with every call, an item's stages interleaved."""
    from sqlalchemy import text

    from ollama_pipeline.core.client import OllamaClient, OllamaOptions
    from ollama_pipeline.core.db.engine import make_engine
    from ollama_pipeline.core.images import prepare_image
    from ollama_pipeline.core.stages import STAGES

    client = OllamaClient(settings.ollama, default_slots=concurrency)
    engine = make_engine(settings.database.url)
    with engine.connect() as conn:
        paths = dict(conn.execute(text("SELECT id, path FROM media")).all())
    engine.dispose()
    failed = 0
    lock = threading.Lock()

    def item(media_id: int) -> None:
        nonlocal failed
        image = prepare_image(settings.media_root, paths[media_id], max_image_bytes=settings.ollama.max_image_bytes,
                              max_pixels=1_000_000).b64
        for job, stage in STAGES.items():
            model = settings.ollama.model_for(stage.model_kind)
            for field, sub in (stage.schema.get("properties") or {}).items():
                schema = {"type": "object", "properties": {field: sub}, "required": [field],
                          **({"$defs": stage.schema["$defs"]} if "$defs" in stage.schema else {})}
                options = OllamaOptions(model=model, format=schema, think=False)
                prompt = f"{stage.title}: give only `{field}` for media item {media_id} as JSON."
                try:
                    if stage.model_kind == "vision":
                        client.analyze_image(image, prompt, options, affinity=str(media_id))
                    else:
                        client.generate_text(prompt, options, affinity=str(media_id))
                except Exception:  # a failed call is counted, the pattern goes on as a peer tool would
                    with lock:
                        failed += 1
            del job

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(item, ids))
    client.close()
    return failed


def lower_bound(stats: dict[str, Any], profile: dict[str, Any]) -> float:
    """Modeled seconds the work needs at least on one host: distinct images prefilled once per model, the needed
    output (thinking excluded) decoded once, one load per model, all of its slots busy."""
    total = 0.0
    for name, row in stats["models"].items():
        info = profile["models"].get(name)
        if info is None or not row.get("requests"):
            continue
        prefill_tps, decode_tps, load_s = info["rates"]
        slots = max(1, info["parallel"])
        if profile.get("flat_latency_ms") is not None:
            total += row["requests"] * profile["flat_latency_ms"] / 1000.0 / slots
            continue
        needed_output = row["output_tokens"] - row["thinking_tokens"]
        total += load_s + (row["distinct_image_tokens"] / prefill_tps + needed_output / decode_tps) / slots
    return total


def _row(profile: str, pattern: str, items: int, wall: float, scale: float, stats: dict[str, Any],
         bound: float, failed: int) -> GpuRow:
    import os

    gpu = stats["gpu_s"]
    prompt = max(1, stats["prompt_tokens"])
    wall_model = wall * scale
    return GpuRow(profile=profile, pattern=pattern, items=items, calls=stats["model_calls"], failed_calls=failed,
                  wall_s=round(wall_model, 1), lower_bound_s=round(bound, 1),
                  wall_to_bound=round(wall_model / bound, 2) if bound else 0.0,
                  gpu_to_bound=round((gpu["busy_s"] + gpu["load_s"]) / bound, 2) if bound else 0.0,
                  gpu_busy_s=round(gpu["busy_s"], 1), load_s=round(gpu["load_s"], 1), loads=stats["loads"],
                  reloads=stats["reloads"], evictions=stats["evictions"],
                  cache_hits=stats["cache_hits"], cache_hit_rate=round(stats["cached_tokens"] / prompt, 3),
                  image_tokens_prefilled=stats["image_tokens"] - stats["image_tokens_cached"],
                  image_tokens_distinct=stats["distinct_image_tokens"], idle_slot_s=round(gpu["idle_slot_s"], 1),
                  machine_load=round(os.getloadavg()[0], 2))


def gpu_bench(workdir: Path, *, items: int, time_scale: float, concurrency: int = 4,
              profiles: tuple[str, ...] = DEFAULT_PROFILES, patterns: tuple[str, ...] = PATTERNS) -> list[GpuRow]:
    """Every pattern on every profile, each on a fresh copy of one library and a fresh emulator process."""
    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.core.db.engine import init_db, make_engine

    base_db = workdir / "gpu.base.db"
    engine = make_engine(f"sqlite:///{base_db}")
    init_db(engine)
    ids = sorted(add_media_rows(engine, workdir / "media", items).media_ids)
    engine.dispose()
    rows: list[GpuRow] = []
    for profile in profiles:
        bound = 0.0
        for pattern in patterns:
            db = workdir / f"gpu.{profile}.{pattern}.db"
            copy_sqlite_library(base_db, db)
            with EmulatorProcess(profile=profile, time_scale=time_scale) as emulator:
                settings = _settings(workdir, emulator.base_url, db, concurrency)
                info = httpx.get(f"{emulator.base_url}/_emulator/profile", timeout=10).json()
                started = time.perf_counter()
                failed = _run_pipeline(settings, ids) if pattern == "pipeline" else _run_peer(settings, ids, concurrency)
                wall = time.perf_counter() - started
                stats = emulator.stats()
            if pattern == "pipeline" or not bound:
                bound = lower_bound(stats, info)  # the work is the pipeline's; the peer does the same work
            rows.append(_row(profile, pattern, items, wall, time_scale, stats, bound, failed))
            r = rows[-1]
            print(f"  gpu {profile:<12} {pattern:<9} wall {r.wall_s:>8.1f} s  bound {r.lower_bound_s:>8.1f} s  "
                  f"x{r.wall_to_bound:<5}  busy {r.gpu_busy_s:>8.1f} s  reloads {r.reloads}  cache {r.cache_hit_rate}",
                  flush=True)
    return rows


def render_gpu_table(rows: list[GpuRow]) -> str:
    head = (f"{'profile':<12} {'pattern':<9} {'calls':>6} {'fail':>5} {'wall s':>8} {'bound s':>8} {'wall/bnd':>8} "
            f"{'gpu/bnd':>7} "
            f"{'busy s':>8} {'load s':>7} {'reload':>6} {'evict':>5} {'hits':>5} {'cache':>6} {'img tok':>9} {'distinct':>9} "
            f"{'idle s':>8} {'load1':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.profile:<12} {r.pattern:<9} {r.calls:>6} {r.failed_calls:>5} {r.wall_s:>8.1f} "
                     f"{r.lower_bound_s:>8.1f} {r.wall_to_bound:>8.2f} {r.gpu_to_bound:>7.2f} {r.gpu_busy_s:>8.1f} "
                     f"{r.load_s:>7.1f} "
                     f"{r.reloads:>6} {r.evictions:>5} {r.cache_hits:>5} {r.cache_hit_rate:>6.3f} {r.image_tokens_prefilled:>9} "
                     f"{r.image_tokens_distinct:>9} {r.idle_slot_s:>8.1f} {r.machine_load:>6.2f}")
    return "\n".join(lines)
