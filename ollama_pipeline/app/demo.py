"""`make demo`: a demo library in SQLite, the emulator when no real Ollama is configured, every stage
materialized through Dagster, then the export feed and the report (`ollama_export`, `ollama_report`)
materialized through Dagster too, and a summary of where the results are."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pydantic
import yaml
from sqlalchemy import Engine, select

from ollama_pipeline.core.config import CONFIG_ENV, DEFAULT_CONFIG_FILE, load_settings

DEMO_DIR = Path("demo")
BASE_URL_ENV = "OLLAMA_PIPELINE__OLLAMA__BASE_URL"
# The demo's emulator plays a 24 GiB GPU, whose Ollama default context is 32k tokens: a duplicate-assist
# request (up to four llava images and the prompt, ~6,000 tokens) does not fit the 4k default of a
# smaller card, which refuses it with HTTP 400 (until the pipeline sizes num_ctx itself).
DEMO_VRAM_GIB = 24


DEMO_PARTITION_SIZE = 10


def _demo_config(path: Path) -> None:
    """Write the demo configuration (SQLite library under demo/) unless it exists."""
    if path.exists():
        return
    example = Path(__file__).resolve().parents[2] / "ollama_pipeline.example.yaml"
    data = yaml.safe_load(example.read_text()) if example.exists() else {}
    data.setdefault("ollama", {}).update({"base_url": "http://127.0.0.1:11434", "timeout_ms": 60000})
    data["database"] = {"url": "sqlite:///library.db", "busy_timeout_ms": 30000, "lock_retries": 5}
    data["media_root"] = "media"
    data["logs_dir"] = "../LOGS"
    # Small partitions, so that the demo's 50 items show as several partitions in the Dagster UI.
    data.setdefault("pipeline", {})["partition_size"] = DEMO_PARTITION_SIZE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `ollama-pipeline demo`: the demo library's configuration.\n"
                    + yaml.safe_dump(data, sort_keys=False))


def verify_outputs(engine: Engine, stages: list[str]) -> tuple[int, int, list[str]]:
    """How many media items hold every key the given stages write (plus provenance), all valid."""
    from ollama_pipeline.core.stages import COMMON_KEYS, STAGES
    from ollama_pipeline.core.stages.stored import STORED_SCHEMAS

    keys = [k for job_type in stages for k in STAGES[job_type].writes] + list(COMMON_KEYS)
    from ollama_pipeline.core.db.gallery import gallery_for
    from ollama_pipeline.core.db.repository import values_table

    vt = values_table(engine)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(gallery_for(engine)["media"].c("id")))]
        rows = conn.execute(select(vt.c.media_id, vt.c.key, vt.c.value).where(vt.c.key.in_(keys))).all()
    values = {(m, k): v for m, k, v in rows}
    problems: list[str] = []
    valid = 0
    for media_id in ids:
        ok = True
        for key in keys:
            text = values.get((media_id, key))
            try:
                STORED_SCHEMAS[key].model_validate(json.loads(text or "null"))
            except (ValueError, pydantic.ValidationError):
                ok = False
                problems.append(f"media {media_id}: {key} {'missing' if text is None else 'invalid'}")
        valid += ok
    return valid, len(ids), problems


DEFAULT_LAYOUT = "localsupervisor"


def demo_dir(layout: str) -> Path:
    """Where the demo of a layout lives: `demo/` for LocalSupervisor's (the default), `demo/<layout>/` else."""
    return DEMO_DIR if layout == DEFAULT_LAYOUT else DEMO_DIR / layout


def run_demo(*, count: int = 50, emulator: str = "auto", config: str | None = None, stages: str = "all",
             layout: str = DEFAULT_LAYOUT) -> int:
    """Build the demo library and run the chosen stages on it through Dagster; prints a summary.

    layout "localsupervisor" (the default): the library in LocalSupervisor's schema (the profile users
    run), under demo/; "pipeline": the pipeline's own schema, under demo/pipeline/."""
    from ollama_pipeline.app.demo_library import build_demo_library
    from ollama_pipeline.app.orchestrate import dagster_instance, parse_stage_list, run_stages_through_dagster
    from ollama_pipeline.core.client import OllamaClient
    from ollama_pipeline.core.db.engine import init_db, make_engine

    user_config = config or os.environ.get(CONFIG_ENV) or (DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).exists()
                                                           else None)
    if user_config is None:
        config_file = demo_dir(layout) / "ollama_pipeline.yaml"
        _demo_config(config_file)
    else:
        config_file = Path(user_config)
    os.environ[CONFIG_ENV] = str(config_file.resolve())
    use_emulator = emulator == "always" or (emulator == "auto" and user_config is None)
    server = None
    if use_emulator:
        from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

        server = EmulatorServer(EmulatorConfig(host="127.0.0.1", port=0, latency_ms=0, parallel=8,
                                               vram_gib=DEMO_VRAM_GIB))
        server.start()
        os.environ[BASE_URL_ENV] = server.base_url
        print(f"no Ollama configured: using the bundled emulator at {server.base_url}")
    try:
        settings = load_settings(config_file)
        health = OllamaClient(settings.ollama).health()
        if not health.ok:
            print(f"Ollama at {health.base_url} is not reachable ({health.error_code}): {health.error}\n"
                  f"start Ollama, fix ollama.base_url in {config_file}, or run with --emulator always")
            return 2
        engine = make_engine(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
        if layout == "pipeline":
            init_db(engine)
        started = time.perf_counter()
        if layout == "localsupervisor" and engine.dialect.name != "sqlite":
            print(f"the LocalSupervisor layout is SQLite only (as LocalSupervisor itself); {settings.database.url} "
                  f"is {engine.dialect.name}: run `ollama-pipeline demo --layout pipeline`")
            return 2
        report = build_demo_library(engine, settings.media_root, count=count, layout=layout)  # type: ignore[arg-type]
        print(f"demo library: {report.created} created, {report.skipped} already there "
              f"({time.perf_counter() - started:.1f} s) under {settings.media_root}")
        summary = run_stages_through_dagster(settings, parse_stage_list(stages), media_ids=None,
                                             config_path=str(config_file.resolve()))
        print(summary.render())
        from ollama_pipeline.defs.launch import materialize_downstream, resolve_asset_names

        valid, total, problems = verify_outputs(engine, resolve_asset_names(parse_stage_list(stages),
                                                                            include_media=False))
        print(f"outputs: {valid}/{total} items hold every ollama.* key of the stages run, each valid against "
              f"its stored schema" + (f"; problems: {problems[:5]}" if problems else ""))
        downstream = materialize_downstream(str(config_file.resolve()), dagster_instance())
        export = downstream.metadata.get("ollama_export", {})
        report_md = downstream.metadata.get("ollama_report", {}).get("report_md", "-")
        print(f"ollama_export, ollama_report: Dagster run {downstream.run_id[:8]} "
              + ("ok" if downstream.success else f"FAILED: {downstream.failure}"))
        print("\nresults:")
        from ollama_pipeline.core.db.gallery import gallery_for

        profile = gallery_for(engine).profile
        schema = "LocalSupervisor's schema" if profile == "localsupervisor" else "the pipeline's own schema"
        if profile != layout:
            schema += f", found there (not --layout {layout})"
        print(f"  database      {settings.database.url}  (table media_meta, keys ollama.*; {schema})")
        print(f"  export feed   {export.get('path', '-')}  ({export.get('items', 0)} lines)")
        print(f"  report        {report_md}")
        print(f"  logs          {settings.logs_dir}/ollama_jobs.jsonl, ollama_errors.jsonl")
        print("  Dagster UI    make ui   (runs, lineage, partitions)")
        if server is not None:
            stats = server.stats()
            print(f"  emulator      {stats.get('model_calls')} model calls served")
        return 0 if summary.ok and valid == total and downstream.success else 1
    finally:
        if server is not None:
            server.stop()
