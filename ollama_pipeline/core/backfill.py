"""Targeted backfills: a question about the library (`--where` clauses) answered in SQL, stored as a selection.

`ollama-pipeline backfill --where ...` and the web UI's "Backfill these" button ask a question, this module
answers it with one INSERT ... SELECT into `ollama_backfill_items` under a new selection id, and the launcher
(app.backfill) starts one Dagster backfill over the partitions that hold the items, with the selection id in
the run tag `ollama/selection`. The runs then touch only the stored items of their partitions
(`selection_members`, read by defs.assets).

The `--where` grammar: one clause per `--where`, `KEY=VALUE`, every clause must hold (AND); a comma inside a
value means "any of" (OR).

    stale=STAGE[,STAGE]      the stored answer (status ok) was made by another stage version than the
                             registry's, or by another model than the config names for the stage
    failed=CODE              a stage failed with this code (`network.timeout`), or any code of a channel
                             (`network`), or any failure (`any`); `failed=STAGE:CODE` names the stage
    never=STAGE[,STAGE]      the stage has no stored result for the item
    tag=NAME[,NAME]          the item carries the tag
    quality=VERDICT          ok, needs_review or rejected (`media.quality_status` or the quality stage's verdict)
    policy=OUTCOME_OR_FLAG   allow, review, block, or a policy flag name
    ids=SPEC                 media ids as everywhere else: 7, 1-500, 3,5,9

STAGE is a job type or its short name (`caption` = `ollama_caption`). Every bad clause is a
`ValidationError` with a one-line message (exit code 2 in the CLI). The stages a backfill materializes are
the ones its clauses name (stale, never, failed=STAGE:...), the stages where the selected items failed
with the code (failed=CODE), or every stage; `stages=` overrides. This module must not import Dagster.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, delete, exists, insert, literal, or_, select, true, update

from ollama_pipeline.core.db.gallery import gallery_for
from ollama_pipeline.core.db.models import (
    OllamaBackfillItem,
    OllamaBackfillSelection,
    OllamaStageResult,
    utcnow,
)
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.selection import parse_job_types, parse_media_selection

SELECTION_TAG = "ollama/selection"
KEYS = ("stale", "failed", "never", "tag", "quality", "policy", "ids")
QUALITY_VERDICTS = ("ok", "needs_review", "rejected")
POLICY_OUTCOMES = ("allow", "review", "block")
WHERE_HELP = ("stale=STAGE, failed=CODE|CHANNEL|any|STAGE:CODE, never=STAGE, tag=NAME, "
              "quality=ok|needs_review|rejected, policy=allow|review|block|FLAG, ids=7,1-500")
_CODE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_.]+)?")
_NAME = re.compile(r"[^\x00-\x1f]{1,255}")
_ID = re.compile(r"sel-[0-9a-f]{12}")


def _bad(message: str) -> ValidationError:
    return ValidationError(f"--where {message}; clauses: {WHERE_HELP}", code="validation.payload")


@dataclass(frozen=True)
class Clause:
    """One parsed `KEY=VALUE` clause."""

    key: str
    text: str
    stages: tuple[str, ...] = ()  # stale, never, failed=STAGE:CODE
    values: tuple[Any, ...] = ()  # codes, tags, verdicts, outcomes
    ids: Any = None  # MediaSelection for ids=


@dataclass(frozen=True)
class Question:
    """All clauses of one backfill (AND)."""

    clauses: tuple[Clause, ...]

    @property
    def text(self) -> str:
        return "\n".join(c.text for c in self.clauses)

    def named_stages(self) -> list[str]:
        return list(dict.fromkeys(s for c in self.clauses for s in c.stages))


def _values(key: str, value: str) -> list[str]:
    parts = [p.strip() for p in value.split(",")]
    if not all(parts):
        raise _bad(f"{key}={value!r}: an empty item in the list")
    return list(dict.fromkeys(parts))


def _stages(key: str, value: str) -> tuple[str, ...]:
    try:
        return tuple(parse_job_types(_values(key, value)))
    except ValidationError as exc:
        raise ValidationError(f"--where {key}={value}: {exc.message}", code=exc.code) from None


def parse_clause(raw: str, *, integer_ids: bool = True) -> Clause:
    """One `KEY=VALUE` clause; a ValidationError naming the clause for anything else."""
    text = raw.strip()
    key, sep, value = text.partition("=")
    key, value = key.strip().lower(), value.strip()
    if not sep or not key:
        raise _bad(f"{raw!r} is not KEY=VALUE")
    if key not in KEYS:
        raise _bad(f"{raw!r}: unknown key {key!r}")
    if not value:
        raise _bad(f"{key}= needs a value")
    text = f"{key}={value}"
    if key in ("stale", "never"):
        return Clause(key, text, stages=_stages(key, value))
    if key == "failed":
        stages: list[str] = []
        codes: list[str] = []
        for part in _values(key, value):
            stage, colon, code = part.rpartition(":")
            if colon:
                stages.extend(_stages(key, stage))
            code = code.lower()
            if code != "any" and not _CODE.fullmatch(code):
                raise _bad(f"failed={value}: {code!r} is not an error code (channel.code, a channel, or any)")
            codes.append(code)
        return Clause(key, text, stages=tuple(dict.fromkeys(stages)), values=tuple(dict.fromkeys(codes)))
    if key == "quality":
        verdicts = _values(key, value)
        wrong = [v for v in verdicts if v not in QUALITY_VERDICTS]
        if wrong:
            raise _bad(f"quality={value}: {wrong[0]!r} is not one of {', '.join(QUALITY_VERDICTS)}")
        return Clause(key, text, values=tuple(verdicts))
    if key in ("tag", "policy"):
        names = _values(key, value)
        for name in names:
            if not _NAME.fullmatch(name):
                raise _bad(f"{key}={value}: {name!r} is not a name")
        return Clause(key, text, values=tuple(names))
    try:
        ids = parse_media_selection(value, integer_ids=integer_ids)
    except ValidationError as exc:
        raise ValidationError(f"--where ids={value}: {exc.message}", code=exc.code) from None
    if ids.everything:
        raise _bad("ids=all selects everything; leave the clause out or name ids")
    return Clause(key, text, ids=ids)


def parse_where(clauses: Iterable[str] | None, *, integer_ids: bool = True) -> Question:
    """The question of repeated `--where` clauses; at least one is required."""
    parsed = tuple(parse_clause(c, integer_ids=integer_ids) for c in (clauses or ()))
    if not parsed:
        raise _bad("is required at least once (what should be backfilled?)")
    return Question(parsed)


# ---- SQL ----------------------------------------------------------------------------------------------


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _json_fragment(key: str, value: str) -> str:
    from ollama_pipeline.core.jsontext import canonical_json

    return f"%{_like_escape(canonical_json(key))}:{_like_escape(canonical_json(value))}%"


def current_models(settings: Any) -> dict[str, str]:
    """The model the config names for each stage (what a stored answer must carry not to be stale)."""
    from ollama_pipeline.core.stages import STAGES

    return {name: settings.ollama.model_for(stage.model_kind) for name, stage in STAGES.items()}


def clause_condition(clause: Clause, engine: Engine, settings: Any) -> ColumnElement[bool]:
    """The SQL condition of one clause on the gallery's media id (indexed EXISTS sub-queries)."""
    from ollama_pipeline.core.db.repository import values_table
    from ollama_pipeline.core.stages import STAGES

    g = gallery_for(engine)
    media_id = g["media"].c("id")
    r = OllamaStageResult
    if clause.key == "stale":
        models = current_models(settings)
        return or_(*(exists().where(
            r.media_id == media_id, r.stage == stage, r.status == "ok",
            or_(r.version.is_(None), r.version != STAGES[stage].version, r.model.is_(None), r.model != models[stage]))
            for stage in clause.stages))
    if clause.key == "never":
        return or_(*(~exists().where(r.media_id == media_id, r.stage == stage) for stage in clause.stages))
    if clause.key == "failed":
        parts = []
        for code in clause.values:
            if code == "any":
                test: ColumnElement[bool] = true()
            elif "." in code:
                test = r.error_code == code
            else:
                test = or_(r.error_channel == code, r.error_code.like(f"{_like_escape(code)}.%", escape="\\"))
            scope = r.stage.in_(clause.stages) if clause.stages else true()
            parts.append(exists().where(r.media_id == media_id, r.status == "failed", scope, test))
        return or_(*parts)
    if clause.key == "ids":
        return clause.ids.where(media_id)
    vt = values_table(engine)

    def meta(key: str, condition: ColumnElement[bool]) -> ColumnElement[bool]:
        return exists().where(vt.c.media_id == media_id, vt.c.key == key, condition)

    if clause.key == "quality":
        m = g["media"]
        parts = []
        for verdict in clause.values:
            found = meta("ollama.quality", vt.c.value.like(_json_fragment("verdict", verdict), escape="\\"))
            parts.append(or_(m.c("quality_status") == verdict, found) if m.has("quality_status") else found)
        return or_(*parts)
    if clause.key == "policy":
        return or_(*(meta("ollama.policy_flags", or_(
            vt.c.value.like(_json_fragment("outcome", name), escape="\\"),
            vt.c.value.like(_json_fragment("name", name), escape="\\"))) for name in clause.values))
    t, mt = g.t("tags"), g.t("media_tags")
    if t is None or mt is None:
        raise ValidationError("--where tag=...: this gallery has no tags/media_tags tables", code="validation.payload")
    return exists().where(mt.c("media_id") == media_id, mt.c("tag_id") == t.c("id"), t.c("name").in_(clause.values))


def question_conditions(question: Question, engine: Engine, settings: Any) -> list[ColumnElement[bool]]:
    return [clause_condition(c, engine, settings) for c in question.clauses]


@dataclass
class Selection:
    """A stored (or, for a dry run, counted) selection: its id, items, partitions and stages."""

    id: str | None
    where_text: str
    items: int
    partitions: list[str]
    stages: list[str]
    first_ids: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"selection_id": self.id, "where": self.where_text.splitlines(), "items": self.items,
                "partitions": len(self.partitions), "stages": self.stages}


def new_selection_id() -> str:
    return f"sel-{secrets.token_hex(6)}"


def _keys_and_count(engine: Engine, query: Any, partitioning: Partitioning) -> tuple[int, list[str], list[Any]]:
    from ollama_pipeline.core.db.engine import read_connection

    keys: dict[str, None] = {}
    count = 0
    first: list[Any] = []
    with read_connection(engine) as conn:
        for media_id in conn.execute(query).scalars():
            count += 1
            if len(first) < 10:
                first.append(media_id)
            keys.setdefault(partitioning.key_of(media_id), None)
    return count, list(keys), first


def _failed_stages(engine: Engine, question: Question, selection_id: str) -> list[str]:
    """The stages in which the stored items failed with a `failed=` clause's codes (registry order)."""
    from ollama_pipeline.core.stages import STAGES

    r, item = OllamaStageResult, OllamaBackfillItem
    with engine.connect() as conn:
        found = set(conn.execute(select(r.stage).distinct().where(
            r.status == "failed", r.media_id.in_(select(item.media_id).where(item.selection_id == selection_id)))
        ).scalars())
    return [name for name in STAGES if name in found]


def resolve_stages(question: Question, stages: Sequence[str] | None) -> list[str] | None:
    """Explicit stages, else the stages the clauses name, else None (decided after selecting)."""
    if stages:
        return list(stages)
    return question.named_stages() or None


def select_items(engine: Engine, settings: Any, question: Question | None, *,
                 extra: Sequence[ColumnElement[bool]] = (), stages: Sequence[str] | None = None,
                 dry_run: bool = False, source: str = "cli") -> Selection:
    """Answer the question in SQL; unless dry_run, store the items under a new selection id (one
    INSERT ... SELECT, so the ids never travel through Python) and return it with its partitions.

    extra: more conditions on the gallery's media id (the web UI's current filter)."""
    from ollama_pipeline.core.stages import STAGES

    g = gallery_for(engine)
    media_id = g["media"].c("id")
    conditions = [*(question_conditions(question, engine, settings) if question else ()), *extra]
    where = and_(*conditions) if conditions else true()
    text = question.text if question else ""
    partitioning = Partitioning(size=settings.pipeline.partition_size)
    chosen = resolve_stages(question, stages) if question else (list(stages) if stages else None)
    base = select(media_id).select_from(g["media"].table).where(where)
    if dry_run:
        count, keys, first = _keys_and_count(engine, base.order_by(media_id), partitioning)
        return Selection(None, text, count, keys, chosen or list(STAGES), first)
    selection_id = new_selection_id()
    item = OllamaBackfillItem.__table__
    with engine.begin() as conn:
        conn.execute(insert(item).from_select(["selection_id", "media_id"],
                                              select(literal(selection_id), media_id).select_from(g["media"].table)
                                              .where(where)))
    stored = select(item.c.media_id).where(item.c.selection_id == selection_id).order_by(item.c.media_id)
    count, keys, first = _keys_and_count(engine, stored, partitioning)
    if chosen is None:
        chosen = (_failed_stages(engine, question, selection_id)
                  if question and any(c.key == "failed" for c in question.clauses) else []) or list(STAGES)
    with engine.begin() as conn:
        conn.execute(insert(OllamaBackfillSelection.__table__).values(
            id=selection_id, where_text=text, stages=json.dumps(chosen), items=count, partitions=len(keys),
            source=source, created_at=utcnow()))
    return Selection(selection_id, text, count, keys, chosen, first)


def record_backfill(engine: Engine, selection_id: str, backfill_id: str) -> None:
    """Remember which Dagster backfill works the selection."""
    with engine.begin() as conn:
        conn.execute(update(OllamaBackfillSelection).where(OllamaBackfillSelection.id == selection_id)
                     .values(backfill_id=backfill_id))


def forget_selection(engine: Engine, selection_id: str) -> None:
    """Drop a selection whose backfill could not be launched (nothing is left behind)."""
    with engine.begin() as conn:
        conn.execute(delete(OllamaBackfillItem).where(OllamaBackfillItem.selection_id == selection_id))
        conn.execute(delete(OllamaBackfillSelection).where(OllamaBackfillSelection.id == selection_id))


def check_selection_id(value: str) -> str:
    if not _ID.fullmatch(value or ""):
        raise ValidationError(f"run tag {SELECTION_TAG}={value!r} is not a selection id (sel-<12 hex digits>)",
                              code="validation.payload")
    return value


def selection_members(engine: Engine, selection_id: str, keys: Iterable[str],
                      partitioning: Partitioning) -> list[Any]:
    """The stored items of a selection that lie in the given partitions, ascending (what a backfill's run
    works on). An unknown selection id is a ValidationError."""
    check_selection_id(selection_id)
    item = OllamaBackfillItem
    with engine.connect() as conn:
        known = conn.execute(select(OllamaBackfillSelection.id).where(OllamaBackfillSelection.id == selection_id)
                             ).first()
        if known is None:
            raise ValidationError(f"no stored selection {selection_id!r} (run tag {SELECTION_TAG}); it was made "
                                  "on another library database, or removed", code="validation.payload")
        wanted = list(dict.fromkeys(keys))
        spans = [s for s in (partitioning.block_range(k) for k in wanted) if s is not None]
        buckets = {k for k in wanted if partitioning.block_range(k) is None}
        ids: list[Any] = []
        if spans:
            ids.extend(conn.execute(select(item.media_id).where(
                item.selection_id == selection_id, or_(*(item.media_id.between(a, b) for a, b in spans)))
                .order_by(item.media_id)).scalars())
        if buckets:
            ids.extend(i for i in conn.execute(select(item.media_id).where(item.selection_id == selection_id)
                                               .order_by(item.media_id)).scalars()
                       if partitioning.key_of(i) in buckets)
    return sorted(set(ids))


def get_selection(engine: Engine, selection_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        t = OllamaBackfillSelection.__table__
        row = conn.execute(select(t).where(t.c.id == selection_id)).first()
    if row is None:
        return None
    return {"id": row.id, "where": row.where_text.splitlines(), "stages": json.loads(row.stages),
            "items": row.items, "partitions": row.partitions, "backfill_id": row.backfill_id, "source": row.source}
