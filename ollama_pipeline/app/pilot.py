"""`ollama-pipeline pilot --items N`: every stage on a sample of the library, then the measured model time
per item and an estimate of how long the whole library takes on the configured hosts.

The sample is spread evenly over the library's ids (the first, the last and those between), run item by
item (`run_stages`: an item's vision stages back to back, then the text stage) with `force`, so a pilot
always measures real model calls. Its results are stored like any run's, so the web UI shows them for
review; the command prints the item pages to open.

ETA rule: model seconds per item (the sum of Ollama's `total_duration` over an item's calls, median over
the sample) × the items still to do ÷ the slots of every configured host (each slot serves one call at a
time; a GPU that shares one slot's time between several slots makes this optimistic by that factor,
which is why the measured wall time per item at the pilot's concurrency is printed beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select

PILOT_STAGES = ("ollama_caption", "ollama_tags_normalize", "ollama_quality", "ollama_duplicate_assist",
                "ollama_prompt_recon", "ollama_score_multi", "ollama_policy_flags", "ollama_title")


def sample_ids(ids: list[int], count: int) -> list[int]:
    """count ids spread evenly over the sorted list (all of them when there are fewer)."""
    if count >= len(ids):
        return list(ids)
    if count == 1:
        return [ids[0]]
    step = (len(ids) - 1) / (count - 1)
    return sorted({ids[round(i * step)] for i in range(count)})


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cmd_pilot(args: argparse.Namespace) -> int:
    from ollama_pipeline.app.cli import settings_from_args
    from ollama_pipeline.core.db.gallery import require_gallery
    from ollama_pipeline.core.db.models import OllamaStageResult
    from ollama_pipeline.core.errors import ValidationError
    from ollama_pipeline.core.runner import Pipeline, run_stages

    settings = settings_from_args(args)
    pipeline = Pipeline.from_settings(settings)
    media = require_gallery(pipeline.engine)["media"]  # the gallery's own media table, as discovered
    with pipeline.engine.connect() as conn:
        ids = list(conn.execute(select(media.c("id")).order_by(media.c("id"))).scalars())
        done = conn.execute(
            select(func.count()).select_from(
                select(OllamaStageResult.media_id).where(OllamaStageResult.status == "ok")
                .group_by(OllamaStageResult.media_id)
                .having(func.count(func.distinct(OllamaStageResult.stage)) >= len(PILOT_STAGES)).subquery())
        ).scalar() or 0
    if not ids:
        raise ValidationError("the library has no media items to pilot", code="validation.media_missing")
    sample = sample_ids(ids, args.items)
    if "ollama_duplicate_assist" in PILOT_STAGES:
        from ollama_pipeline.defs.assets import index_media  # the duplicate stage searches the media index

        for _ in index_media(pipeline, sample):
            pass
    print(f"pilot: {len(sample)} of {len(ids)} item(s), all {len(PILOT_STAGES)} stages, "
          f"{len(pipeline.client.pool.hosts)} host(s) with {pipeline.client.pool.total_slots} slot(s)")
    started = time.perf_counter()
    per_item: dict[int, dict[str, Any]] = defaultdict(lambda: {"model_s": 0.0, "calls": 0, "failed": []})
    counts: dict[str, int] = defaultdict(int)
    for outcome in run_stages(pipeline, PILOT_STAGES, sample, force=True):
        row = per_item[outcome.media_id]
        row["model_s"] += outcome.metrics.total_duration_ms / 1000.0
        row["calls"] += outcome.metrics.calls
        counts[outcome.status] += 1
        if outcome.status == "failed":
            row["failed"].append(f"{outcome.stage}: {(outcome.error or {}).get('code')}")
    wall = time.perf_counter() - started
    model = [r["model_s"] for r in per_item.values()]
    per_item_model = statistics.median(model) if model else 0.0
    slots = pipeline.client.pool.total_slots
    remaining = max(len(ids) - done, 0)
    print(f"outcomes: {dict(sorted(counts.items()))}; model calls {sum(r['calls'] for r in per_item.values())}")
    print(f"model time per item: median {per_item_model:.2f} s, mean {statistics.fmean(model):.2f} s "
          f"(Ollama's total_duration over the item's calls)" if model else "model time per item: none measured")
    print(f"wall time: {wall:.1f} s for {len(sample)} item(s) = {wall / len(sample):.2f} s per item at "
          f"{slots} slot(s)")
    eta_all = len(ids) * per_item_model / slots
    eta_left = remaining * per_item_model / slots
    print(f"ETA on the configured hosts: {_duration(eta_all)} for all {len(ids)} item(s); "
          f"{_duration(eta_left)} for the {remaining} not yet done in every stage")
    for row in pipeline.client.host_stats():
        print(f"  host {row['host']}: {row['ok']} call(s), {row['model_s']:.1f} model s, "
              f"{'up' if row['up'] else 'DOWN'}")
    base = args.web_url.rstrip("/")
    print("review the results in the web UI (ollama-pipeline web):")
    for media_id in sample[: args.links]:
        failed = per_item[media_id]["failed"]
        print(f"  {base}/media/{media_id}" + (f"  failed: {', '.join(failed)}" if failed else ""))
    return 0 if not counts.get("failed") else 1


def register(subparsers: Any) -> None:
    """Add `pilot` to the main parser's subcommands."""
    from ollama_pipeline.app.cli import arg_type
    from ollama_pipeline.core.selection import positive_int

    p = subparsers.add_parser("pilot", help="run every stage on a sample, print model time per item and the ETA",
                              description=__doc__.splitlines()[0])
    p.add_argument("--items", type=arg_type(positive_int, "--items"), default=20, help="sample size (default 20)")
    p.add_argument("--links", type=arg_type(positive_int, "--links"), default=20,
                   help="item pages to list for review (default 20)")
    p.add_argument("--web-url", default="http://127.0.0.1:8080", help="address of `ollama-pipeline web`")
    p.set_defaults(handler=cmd_pilot)
