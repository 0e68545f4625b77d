"""Benchmark of the results web UI's gallery queries on a library of 100,000 media rows (the timings the
test suite used to assert; tests check the pages' contents only).

    python -m ollama_pipeline.bench.web_queries [--items 100000] [--out bench_results/web_queries.json]

Builds the rows in a temporary SQLite file, runs each keyset page query three times and reports the best
time in ms (targets: a page under 200 ms, a search that matches one item in 100,000 under 1 s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, insert

from ollama_pipeline.app.web import queries
from ollama_pipeline.core.db.engine import init_db, make_engine
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaStageResult
from ollama_pipeline.core.jsontext import canonical_json
from ollama_pipeline.core.stages import STAGES

TARGET_PAGE_MS = 200.0
TARGET_RARE_SEARCH_MS = 1000.0


def fill_library(engine: Engine, items: int) -> None:
    """`items` media rows with captions (half red, half blue) and every second one's caption stage result."""
    version = STAGES["ollama_caption"].version
    with engine.begin() as conn:
        conn.execute(insert(Media), [{"id": i, "path": f"2025/{i:06d}.jpg", "type": "image",
                                      "quality_status": "ok" if i % 3 else "review"} for i in range(1, items + 1)])
        conn.execute(insert(MediaMeta), [{"media_id": i, "key": "ollama.caption",
                                          "value": canonical_json({"text": f"a {'red' if i % 2 else 'blue'} fox {i}"})}
                                         for i in range(1, items + 1)])
        conn.execute(insert(OllamaStageResult), [{"media_id": i, "stage": "ollama_caption", "status": "ok",
                                                  "version": version, "model": "llava:7b"}
                                                 for i in range(1, items + 1, 2)])


def page_cases(items: int) -> dict[str, tuple[queries.GalleryFilters, int | None]]:
    """The gallery queries measured (and checked by test_web): filters and the keyset position."""
    return {
        "first page": (queries.GalleryFilters(), None),
        "middle page": (queries.GalleryFilters(), items // 2),
        "last page": (queries.GalleryFilters(), items - 10),
        "search": (queries.GalleryFilters(q="blue fox"), int(items * 0.7)),
        "quality": (queries.GalleryFilters(quality="review"), int(items * 0.3)),
        "stage never run": (queries.GalleryFilters(stage="ollama_caption", stage_status="never"), int(items * 0.6)),
    }


def measure(items: int, workdir: Path) -> dict[str, float]:
    """Best-of-three ms per gallery query on `items` rows."""
    engine = make_engine(f"sqlite:///{workdir / 'web_bench.db'}")
    init_db(engine)
    fill_library(engine, items)
    cases = {**page_cases(items), "rare search": (queries.GalleryFilters(q=f"fox {items - 1}"), None)}
    result: dict[str, float] = {}
    for name, (filters, after) in cases.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            queries.gallery_page(engine, filters, after=after)
            best = min(best, time.perf_counter() - started)
        result[name] = round(best * 1000.0, 2)
    engine.dispose()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--out", default="bench_results/web_queries.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ms = measure(args.items, Path(tmp))
    worst_page = max(v for k, v in ms.items() if k != "rare search")
    report = {"items": args.items, "best_ms": ms, "worst_page_ms": worst_page,
              "page_target_met": worst_page < TARGET_PAGE_MS,
              "rare_search_target_met": ms["rare search"] < TARGET_RARE_SEARCH_MS}
    for name, value in ms.items():
        print(f"{name:<18} {value:8.1f} ms")
    print(f"worst page {worst_page:.1f} ms (target < {TARGET_PAGE_MS:.0f}); rare search {ms['rare search']:.1f} ms "
          f"(target < {TARGET_RARE_SEARCH_MS:.0f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
