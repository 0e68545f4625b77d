"""Media selections: the one parser every command uses for "which media items" (`run --media`, `enqueue`,
`jobs list --media`, the job API), and the SQL that resolves a selection against the library.

A selection is `all`, ids (`7`), ranges (`1-500`) and lists of them (`3,5,9,20-40`). Ranges apply to
integer ids; a library whose ids are text or UUIDs (`library.id_type`) lists them one by one, and a range
there is a usage error (exit code 2). Ids are resolved against the gallery's media table as discovered
(core.db.gallery: its prefix, schema and column names). Nothing here materializes a range:
a selection is a few bounds and the ids that were typed, and it is resolved in SQL, page by page, so
`1-20000000` costs what the matching rows cost. Every bad value is a `ValidationError`
(`validation.payload`, or `validation.media_missing` for ids the library does not have) with a one-line
message. This module must not import Dagster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, false, func, or_, select, true

from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.ids import IdType, normalize_uuid

# SQLite's and PostgreSQL's BIGINT: an id beyond it cannot exist in either.
MAX_ID = 2**63 - 1
PAGE = 5_000
_IN_CHUNK = 500
_SHOWN = 10
_HELP = "give ids (7), ranges (1-500), lists (3,5,9) or all"
_INT = re.compile(r"\d+")
_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_NEGATIVE = re.compile(r"-\s*\d+")


def _bad(message: str) -> ValidationError:
    return ValidationError(message, code="validation.payload")


def _as_id(digits: str, token: str) -> int:
    value = int(digits)
    if value < 1:
        raise _bad(f"media ids are positive integers, got {token!r}")
    if value > MAX_ID:
        raise _bad(f"media id {token!r} is out of range (largest possible id: {MAX_ID})")
    return value


@dataclass(frozen=True)
class MediaSelection:
    """A parsed selection: everything, or merged inclusive ranges plus ids listed one by one."""

    everything: bool = False
    ranges: tuple[tuple[int, int], ...] = ()
    ids: tuple[Any, ...] = ()
    text: str = field(default="all", compare=False)

    def __str__(self) -> str:
        return self.text

    @property
    def requested(self) -> int | None:
        """How many ids the selection names (None for `all`), counted without listing them."""
        if self.everything:
            return None
        return sum(high - low + 1 for low, high in self.ranges) + len(self.ids)

    def where(self, column: Any) -> ColumnElement[bool]:
        """The SQL condition `column` in the selection (BETWEEN per range, IN for the listed ids)."""
        if self.everything:
            return true()
        parts: list[ColumnElement[bool]] = [column.between(low, high) for low, high in self.ranges]
        for start in range(0, len(self.ids), _IN_CHUNK):
            parts.append(column.in_(self.ids[start:start + _IN_CHUNK]))
        return or_(*parts) if parts else false()

    def iter_ids(self, conn_or_engine: Connection | Engine, *, page: int = PAGE) -> Iterator[Any]:
        """The library's media ids in the selection, ascending, read `page` rows at a time (keyset paging)."""
        media_id = media_id_column(conn_or_engine)
        last: Any = None
        while True:
            q = select(media_id).where(self.where(media_id))
            if last is not None:
                q = q.where(media_id > last)
            q = q.order_by(media_id).limit(page)
            rows = _scalars(conn_or_engine, q)
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1]

    def iter_pages(self, conn_or_engine: Connection | Engine, *, page: int = PAGE) -> Iterator[list[Any]]:
        """iter_ids in lists of at most `page` ids (one query each)."""
        batch: list[Any] = []
        for media_id in self.iter_ids(conn_or_engine, page=page):
            batch.append(media_id)
            if len(batch) >= page:
                yield batch
                batch = []
        if batch:
            yield batch

    def check(self, conn_or_engine: Connection | Engine) -> SelectionCheck:
        """Validate against the library: listed ids it lacks are an error (`validation.media_missing`), so
        is a selection with no media at all; ids a range names but the library lacks are only counted."""
        media_id = media_id_column(conn_or_engine)
        found = int(_scalars(conn_or_engine, select(func.count()).select_from(media_id.table)
                             .where(self.where(media_id)))[0])
        missing: list[Any] = []
        for start in range(0, len(self.ids), _IN_CHUNK):
            chunk = self.ids[start:start + _IN_CHUNK]
            have = set(_scalars(conn_or_engine, select(media_id).where(media_id.in_(chunk))))
            missing.extend(i for i in chunk if i not in have)
        if missing:
            shown = ", ".join(str(i) for i in missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more"
                                                                  if len(missing) > _SHOWN else "")
            raise ValidationError(f"no media row with id {shown} ({len(missing)} of the {len(self.ids)} id(s) "
                                  f"listed in {self.text!r}); nothing was done", code="validation.media_missing",
                                  details={"missing": [str(i) for i in missing[:100]], "count": len(missing)})
        if found == 0:
            where = "the library has no media" if self.everything else f"no media row in {self.text!r}"
            raise ValidationError(f"{where}; nothing was done", code="validation.media_missing")
        not_in_ranges = 0 if self.everything else (self.requested or 0) - found
        return SelectionCheck(selection=self, found=found, missing_in_ranges=not_in_ranges)


@dataclass(frozen=True)
class SelectionCheck:
    """What a selection matched in the library."""

    selection: MediaSelection
    found: int
    missing_in_ranges: int = 0

    def note(self) -> str | None:
        """A line for the user when ranges named ids the library does not have (None otherwise)."""
        if not self.missing_in_ranges:
            return None
        return (f"note: {self.missing_in_ranges:,} id(s) in {self.selection.text!r} have no media row; "
                f"{self.found:,} media item(s) selected")


def media_id_column(conn_or_engine: Connection | Engine) -> Any:
    """The id column of the gallery's media table, as discovered for this engine (with its mapping)."""
    from ollama_pipeline.core.db.gallery import require_gallery

    engine = conn_or_engine.engine if isinstance(conn_or_engine, Connection) else conn_or_engine
    return require_gallery(engine)["media"].c("id")


def id_type(conn_or_engine: Connection | Engine) -> IdType:
    """integer, text or uuid: the type of the gallery's media ids (library.id_type, else reflected)."""
    from ollama_pipeline.core.db.gallery import require_gallery

    engine = conn_or_engine.engine if isinstance(conn_or_engine, Connection) else conn_or_engine
    return require_gallery(engine).id_type


def as_library_ids(engine: Engine, ids: Iterable[Any]) -> list[Any]:
    """The ids as the gallery's type (int for integer ids, str for text and UUID ids), duplicates dropped,
    in order; an id of the wrong type is a `validation.payload` error."""
    integer = id_type(engine) == "integer"
    out: list[Any] = []
    for value in ids:
        if integer:
            if isinstance(value, bool):
                raise _bad(f"media ids of this library are integers, got {value!r}")
            try:
                out.append(int(value))
            except (TypeError, ValueError):
                raise _bad(f"media ids of this library are integers, got {value!r}") from None
        else:
            out.append(str(value))
    return list(dict.fromkeys(out))


def _scalars(conn_or_engine: Connection | Engine, query: Any) -> list[Any]:
    if isinstance(conn_or_engine, Connection):
        return list(conn_or_engine.execute(query).scalars())
    with conn_or_engine.connect() as conn:
        return list(conn.execute(query).scalars())


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def parse_media_selection(spec: str | Iterable[str] | None, *, integer_ids: bool = True,
                          default_all: bool = False, kind: IdType | None = None) -> MediaSelection:
    """Parse `7`, `1-500`, `3,5,9`, `all` (or several such arguments) into a MediaSelection.

    None means "not given": `all` when default_all, else an error. An empty or blank value is always an
    error (never "everything"). With integer_ids=False (or kind text/uuid) the library's ids are text: each
    token is one id and ranges are refused; with kind uuid every token must be a UUID (kept in its
    canonical lower-case form).
    """
    if kind is not None:
        integer_ids = kind == "integer"
    if spec is None:
        if default_all:
            return MediaSelection(everything=True, text="all")
        raise _bad(f"no media selection given; {_HELP}")
    specs = [spec] if isinstance(spec, str) else list(spec)
    text = ",".join(s.strip() for s in specs)
    tokens = [t.strip() for s in specs for t in s.split(",")]
    if not any(tokens):
        raise _bad(f"empty media selection; {_HELP}")
    ranges: list[tuple[int, int]] = []
    listed: list[Any] = []
    for token in tokens:
        if not token:
            continue  # "3,,5": a doubled comma is a typo, not a request for everything
        if token.lower() == "all":
            return MediaSelection(everything=True, text="all")
        if not integer_ids:
            if _RANGE.fullmatch(token):
                raise _bad(f"{token!r}: ranges apply to integer ids; this library's ids are "
                           f"{'UUIDs' if kind == 'uuid' else 'text'}: list them (a,b,c) or give all")
            if kind == "uuid":
                canonical = normalize_uuid(token)
                if canonical is None:
                    raise _bad(f"{token!r} is not a UUID; this library's media ids are UUIDs")
                token = canonical
            listed.append(token)
            continue
        if _INT.fullmatch(token):
            listed.append(_as_id(token, token))
            continue
        match = _RANGE.fullmatch(token)
        if match:
            low, high = _as_id(match.group(1), token), _as_id(match.group(2), token)
            if low > high:
                raise _bad(f"range {token!r} runs backwards; write {high}-{low}")
            ranges.append((low, high))
            continue
        if _NEGATIVE.fullmatch(token):
            raise _bad(f"media ids are positive integers, got {token!r}")
        raise _bad(f"{token!r} is not a media id; {_HELP}")
    merged = _merge(ranges)
    if integer_ids:
        ids: list[Any] = sorted({i for i in listed if not any(low <= i <= high for low, high in merged)})
    else:
        ids = list(dict.fromkeys(listed))
    return MediaSelection(ranges=tuple(merged), ids=tuple(ids), text=text)


def parse_for_library(spec: str | Iterable[str] | None, engine: Engine, *,
                      default_all: bool = False) -> MediaSelection:
    """parse_media_selection for this engine's gallery: its id type decides whether ranges apply."""
    if spec is None and default_all:
        return MediaSelection(everything=True, text="all")
    return parse_media_selection(spec, default_all=default_all, kind=id_type(engine))


def selection_of_ids(ids: Iterable[Any]) -> MediaSelection:
    """A selection of exactly these ids (from code, e.g. the job API), listed."""
    listed = tuple(dict.fromkeys(ids))
    return MediaSelection(ids=listed, text=",".join(str(i) for i in listed) or "none")


# ---- plain numeric options -------------------------------------------------------------------------


def positive_int(value: str | int, name: str) -> int:
    """An integer ≥ 1 for an option such as --concurrency or --limit (validation.payload otherwise)."""
    return _bounded_int(value, name, 1)


def non_negative_int(value: str | int, name: str) -> int:
    """An integer ≥ 0 (validation.payload otherwise)."""
    return _bounded_int(value, name, 0)


def _bounded_int(value: str | int, name: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _bad(f"{name} must be an integer, got {value!r}") from None
    if number < minimum or number > MAX_ID:
        raise _bad(f"{name} must be at least {minimum}, got {value!r}")
    return number


def parse_job_types(spec: str | Iterable[str], *, also: tuple[str, ...] = ()) -> list[str]:
    """Job types from `caption,title` or `ollama_caption` (short names without `ollama_`), in order;
    `validation.job_type` for an unknown one, `validation.payload` for an empty value. `also` names
    accepted as they are (the `media` asset for `run --stages`)."""
    from ollama_pipeline.core.stages import STAGES

    specs = [spec] if isinstance(spec, str) else list(spec)
    names = [t.strip() for s in specs for t in s.split(",") if t.strip()]
    if not names:
        raise _bad(f"empty stage list; known: {', '.join(STAGES)}")
    chosen: list[str] = []
    for name in names:
        job_type = name if name in STAGES or name in also else f"ollama_{name}"
        if job_type not in STAGES and job_type not in also:
            raise ValidationError(f"unknown job type {name!r}; known: {', '.join(STAGES)}",
                                  code="validation.job_type")
        chosen.append(job_type)
    return list(dict.fromkeys(chosen))
