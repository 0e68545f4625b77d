"""The library report (§2 UI/Downstream): what the stages found across the whole library, read from the DB.

Tag frequencies (`ollama.tags_normalized`), quality verdicts and scores (`ollama.quality`), named score
distributions (`ollama.scores`), policy outcomes (`ollama.policy_flags`) and, per stage, items by status
with latency and tokens (`ollama_stage_results`). It reads only the four `media_meta` keys it summarises,
streamed (key and value columns only, each value parsed and reduced to a few numbers at once), and lets
pandas do the statistics, so memory stays flat and 100,000 items take a few seconds.

No Dagster here: `defs/downstream.py` turns a `LibraryReport` into asset metadata. The report holds no
timestamp, so an unchanged library gives byte-identical report files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from sqlalchemy import Engine, func, select

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import read_connection
from ollama_pipeline.core.db.gallery import gallery_for
from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline.core.db.repository import MEDIA_STAGE, values_table
from ollama_pipeline.core.export import temp_beside

REPORT_FORMAT = "ollama_pipeline.core.report/v1"
REPORT_KEYS = ("ollama.tags_normalized", "ollama.quality", "ollama.scores", "ollama.policy_flags")
TOP_TAGS = 20
TOP_KINDS = 10  # quality issue kinds and policy flags listed
VERDICTS = ("ok", "needs_review", "rejected")
OUTCOMES = ("allow", "review", "block")
RATINGS = ("safe", "questionable", "explicit")
STATUSES = ("ok", "failed")
QUALITY_BINS = 5  # equal-width bins of the quality score over 0..1
STREAM_ROWS = 5000


class Distribution(BaseModel):
    """Summary statistics of one numeric column (None when it has no values)."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p95: float | None = None
    min: float | None = None
    max: float | None = None


class TagCount(BaseModel):
    name: str
    items: int = Field(description="Items whose normalized tags include this tag.")
    share: float = Field(description="items / items with a tags value.")


class TagSection(BaseModel):
    items: int = Field(description="Items with an `ollama.tags_normalized` value.")
    distinct: int
    per_item: Distribution
    top: list[TagCount]


class QualitySection(BaseModel):
    items: int = Field(description="Items with an `ollama.quality` value.")
    verdicts: dict[str, int]
    score: Distribution
    histogram: dict[str, int] = Field(description="Items per quality score bin (lower bound inclusive).")
    issues: dict[str, int] = Field(description="Items per issue kind, most frequent first.")


class ScoresSection(BaseModel):
    items: int = Field(description="Items with an `ollama.scores` value.")
    scale: dict[str, float] | None = Field(description="The scale of the stored scores (min, max).")
    scores: dict[str, Distribution] = Field(description="Per score name, plus `overall`.")


class PolicySection(BaseModel):
    items: int = Field(description="Items with an `ollama.policy_flags` value.")
    outcomes: dict[str, int]
    ratings: dict[str, int]
    flags: dict[str, int] = Field(description="Items per flag name, most frequent first.")
    nsfw_score: Distribution


class StageRow(BaseModel):
    """One stage: items by status in `ollama_stage_results`, latency and tokens of its stored answers."""

    stage: str
    ok: int
    failed: int
    not_run: int
    duration_ms: Distribution = Field(description="Wall time per item of the last successful run.")
    ollama_total_ms: float | None = Field(description="Mean `total_duration` Ollama reported per item.")
    prompt_tokens: int
    output_tokens: int
    error_codes: dict[str, int]


class LibraryReport(BaseModel):
    """The whole report; `report_format` changes when a field changes meaning."""

    report_format: str = REPORT_FORMAT
    items: int = Field(description="Rows in `media`.")
    tags: TagSection
    quality: QualitySection
    scores: ScoresSection
    policy: PolicySection
    stages: list[StageRow]
    invalid_values: dict[str, int] = Field(description="Stored values per key that could not be read.")


# ---- reading ------------------------------------------------------------------------------------------


class _Collected:
    """What the streamed `media_meta` values reduce to: counters and flat lists of numbers."""

    def __init__(self) -> None:
        self.tags: Counter[str] = Counter()
        self.tags_per_item: list[int] = []
        self.verdicts: Counter[str] = Counter()
        self.quality_scores: list[float] = []
        self.issues: Counter[str] = Counter()
        self.scores: dict[str, list[float]] = {}
        self.scales: Counter[tuple[float, float]] = Counter()
        self.score_items = 0
        self.outcomes: Counter[str] = Counter()
        self.ratings: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()
        self.nsfw: list[float] = []
        self.invalid: Counter[str] = Counter()

    def add(self, key: str, value: Any) -> None:
        """Reduce one stored value; raises KeyError/TypeError/ValueError when it lacks what is read."""
        if key == "ollama.tags_normalized":
            names = {str(tag["name"]) for tag in value["tags"]}
            self.tags.update(names)
            self.tags_per_item.append(len(names))
        elif key == "ollama.quality":
            score = float(value["score"])
            self.verdicts[str(value["verdict"])] += 1
            self.quality_scores.append(score)
            self.issues.update({str(issue["kind"]) for issue in value.get("issues") or []})
        elif key == "ollama.scores":
            named = {str(name): float(v) for name, v in value["scores"].items()}
            named["overall"] = float(value["overall"])
            for name, v in named.items():
                self.scores.setdefault(name, []).append(v)
            scale = value.get("scale") or {}
            self.scales[(float(scale["min"]), float(scale["max"]))] += 1
            self.score_items += 1
        elif key == "ollama.policy_flags":
            self.outcomes[str(value["outcome"])] += 1
            self.ratings[str(value["rating"])] += 1
            self.flags.update({str(flag["name"]) for flag in value.get("flags") or []})
            self.nsfw.append(float(value["nsfw_score"]))


def _collect(engine: Engine) -> _Collected:
    collected = _Collected()
    vt = values_table(engine)
    query = select(vt.c.key, vt.c.value).where(vt.c.key.in_(REPORT_KEYS))
    with read_connection(engine) as conn:
        for rows in conn.execution_options(yield_per=STREAM_ROWS).execute(query).tuples().partitions():
            for key, text in rows:
                try:
                    value = json.loads(text) if text is not None else None
                    if not isinstance(value, dict):
                        raise TypeError(type(value).__name__)
                    collected.add(key, value)
                except (KeyError, TypeError, ValueError):
                    collected.invalid[key] += 1  # a hand-edited or foreign value: counted, never fatal
    return collected


def _stage_frames(engine: Engine) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per stage and status: counts and tokens (SQL), error codes (SQL), and the ok rows' durations."""
    r = OllamaStageResult
    stage_rows = r.stage != MEDIA_STAGE  # the list of media to fix is not a stage
    with read_connection(engine) as conn:
        counts = pd.read_sql(
            select(r.stage, r.status, func.count().label("items"), func.sum(r.prompt_eval_count).label("prompt"),
                   func.sum(r.eval_count).label("output"), func.avg(r.total_duration_ms).label("ollama_ms"))
            .where(stage_rows).group_by(r.stage, r.status), conn)
        errors = pd.read_sql(
            select(r.stage, r.error_code, func.count().label("items"))
            .where(r.status == "failed", stage_rows).group_by(r.stage, r.error_code), conn)
        durations = pd.read_sql(
            select(r.stage, r.duration_ms).where(r.status == "ok", r.duration_ms.is_not(None)), conn)
    return counts, errors, durations


# ---- statistics ---------------------------------------------------------------------------------------


def _round(value: Any, digits: int = 4) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), digits)


def distribution(values: Iterable[float] | pd.Series) -> Distribution:
    """count, mean, median, 95th percentile, min and max (rounded to 4 decimals)."""
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="float64")
    series = series.dropna()
    if series.empty:
        return Distribution()
    return Distribution(count=int(series.count()), mean=_round(series.mean()), median=_round(series.median()),
                        p95=_round(series.quantile(0.95)), min=_round(series.min()), max=_round(series.max()))


def _ranked(counter: Counter[str], limit: int | None = None) -> dict[str, int]:
    """Most frequent first, ties by name, so the order never depends on reading order."""
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return dict(ranked[:limit] if limit else ranked)


def _with_known(counter: Counter[str], known: tuple[str, ...]) -> dict[str, int]:
    """Every known value (0 when absent) in its fixed order, then any other value seen."""
    return {**{name: counter.get(name, 0) for name in known},
            **{name: n for name, n in sorted(counter.items()) if name not in known}}


def _histogram(scores: list[float]) -> dict[str, int]:
    labels = [f"{i / QUALITY_BINS:.1f}-{(i + 1) / QUALITY_BINS:.1f}" for i in range(QUALITY_BINS)]
    if not scores:
        return dict.fromkeys(labels, 0)
    bins = np.minimum(np.floor(np.clip(np.asarray(scores), 0.0, 1.0) * QUALITY_BINS), QUALITY_BINS - 1)
    counts = pd.Series(bins.astype(int)).value_counts()
    return {label: int(counts.get(i, 0)) for i, label in enumerate(labels)}


def _tag_section(c: _Collected) -> TagSection:
    items = len(c.tags_per_item)
    top = pd.DataFrame(list(c.tags.items()), columns=["name", "items"]) if c.tags else pd.DataFrame(
        columns=["name", "items"])
    top = top.sort_values(["items", "name"], ascending=[False, True]).head(TOP_TAGS)
    return TagSection(items=items, distinct=len(c.tags), per_item=distribution(c.tags_per_item),
                      top=[TagCount(name=row.name, items=int(row.items), share=round(int(row.items) / items, 4))
                           for row in top.itertuples(index=False)])


def _stage_rows(engine: Engine, items: int, stage_names: list[str]) -> list[StageRow]:
    counts, errors, durations = _stage_frames(engine)
    names = list(stage_names) + sorted(set(counts["stage"]) - set(stage_names))
    by_status = counts.pivot_table(index="stage", columns="status", values="items", aggfunc="sum", fill_value=0)
    ok_rows = counts[counts["status"] == "ok"].set_index("stage")
    tokens = counts.groupby("stage")[["prompt", "output"]].sum(min_count=1)
    grouped = durations.groupby("stage")["duration_ms"]
    rows = []
    for name in names:
        ok = int(by_status.at[name, "ok"]) if name in by_status.index and "ok" in by_status else 0
        failed = int(by_status.at[name, "failed"]) if name in by_status.index and "failed" in by_status else 0
        codes = errors[errors["stage"] == name]
        rows.append(StageRow(
            stage=name, ok=ok, failed=failed, not_run=max(items - ok - failed, 0),
            duration_ms=distribution(grouped.get_group(name) if name in grouped.groups else []),
            ollama_total_ms=_round(ok_rows.at[name, "ollama_ms"], 2) if name in ok_rows.index else None,
            prompt_tokens=int(tokens.at[name, "prompt"]) if name in tokens.index and pd.notna(
                tokens.at[name, "prompt"]) else 0,
            output_tokens=int(tokens.at[name, "output"]) if name in tokens.index and pd.notna(
                tokens.at[name, "output"]) else 0,
            error_codes=_ranked(Counter({str(code): int(n) for code, n in zip(codes["error_code"], codes["items"],
                                                                               strict=True)}))))
    return rows


def build_report(engine: Engine, stage_names: Iterable[str] | None = None) -> LibraryReport:
    """The report of the library behind engine; stage_names: the stages listed first (default: registry)."""
    if stage_names is None:
        from ollama_pipeline.core.stages import STAGES

        stage_names = list(STAGES)
    with read_connection(engine) as conn:
        items = int(conn.execute(select(func.count()).select_from(gallery_for(engine)["media"].table)).scalar_one())
    c = _collect(engine)
    scale = c.scales.most_common(1)[0][0] if c.scales else None
    return LibraryReport(
        items=items,
        tags=_tag_section(c),
        quality=QualitySection(items=len(c.quality_scores), verdicts=_with_known(c.verdicts, VERDICTS),
                               score=distribution(c.quality_scores), histogram=_histogram(c.quality_scores),
                               issues=_ranked(c.issues, TOP_KINDS)),
        scores=ScoresSection(items=c.score_items, scale={"min": scale[0], "max": scale[1]} if scale else None,
                             scores={name: distribution(values) for name, values in sorted(
                                 c.scores.items(), key=lambda kv: (kv[0] == "overall", kv[0]))}),
        policy=PolicySection(items=sum(c.outcomes.values()), outcomes=_with_known(c.outcomes, OUTCOMES),
                             ratings=_with_known(c.ratings, RATINGS), flags=_ranked(c.flags, TOP_KINDS),
                             nsfw_score=distribution(c.nsfw)),
        stages=_stage_rows(engine, items, list(stage_names)),
        invalid_values=dict(sorted(c.invalid.items())),
    )


# ---- rendering ----------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table; numbers formatted for reading, `|` escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else "-"


def tags_markdown(report: LibraryReport) -> str:
    t = report.tags
    return (f"{t.items:,} items with normalized tags, {t.distinct:,} distinct tags, "
            f"{_fmt(t.per_item.mean)} per item on average.\n\n"
            + md_table(["#", "Tag", "Items", "Share"],
                       ((i, tag.name, tag.items, _share(tag.items, t.items)) for i, tag in enumerate(t.top, 1))))


def quality_markdown(report: LibraryReport) -> str:
    q = report.quality
    s = q.score
    return (md_table(["Verdict", "Items", "Share"], ((v, n, _share(n, q.items)) for v, n in q.verdicts.items()))
            + "\n\n" + md_table(["Score bin", "Items"], q.histogram.items())
            + f"\n\nScore: mean {_fmt(s.mean)}, median {_fmt(s.median)}, min {_fmt(s.min)}, max {_fmt(s.max)} "
            f"({s.count:,} items).\n\n"
            + md_table(["Issue kind", "Items"], q.issues.items()))


def scores_markdown(report: LibraryReport) -> str:
    sc = report.scores
    scale = f" on a {_fmt(sc.scale['min'])}..{_fmt(sc.scale['max'])} scale" if sc.scale else ""
    return (f"{sc.items:,} items with scores{scale}.\n\n"
            + md_table(["Score", "Items", "Mean", "Median", "P95", "Min", "Max"],
                       ((name, d.count, d.mean, d.median, d.p95, d.min, d.max) for name, d in sc.scores.items())))


def policy_markdown(report: LibraryReport) -> str:
    p = report.policy
    return (md_table(["Outcome", "Items", "Share"], ((o, n, _share(n, p.items)) for o, n in p.outcomes.items()))
            + "\n\n" + md_table(["Rating", "Items"], p.ratings.items())
            + "\n\n" + md_table(["Flag", "Items"], p.flags.items())
            + f"\n\nCombined NSFW score: mean {_fmt(p.nsfw_score.mean)}, p95 {_fmt(p.nsfw_score.p95)}.")


def stages_markdown(report: LibraryReport) -> str:
    return md_table(
        ["Stage", "ok", "failed", "not run", "median ms", "p95 ms", "Ollama ms (mean)", "prompt tokens",
         "output tokens", "errors"],
        ((r.stage, r.ok, r.failed, r.not_run, r.duration_ms.median, r.duration_ms.p95, r.ollama_total_ms,
          r.prompt_tokens, r.output_tokens, ", ".join(f"{c} x{n}" for c, n in r.error_codes.items()) or "-")
         for r in report.stages))


SECTIONS = {"tags": tags_markdown, "quality": quality_markdown, "scores": scores_markdown,
            "policy": policy_markdown, "stages": stages_markdown}
TITLES = {"tags": f"Top {TOP_TAGS} tags (ollama.tags_normalized)", "quality": "Quality (ollama.quality)",
          "scores": "Scores (ollama.scores)", "policy": "Policy outcomes (ollama.policy_flags)",
          "stages": "Stages (ollama_stage_results)"}


def render_markdown(report: LibraryReport) -> str:
    """The whole report as one Markdown document."""
    parts = [f"# Ollama library report\n\n{report.items:,} media items. Format `{report.report_format}`."]
    parts.extend(f"## {TITLES[name]}\n\n{render(report)}" for name, render in SECTIONS.items())
    if report.invalid_values:
        parts.append("## Unreadable stored values\n\n" + md_table(["Key", "Values"], report.invalid_values.items()))
    return "\n\n".join(parts) + "\n"


def key_figures(report: LibraryReport) -> dict[str, int | float]:
    """Numbers worth plotting across runs, under stable names (None values are left out)."""
    figures: dict[str, int | float | None] = {
        "items": report.items, "tagged_items": report.tags.items, "distinct_tags": report.tags.distinct,
        **{f"quality_{v}": n for v, n in report.quality.verdicts.items()},
        "quality_score_mean": report.quality.score.mean,
        **{f"score_{name}_mean": d.mean for name, d in report.scores.scores.items()},
        **{f"policy_{o}": n for o, n in report.policy.outcomes.items()},
        "stage_results_ok": sum(r.ok for r in report.stages),
        "stage_results_failed": sum(r.failed for r in report.stages),
        **{f"{r.stage}_median_ms": r.duration_ms.median for r in report.stages},
        "invalid_values": sum(report.invalid_values.values()),
    }
    return {name: value for name, value in figures.items() if value is not None}


# ---- files --------------------------------------------------------------------------------------------


def default_report_dir(settings: Settings) -> Path:
    """`reports/` beside `exports/` (both beside the logs directory)."""
    return settings.logs_dir.parent / "reports"


def write_atomic(path: Path, text: str) -> None:
    """Write text (UTF-8) to a temporary file in the same folder, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with tmp.open("x", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(report: LibraryReport, folder: Path) -> tuple[Path, Path]:
    """`ollama_report.md` and `ollama_report.json` in folder, each replaced atomically."""
    md_path, json_path = folder / "ollama_report.md", folder / "ollama_report.json"
    write_atomic(md_path, render_markdown(report))
    write_atomic(json_path, json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
    return md_path, json_path
