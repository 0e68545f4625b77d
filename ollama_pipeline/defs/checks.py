"""Asset checks per stage, built from the stage registry: are the stored answers usable?

- `<job_type>_schema_valid`: every stored value of the stage's `writes` keys, for items whose last run
  of the stage succeeded, parses as JSON and is not empty.
- `<job_type>_not_degenerate`: the model does not give the same answer for most different items (more
  than half identical among at least five items fails), and no tag written is only digits.

Some of the seed's keys hold categorical answers that may repeat (a quality verdict, a policy outcome, "no
duplicates") or may be empty; they are listed below, and a stage can name its own in `Stage.extra`
(`check_categorical_keys`, `check_may_be_empty_keys`).

Each check reads the whole table with one query per stage (not per partition). The checks are declared as
`AssetCheckSpec`s of the library asset and evaluated in its step: a separate `@asset_check` step would be
skipped whenever the asset step yields only per-partition `AssetMaterialization` events, which is how
every run here reports its items. They also run alone ("Execute checks" in the UI).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pydantic
from dagster import AssetCheckKey, AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue
from sqlalchemy import Engine, and_, func, select

from ollama_pipeline.core.db.models import OllamaStageResult
from ollama_pipeline.core.db.repository import values_table
from ollama_pipeline.core.stages.base import Stage
from ollama_pipeline.core.stages.stored import STORED_SCHEMAS

DEGENERATE_SHARE = 0.5  # more than this share of identical answers fails ...
DEGENERATE_MIN_ITEMS = 5  # ... once at least this many items were answered
SAMPLE = 10  # offending items listed in the check metadata
# Seed keys (§2) whose answers may legitimately repeat across items / be an empty list or object.
CATEGORICAL_KEYS = frozenset({"ollama.quality", "ollama.policy_flags", "ollama.duplicate_assist"})
MAY_BE_EMPTY_KEYS = frozenset({"ollama.duplicate_assist", "ollama.policy_flags"})


def categorical_keys(stage: Stage) -> frozenset[str]:
    return frozenset(stage.extra.get("check_categorical_keys", CATEGORICAL_KEYS & set(stage.writes)))


def may_be_empty_keys(stage: Stage) -> frozenset[str]:
    return frozenset(stage.extra.get("check_may_be_empty_keys", MAY_BE_EMPTY_KEYS & set(stage.writes)))


def schema_check_name(stage: Stage) -> str:
    return f"{stage.job_type}_schema_valid"


def degenerate_check_name(stage: Stage) -> str:
    return f"{stage.job_type}_not_degenerate"


def check_specs_for(stage: Stage) -> list[AssetCheckSpec]:
    """The two checks of one stage asset."""
    keys = ", ".join(f"`{k}`" for k in stage.writes)
    return [
        AssetCheckSpec(
            name=schema_check_name(stage), asset=stage.job_type,
            description=f"Every stored value of {keys} (items whose last {stage.job_type} run succeeded) "
            "parses as JSON, is not empty and validates against the key's stored schema "
            "(`ollama_pipeline.core.stages.stored`)."),
        AssetCheckSpec(
            name=degenerate_check_name(stage), asset=stage.job_type,
            description=f"{stage.title}: no single answer for more than {DEGENERATE_SHARE:.0%} of the items "
            f"(at least {DEGENERATE_MIN_ITEMS}), and no tag that is only digits."),
    ]


def check_keys_for(stage: Stage) -> dict[str, AssetCheckKey]:
    """Check name -> key, for the checks of one stage."""
    return {spec.name: spec.key for spec in check_specs_for(stage)}


@dataclass
class StoredAnswers:
    """The stored values of one stage's keys for the items whose last run of the stage succeeded."""

    ok_items: int
    values: dict[str, list[tuple[Any, str | None]]] = field(default_factory=dict)  # key -> (media_id, text)


def load_answers(engine: Engine, stage: Stage) -> StoredAnswers:
    """Two queries: the count of ok items, and their stored values of the stage's keys."""
    ok = and_(OllamaStageResult.stage == stage.job_type, OllamaStageResult.status == "ok")
    with engine.connect() as conn:
        ok_items = conn.execute(select(func.count()).select_from(OllamaStageResult).where(ok)).scalar_one()
        answers = StoredAnswers(ok_items=int(ok_items), values={key: [] for key in stage.writes})
        if not stage.writes or not ok_items:
            return answers
        vt = values_table(engine)
        query = (select(vt.c.key, vt.c.media_id, vt.c.value)
                 .join(OllamaStageResult, and_(OllamaStageResult.media_id == vt.c.media_id, ok))
                 .where(vt.c.key.in_(stage.writes)).order_by(vt.c.media_id))
        for key, media_id, value in conn.execute(query):
            answers.values[key].append((media_id, value))
    return answers


def is_empty(value: Any, *, containers: bool = True) -> bool:
    """null, a blank string, an object whose `text` is blank, or (containers=True) an empty list/object."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | dict) and not value:
        return containers
    return isinstance(value, dict) and set(value) == {"text"} and is_empty(value["text"])


def _tag_names(value: Any) -> list[str]:
    """Tag names inside a stored tags value: a list of names or of objects with a `name`, or an object
    holding such a list."""
    if isinstance(value, dict):
        return [name for inner in value.values() if isinstance(inner, list) for name in _tag_names(inner)]
    if not isinstance(value, list):
        return []
    names = []
    for item in value:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            names.append(item["name"])
    return names


def schema_result(stage: Stage, answers: StoredAnswers) -> AssetCheckResult:
    """Pass when every stored value parses as JSON, is not empty and validates against its stored schema."""
    invalid: list[dict[str, Any]] = []
    checked = 0
    may_be_empty = may_be_empty_keys(stage)
    for key, rows in answers.values.items():
        for media_id, text in rows:
            checked += 1
            problem = None
            if text is None:
                problem = "null"
            else:
                try:
                    value = json.loads(text)
                    problem = "empty" if is_empty(value, containers=key not in may_be_empty) else None
                    if problem is None and key in STORED_SCHEMAS:
                        STORED_SCHEMAS[key].model_validate(value)
                except pydantic.ValidationError as exc:
                    problem = "schema: " + ", ".join(sorted({".".join(map(str, e["loc"])) for e in exc.errors()})[:5])
                except ValueError:
                    problem = "not JSON"
            if problem:
                invalid.append({"media_id": media_id, "key": key, "problem": problem})
    missing = answers.ok_items * len(stage.writes) - checked
    return AssetCheckResult(
        check_name=schema_check_name(stage), asset_key=stage.job_type, passed=not invalid,
        severity=AssetCheckSeverity.ERROR,
        description=(f"{len(invalid)} of {checked} stored values are not JSON, empty or break their schema" if invalid
                     else f"all {checked} stored values parse as JSON, are not empty and match their schemas"),
        metadata={"ok_items": answers.ok_items, "checked_values": checked, "invalid_values": len(invalid),
                  "missing_values": max(missing, 0), "invalid_sample": MetadataValue.json(invalid[:SAMPLE])})


def degenerate_result(stage: Stage, answers: StoredAnswers) -> AssetCheckResult:
    """Fail when one answer covers most items of a key, or a tag is only digits."""
    problems: list[str] = []
    shares: dict[str, float] = {}
    digit_tags: Counter[str] = Counter()
    categorical = categorical_keys(stage)
    for key, rows in answers.values.items():
        texts = [text for _, text in rows if text is not None]
        if key not in categorical and len(texts) >= DEGENERATE_MIN_ITEMS:
            top, count = Counter(texts).most_common(1)[0]
            shares[key] = round(count / len(texts), 3)
            if count / len(texts) > DEGENERATE_SHARE:
                problems.append(f"{key}: {count} of {len(texts)} items share one answer ({top[:80]})")
        if "tags" in key:
            for text in texts:
                try:
                    names = _tag_names(json.loads(text))
                except ValueError:
                    continue
                digit_tags.update(n for n in names if n.strip().isdigit())
    if digit_tags:
        problems.append(f"tags that are only digits: {', '.join(sorted(digit_tags)[:SAMPLE])}")
    return AssetCheckResult(
        check_name=degenerate_check_name(stage), asset_key=stage.job_type, passed=not problems,
        severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) if problems else "answers differ between items",
        metadata={"ok_items": answers.ok_items, "largest_identical_share": MetadataValue.json(shares),
                  "not_compared": MetadataValue.json(sorted(categorical)),
                  "digit_only_tags": MetadataValue.json(dict(digit_tags.most_common(SAMPLE)))})


def evaluate_checks(engine: Engine, stage: Stage, selected: set[AssetCheckKey]) -> Iterator[AssetCheckResult]:
    """The selected checks of one stage (one read of its stored answers for both)."""
    keys = check_keys_for(stage)
    wanted = [name for name, key in keys.items() if key in selected]
    if not wanted:
        return
    answers = load_answers(engine, stage)
    if schema_check_name(stage) in wanted:
        yield schema_result(stage, answers)
    if degenerate_check_name(stage) in wanted:
        yield degenerate_result(stage, answers)


# ---- check-db on `media` ------------------------------------------------------------------------

MEDIA_ASSET = "media"
CHECK_DB = "media_check_db"


def check_db_spec() -> AssetCheckSpec:
    """`ollama-pipeline check-db` as a check of the `media` asset (evaluated in the run's step, or alone)."""
    return AssetCheckSpec(
        name=CHECK_DB, asset=MEDIA_ASSET,
        description="`ollama-pipeline check-db`: the gallery's tables and columns the pipeline reads and writes, "
        "the profile or `library:` mapping in use, and every gap with the mapping line or SQL that fixes it. "
        "Runs when the check executes (never at code-location load), so a database outage fails the check, "
        "not the location.")


def check_db_result(engine_of: Any) -> AssetCheckResult:
    """The check-db report as a check result: passed when nothing required is missing; its gaps (errors and
    warnings, each with its fix) in the metadata. A database that cannot be reached fails the check."""
    from ollama_pipeline.core.db.gallery import gallery_for

    try:
        report = gallery_for(engine_of(), refresh=True).report
    except Exception as exc:  # noqa: BLE001 - an outage or a bad URL is the check's finding, never a crash
        message = " ".join(str(exc).split())[:500]
        return AssetCheckResult(
            check_name=CHECK_DB, asset_key=MEDIA_ASSET, passed=False, severity=AssetCheckSeverity.ERROR,
            description=f"check-db could not read the gallery database: {type(exc).__name__}",
            metadata={"error": MetadataValue.text(f"{type(exc).__name__}: {message}")})
    gaps = [f.as_dict() for f in report.findings if f.level in ("error", "warning")]
    errors = [g for g in gaps if g["level"] == "error"]
    return AssetCheckResult(
        check_name=CHECK_DB, asset_key=MEDIA_ASSET, passed=report.ok, severity=AssetCheckSeverity.ERROR,
        description=(f"{len(errors)} required table(s) or column(s) missing" if errors else
                     f"profile {report.profile}: every required table and column is there"
                     + (f" ({len(gaps)} warning(s))" if gaps else "")),
        metadata={"profile": report.profile, "dialect": report.dialect, "missing_required": len(errors),
                  "gaps": MetadataValue.json(gaps),
                  "fixes": MetadataValue.md("\n".join(f"- `{g['table']}{'.' + g['column'] if g['column'] else ''}`"
                                                      f": {g['message']}" + (f" — fix: `{g['fix']}`" if g["fix"]
                                                                             else "") for g in gaps) or "none"),
                  "report": MetadataValue.md(f"```\n{report.render()}\n```")})
