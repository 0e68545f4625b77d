"""The measurements of one bench scenario (stages × instance storage) and its baselines.

- main: ONE Dagster run over all N partitions for the selected stage assets (`materialize_stages`, what
  `ollama-pipeline run` and a single-run backfill do), after the `media` asset was indexed in a run of
  its own (reported as index_s, not part of the stage figures);
- rerun: the same run again on the unchanged library: it must make no model call;
- raw client loop (the floor): the same number of model calls, each with a prepared image, at the same
  concurrency, straight through `OllamaClient` with no Dagster and no database;
- per-item runs (the baseline the single run replaces): one Dagster run per media item on a sample,
  in process and through `dagster asset materialize` (a process per run, what the default run launcher
  does for each run), extrapolated to N items run one after another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from ollama_pipeline.bench.harness import EmulatorProcess, Stopwatch, dagster_home, peak_rss_mb
from ollama_pipeline.core.config import CONFIG_ENV, Settings
from ollama_pipeline.core.db.models import Media
from ollama_pipeline.core.images import prepare_image
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.core.stages.caption import CAPTION_TEMPLATE
from ollama_pipeline.defs.assets import LIBRARY_OP, MEDIA
from ollama_pipeline.defs.launch import materialize_stages, resolve_asset_names

BATCH_SIZE_ENV = "DAGSTER_EVENT_BATCH_SIZE"  # Dagster's own setting (off for the baseline)


class ScenarioResult(BaseModel):
    """The figures of one scenario; the JSON written by the bench is a list of these plus the run's context."""

    items: int
    stages: list[str]
    instance: str
    latency_ms: int
    parallel: int
    concurrency: int
    model_calls: int
    ideal_s: float
    wall_s: float
    ratio_to_ideal: float
    index_s: float
    raw_client_s: float
    raw_client_ratio_to_ideal: float
    ratio_to_raw_client: float
    per_item_run_in_process_s: float
    per_item_run_cli_s: float
    per_item_run_speedup: float
    per_item_in_process_speedup: float
    cpu_ms_per_item_stage: float
    raw_client_cpu_ms_per_call: float
    orchestration_cpu_ms_per_item_stage: float
    rerun_model_calls: int
    rerun_wall_s: float
    failed_items: int
    sent_image_bytes_mean: float
    source_image_bytes_mean: float
    peak_rss_mb: float
    event_batch_size: int
    dagster_version: str


def media_ids(settings: Settings) -> list[int]:
    pipeline = Pipeline.from_settings(settings)
    with pipeline.engine.connect() as conn:
        return list(conn.execute(select(Media.id).order_by(Media.id)).scalars())


def raw_client_loop(settings: Settings, calls: int, concurrency: int) -> tuple[float, float, float, float]:
    """`calls` caption-style requests (prepared image + JSON schema) at `concurrency`, no Dagster, no DB.

    Returns (wall s, cpu s, mean bytes sent per image, mean source file bytes)."""
    pipeline = Pipeline.from_settings(settings)
    stage = STAGES["ollama_caption"]
    options = pipeline.options_for(stage)
    with pipeline.engine.connect() as conn:
        paths = list(conn.execute(select(Media.path).order_by(Media.id)).scalars())
    sent: list[int] = []
    source: list[int] = []

    def one(index: int) -> None:
        image = prepare_image(settings.media_root, paths[index % len(paths)],
                              max_image_bytes=settings.ollama.max_image_bytes,
                              max_pixels=settings.pipeline.max_pixels)
        sent.append(image.sent_bytes)
        source.append(image.source_bytes)
        pipeline.client.analyze_image(image.b64, CAPTION_TEMPLATE.format(media=f"file {index}"), options)

    pipeline.client.health()  # the client exists before the clock starts, as in a run
    with Stopwatch() as watch, ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(calls)))
    return watch.wall, watch.cpu, sum(sent) / max(1, len(sent)), sum(source) / max(1, len(source))


def per_item_cli_run(home: Path, config_path: Path, asset_names: list[str], media_id: int,
                     partition_size: int) -> float:
    """Seconds for one `dagster asset materialize` of one item (forced; the item's partition, only that item),
    as a process per run."""
    env = {**os.environ, "DAGSTER_HOME": str(home), CONFIG_ENV: str(config_path)}
    run_config = json.dumps({"ops": {LIBRARY_OP: {"config": {"force": True, "media_ids": [media_id]}}}})
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m",
                             "ollama_pipeline.definitions", "--select", ",".join(asset_names),
                             "--partition", Partitioning(size=partition_size).key_of(media_id),
                             "--config-json", run_config],
                            env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"per-item CLI run for media {media_id} failed: {tail}")
    return elapsed


def run_scenario(settings: Settings, config_path: Path, emulator: EmulatorProcess, workdir: Path, *,
                 stages: list[str] | None, instance_kind: str, latency_ms: int, parallel: int,
                 concurrency: int, per_item_sample: int, cli_sample: int,
                 progress: Any = print) -> ScenarioResult:
    """Index media, one run over every item for the stages, the re-run, and the baselines.

    instance_kind: sqlite (as shipped), postgres (as documented), sqlite-dagster (Dagster's own SQLite
    event storage with event batching off: the baseline for the shipped settings)."""

    ids = media_ids(settings)
    names = resolve_asset_names(stages, include_media=False)
    plain = instance_kind == "sqlite-dagster"  # the baseline: Dagster's own storage, no event batches
    saved_batch = os.environ.get(BATCH_SIZE_ENV)
    if plain:
        os.environ[BATCH_SIZE_ENV] = "0"
    try:
        return _run_scenario(settings, config_path, emulator, workdir, ids=ids, names=names, plain=plain,
                             instance_kind=instance_kind, latency_ms=latency_ms, parallel=parallel,
                             concurrency=concurrency, per_item_sample=per_item_sample, cli_sample=cli_sample,
                             progress=progress)
    finally:
        if saved_batch is None:
            os.environ.pop(BATCH_SIZE_ENV, None)
        else:
            os.environ[BATCH_SIZE_ENV] = saved_batch


def _run_scenario(settings: Settings, config_path: Path, emulator: EmulatorProcess, workdir: Path, *,
                  ids: list[int], names: list[str], plain: bool, instance_kind: str, latency_ms: int,
                  parallel: int, concurrency: int, per_item_sample: int, cli_sample: int,
                  progress: Any) -> ScenarioResult:
    from dagster import DagsterInstance, __version__

    with dagster_home(workdir, "postgres" if instance_kind == "postgres" else "sqlite", plain=plain) as home:
        instance = DagsterInstance.from_config(str(home))
        try:
            progress(f"[{instance_kind}] indexing {len(ids)} media files (media asset, one run)")
            with Stopwatch() as index_watch:
                materialize_stages(settings, ids, [MEDIA], instance, include_media=True, log_level="WARNING")
            calls0 = emulator.calls()
            progress(f"[{instance_kind}] one Dagster run: {len(ids)} items x {len(names)} stage(s)")
            with Stopwatch() as main:
                summary = materialize_stages(settings, ids, names, instance, include_media=False,
                                             concurrency=concurrency, log_level="WARNING")
            model_calls = emulator.calls() - calls0
            failed = sum(c.get("failed", 0) for c in summary.counts.values())
            progress(f"[{instance_kind}] {model_calls} model calls in {main.wall:.1f} s; re-run (unchanged)")
            calls1 = emulator.calls()
            with Stopwatch() as rerun:
                materialize_stages(settings, ids, names, instance, include_media=False, concurrency=concurrency,
                                   log_level="WARNING")
            rerun_calls = emulator.calls() - calls1
            sample = ids[: max(1, per_item_sample)]
            progress(f"[{instance_kind}] {len(sample)} per-item runs in process, {cli_sample} through the CLI")
            per_item: list[float] = []
            for media_id in sample:
                started = time.perf_counter()
                materialize_stages(settings, [media_id], names, instance, include_media=False, force=True,
                                   concurrency=concurrency, log_level="WARNING")
                per_item.append(time.perf_counter() - started)
            cli_times = [per_item_cli_run(home, config_path, names, media_id, settings.pipeline.partition_size)
                         for media_id in ids[len(sample): len(sample) + cli_sample]]
        finally:
            instance.dispose()
    progress(f"[{instance_kind}] raw client loop: {model_calls} calls at concurrency {concurrency}")
    raw_wall, raw_cpu, sent_mean, source_mean = raw_client_loop(settings, max(1, model_calls), concurrency)
    ideal = model_calls * latency_ms / 1000.0 / parallel
    item_stages = max(1, len(ids) * len(names))
    raw_cpu_per_call = raw_cpu / max(1, model_calls)
    per_item_s = sum(per_item) / len(per_item)
    per_item_cli_s = sum(cli_times) / len(cli_times) if cli_times else 0.0
    return ScenarioResult(
        items=len(ids), stages=names, instance=instance_kind, latency_ms=latency_ms, parallel=parallel,
        concurrency=concurrency, model_calls=model_calls, ideal_s=round(ideal, 3), wall_s=round(main.wall, 3),
        ratio_to_ideal=round(ideal / main.wall, 3) if main.wall else 0.0, index_s=round(index_watch.wall, 3),
        raw_client_s=round(raw_wall, 3), raw_client_ratio_to_ideal=round(ideal / raw_wall, 3) if raw_wall else 0.0,
        ratio_to_raw_client=round(raw_wall / main.wall, 3) if main.wall else 0.0,
        per_item_run_in_process_s=round(per_item_s, 3), per_item_run_cli_s=round(per_item_cli_s, 3),
        per_item_run_speedup=round(per_item_cli_s * len(ids) / main.wall, 1) if cli_times else 0.0,
        per_item_in_process_speedup=round(per_item_s * len(ids) / main.wall, 1),
        cpu_ms_per_item_stage=round(main.cpu * 1000 / item_stages, 3),
        raw_client_cpu_ms_per_call=round(raw_cpu_per_call * 1000, 3),
        orchestration_cpu_ms_per_item_stage=round(max(0.0, main.cpu - raw_cpu_per_call * model_calls) * 1000
                                                  / item_stages, 3),
        rerun_model_calls=rerun_calls, rerun_wall_s=round(rerun.wall, 3), failed_items=failed,
        sent_image_bytes_mean=round(sent_mean), source_image_bytes_mean=round(source_mean),
        peak_rss_mb=round(peak_rss_mb(), 1), event_batch_size=int(os.environ.get("DAGSTER_EVENT_BATCH_SIZE", "0")),
        dagster_version=__version__)
