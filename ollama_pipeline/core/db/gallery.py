"""The gallery's schema as it is: discovered by reflection, completed by the `library:` mapping, checked.

The seed names tables and a few columns (§1, §2); a real gallery (LocalSupervisor, or another one) has its
own column names, its own `media_meta` layout and columns the seed never mentions. At start-up the
pipeline reflects the tables (SQLite and PostgreSQL), maps each *logical* column the pipeline knows onto the
column that is there (the profile's names, then the `library.columns` mapping, then the logical name), and
builds its statements from the reflected `Table` objects. Only what the seed requires must exist; every
other column is used when present and left alone when not.

`check_gallery` reports what will be read and written, what is missing, and the exact mapping line or SQL
that fixes each gap (`ollama-pipeline check-db`). A missing required column stops every command with that
report (`SchemaCheckError`, exit code 2), never with a database traceback.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Column, Engine, MetaData, Table, Uuid, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from ollama_pipeline.core.config import LibraryConfig
from ollama_pipeline.core.errors import PersistenceError, ValidationError
from ollama_pipeline.core.ids import IdType, id_type_of

LOCALSUPERVISOR = "localsupervisor"
PIPELINE = "pipeline"
CUSTOM = "custom"

# LocalSupervisor's migrations that made the columns this profile relies on (SCRIPTS/migrations in
# github noliv3/LocalSupervisor): media_meta (005), media_tags.locked (006), lifecycle events (007),
# tags unique on (name, type) (009), jobs control fields (012, 014-016).
LOCALSUPERVISOR_MIGRATIONS = ("005_media_meta_and_video_meta", "006_add_media_tags_locked",
                              "007_prompt_history_and_lifecycle", "009_tags_name_type_unique")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    required: bool = False
    writes: bool = False  # the pipeline writes this column (when present and allowed)
    sql_type: str = "TEXT"  # used by `init-db --add-optional-columns` and in the fix hints


@dataclass(frozen=True)
class TableSpec:
    name: str
    required: bool
    columns: tuple[ColumnSpec, ...]
    purpose: str


def _c(name: str, required: bool = False, writes: bool = False, sql_type: str = "TEXT") -> ColumnSpec:
    return ColumnSpec(name, required, writes, sql_type)


# What the pipeline knows, by logical name. `required` columns must exist when the table is used at all.
TABLES: tuple[TableSpec, ...] = (
    TableSpec("media", True, (
        _c("id", True, sql_type="INTEGER"), _c("path", True), _c("type"), _c("width", sql_type="INTEGER"),
        _c("height", sql_type="INTEGER"), _c("rating", sql_type="INTEGER"), _c("has_nsfw", sql_type="INTEGER"),
        _c("hash"), _c("status"), _c("quality_status", writes=True), _c("quality_score", writes=True, sql_type="REAL"),
        _c("updated_at", writes=True)), "the media items (§1): file path and facts"),
    TableSpec("prompts", False, (
        _c("id", sql_type="INTEGER"), _c("media_id", True, sql_type="INTEGER"), _c("prompt"), _c("negative_prompt"),
        _c("model"), _c("sampler"), _c("seed"), _c("size"), _c("width", sql_type="INTEGER"),
        _c("height", sql_type="INTEGER")), "generation prompts (§1)"),
    TableSpec("tags", False, (
        _c("id", True, sql_type="INTEGER"), _c("name", True, writes=True), _c("type", writes=True),
        _c("locked", sql_type="INTEGER"), _c("created_at", writes=True)), "tag names (§1 input, §2 optional output)"),
    TableSpec("media_tags", False, (
        _c("media_id", True, writes=True, sql_type="INTEGER"), _c("tag_id", True, writes=True, sql_type="INTEGER"),
        _c("locked", sql_type="INTEGER"), _c("confidence", writes=True, sql_type="REAL"),
        _c("weight", writes=True, sql_type="REAL"), _c("source", writes=True), _c("created_at", writes=True)),
        "links of media to tags (§1 input, §2 optional output)"),
    TableSpec("scan_results", False, (
        _c("id", sql_type="INTEGER"), _c("media_id", True, sql_type="INTEGER"), _c("scanner"),
        _c("nsfw_score", sql_type="REAL"), _c("flags"), _c("raw_json"), _c("created_at")), "scanner results (§1)"),
    TableSpec("media_meta", True, (
        _c("id", sql_type="INTEGER"), _c("media_id", True, writes=True, sql_type="INTEGER"),
        _c("key", True, writes=True), _c("value", True, writes=True), _c("source", writes=True),
        _c("created_at", writes=True), _c("updated_at", writes=True)), "the Ollama results (§2), as text"),
    TableSpec("media_lifecycle_events", False, (
        _c("media_id", True, writes=True, sql_type="INTEGER"), _c("event_type", True, writes=True),
        _c("old_value", writes=True), _c("new_value", writes=True), _c("source", writes=True),
        _c("details", writes=True), _c("from_status", writes=True), _c("to_status", writes=True),
        _c("quality_status", writes=True), _c("quality_score", writes=True, sql_type="REAL"),
        _c("rule", writes=True), _c("reason", writes=True), _c("actor", writes=True),
        _c("created_at", writes=True)), "an event when quality or policy changed (§2)"),
    TableSpec("audit_log", False, (
        _c("action", True, writes=True), _c("actor", writes=True), _c("entity_type", writes=True),
        _c("entity_id", writes=True), _c("old_value", writes=True), _c("new_value", writes=True),
        _c("details", writes=True), _c("details_json", writes=True), _c("actor_key", writes=True),
        _c("job_id", writes=True, sql_type="INTEGER"), _c("created_at", writes=True)),
        "an audit row for status and policy changes (§5)"),
)
SPECS = {t.name: t for t in TABLES}

# The optional gallery columns `init-db --add-optional-columns` may add (never media_meta, lifecycle or audit
# columns: those tables are written in their own layout).
ADDABLE: dict[str, tuple[str, ...]] = {
    "media": ("quality_status", "quality_score", "updated_at"),
    "tags": ("created_at",),
    "media_tags": ("confidence", "weight", "created_at"),
}

# Column names of LocalSupervisor's schema where they differ from the logical ones (DB/schema.sql).
PROFILE_COLUMNS: dict[str, dict[str, dict[str, str]]] = {
    LOCALSUPERVISOR: {"media_meta": {"key": "meta_key", "value": "meta_value"},
                      "scan_results": {"created_at": "run_at"}},
}
PROFILE_QUALITY: dict[str, dict[str, str]] = {
    # the data contract's quality_status vocabulary: unknown, ok, review, blocked
    LOCALSUPERVISOR: {"ok": "ok", "needs_review": "review", "rejected": "blocked"},
}


class SchemaCheckError(ValidationError):
    """A required table or column is missing: the check-db report says what and how to fix it."""

    def __init__(self, message: str, report: CheckReport) -> None:
        super().__init__(message, code="validation.schema_missing")
        self.report = report


@dataclass
class Finding:
    level: Literal["ok", "info", "warning", "error"]
    table: str
    column: str | None
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "table": self.table, "column": self.column, "message": self.message,
                "fix": self.fix}


@dataclass
class CheckReport:
    profile: str
    dialect: str
    schema: str | None
    findings: list[Finding] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "profile": self.profile, "dialect": self.dialect, "schema": self.schema,
                "tables": self.tables, "findings": [f.as_dict() for f in self.findings]}

    def render(self) -> str:
        lines = [f"library profile: {self.profile} ({self.dialect}{', schema ' + self.schema if self.schema else ''})"]
        for name, info in self.tables.items():
            if not info.get("present"):
                lines.append(f"  {name}: not present ({info.get('purpose')})")
                continue
            lines.append(f"  {info['physical']}: reads {', '.join(info['reads']) or '-'}; "
                         f"writes {', '.join(info['writes']) or '-'}")
            ids = info.get("id_type") if info.get("id_type") != "integer" else None
            extra = [f"{k}: {v}" for k, v in (("ids", ids), ("layout", info.get("layout")),
                                               ("unique", info.get("unique")), ("defaults", info.get("defaults")), ("collations", info.get("collations")),
                                               ("tag links", info.get("origin")),
                                               ("quality_status", info.get("quality_status_vocabulary"))) if v]
            if extra:
                lines.append("    " + "; ".join(extra))
        for f in self.findings:
            if f.level == "ok":
                continue
            where = f.table + (f".{f.column}" if f.column else "")
            lines.append(f"{f.level}: {where}: {f.message}")
            if f.fix:
                lines.append(f"  fix: {f.fix}")
        lines.append("check-db: OK" if self.ok else "check-db: FAILED (a required table or column is missing)")
        return "\n".join(lines)


@dataclass
class GalleryTable:
    """One gallery table as reflected: logical column name -> the Column that is there."""

    name: str
    table: Table
    cols: dict[str, Column[Any]]
    writable: set[str]

    def c(self, logical: str) -> Column[Any]:
        return self.cols[logical]

    def has(self, logical: str) -> bool:
        return logical in self.cols

    def may_write(self, logical: str) -> bool:
        return logical in self.cols and logical in self.writable


@dataclass
class Gallery:
    """The discovered gallery: its tables, profile, media_meta layout, value format and vocabularies."""

    profile: str
    dialect: str
    tables: dict[str, GalleryTable]
    meta_layout: Literal["upsert", "append_log"]
    value_format: Literal["json", "localsupervisor"]
    text_keys: frozenset[str]
    quality_map: dict[str, str]
    tag_unique: tuple[str, ...]
    tag_origin: str | None  # the media_tags column that says who made a link, when the gallery has one
    report: CheckReport
    id_type: IdType = "integer"  # of media.id: integer, text or uuid (library.id_type, else reflected)

    @property
    def integer_ids(self) -> bool:
        return self.id_type == "integer"

    def t(self, name: str) -> GalleryTable | None:
        return self.tables.get(name)

    def __getitem__(self, name: str) -> GalleryTable:
        return self.tables[name]


def _qualify(name: str, prefix: str) -> str:
    return f"{prefix}{name}"


def _detect_profile(engine: Engine, names: set[str], schema: str | None) -> str:
    if "schema_migrations" in names:
        try:
            with engine.connect() as conn:
                meta = MetaData()
                table = Table("schema_migrations", meta, autoload_with=conn, schema=schema)
                if "version" in table.c:
                    versions = {str(r[0]) for r in conn.execute(select(table.c.version))}
                    if set(LOCALSUPERVISOR_MIGRATIONS) <= versions:
                        return LOCALSUPERVISOR
        except SQLAlchemyError:
            pass
    return PIPELINE


def _uuid_as_text(_inspector: Any, _table: Table, column: dict[str, Any]) -> None:
    """Reflect UUID columns so their values are canonical text (a media id is an int or a str)."""
    if id_type_of(column["type"]) == "uuid":
        column["type"] = Uuid(as_uuid=False)


def _unique_sets(insp: Any, table: str, schema: str | None) -> list[tuple[str, ...]]:
    sets: list[tuple[str, ...]] = []
    try:
        pk = insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
        if pk:
            sets.append(tuple(pk))
        for uc in insp.get_unique_constraints(table, schema=schema):
            sets.append(tuple(uc["column_names"]))
        for ix in insp.get_indexes(table, schema=schema):
            if ix.get("unique") and all(ix.get("column_names") or [None]):
                sets.append(tuple(ix["column_names"]))
    except (SQLAlchemyError, NotImplementedError):
        pass
    return sets


def discover(engine: Engine, library: LibraryConfig) -> Gallery:
    """Reflect the gallery's tables and build the Gallery (with its check report); never raises for gaps."""
    schema = library.schema_name
    insp = inspect(engine)
    try:
        names = set(insp.get_table_names(schema=schema))
    except SQLAlchemyError as exc:
        raise PersistenceError(f"cannot read the database's tables: {type(exc).__name__}",
                               code="persistence.db") from None
    profile = library.profile
    if profile == "auto":
        profile = CUSTOM if (library.tables or library.columns or library.prefix) else _detect_profile(
            engine, names, schema)
    report = CheckReport(profile=profile, dialect=engine.dialect.name, schema=schema)
    tables: dict[str, GalleryTable] = {}
    metadata = MetaData()
    profile_cols = PROFILE_COLUMNS.get(profile, {})
    for spec in TABLES:
        physical = library.tables.get(spec.name) or _qualify(spec.name, library.prefix)
        info: dict[str, Any] = {"present": False, "physical": physical, "purpose": spec.purpose,
                                "reads": [], "writes": []}
        report.tables[spec.name] = info
        if physical not in names:
            level = "error" if spec.required else "info"
            mapping = f"library.tables.{spec.name}: <your table name>"
            report.findings.append(Finding(
                level, spec.name, None,
                f"table {physical!r} not found" + ("" if spec.required else f"; {spec.purpose} are not used"),
                fix=f"map it with `{mapping}`" + (" or run `ollama-pipeline init-db` on an empty database"
                                                  if spec.required else "")))
            continue
        table = Table(physical, metadata, autoload_with=engine, schema=schema,
                      listeners=[("column_reflect", _uuid_as_text)])
        info["present"] = True
        physical_cols = {c.name: c for c in table.columns}
        mapped = {**profile_cols.get(spec.name, {}), **library.columns.get(spec.name, {})}
        cols: dict[str, Column[Any]] = {}
        missing_required = []
        for col in spec.columns:
            name = mapped.get(col.name, col.name)
            if name in physical_cols:
                cols[col.name] = physical_cols[name]
                continue
            if col.required:
                missing_required.append(col)
        allowed = library.writable.get(spec.name)
        writable = {c.name for c in spec.columns if c.writes and (allowed is None or c.name in allowed)}
        for col in missing_required:
            report.findings.append(Finding(
                "error" if spec.required else "warning", spec.name, col.name,
                f"required column {col.name!r} not found in {physical} (columns there: "
                f"{', '.join(sorted(physical_cols))})" + ("" if spec.required else f"; {physical} is not used"),
                fix=f"library.columns.{spec.name}.{col.name}: <the column that holds it>   or   "
                    f"ALTER TABLE {physical} ADD COLUMN {mapped.get(col.name, col.name)} {col.sql_type};"))
        if missing_required and not spec.required:
            info["present"] = False
            continue
        for col in spec.columns:
            if col.name not in cols and not col.required:
                addable = col.name in ADDABLE.get(spec.name, ())
                report.findings.append(Finding(
                    "info", spec.name, col.name, f"optional column {col.name!r} not present: not used",
                    fix=(f"library.columns.{spec.name}.{col.name}: <column>" + (
                        "   or   ollama-pipeline init-db --add-optional-columns" if addable else ""))))
        info["reads"] = [f"{k}" + (f"={v.name}" if v.name != k else "") for k, v in cols.items()]
        info["writes"] = sorted(k for k in writable if k in cols)
        defaults = {k: str(c.server_default.arg) for k, c in cols.items() if k in writable and
                    c.server_default is not None and hasattr(c.server_default, "arg")}
        if defaults:
            info["defaults"] = defaults
        collations = {k: c.type.collation for k, c in cols.items() if getattr(c.type, "collation", None)}
        if collations:
            info["collations"] = collations
        uniques = _unique_sets(insp, physical, schema)
        info["unique"] = ", ".join("(" + ", ".join(u) + ")" for u in uniques) or None
        tables[spec.name] = GalleryTable(spec.name, table, cols, writable)
    meta = tables.get("media_meta")
    layout: Literal["upsert", "append_log"] = "upsert"
    if meta is not None:
        key_pair = {meta.c("media_id").name, meta.c("key").name} if meta.has("key") else set()
        uniques = _unique_sets(insp, meta.table.name, schema)
        has_unique = any(set(u) == key_pair for u in uniques)
        wanted = library.media_meta_layout
        if wanted == "auto":
            layout = "upsert" if has_unique else "append_log"
        else:
            layout = wanted
        if layout == "upsert" and not has_unique:
            report.findings.append(Finding(
                "error", "media_meta", None, "layout 'upsert' needs a unique key on (media_id, key)",
                fix=f"library.media_meta_layout: append_log   or   CREATE UNIQUE INDEX uq_{meta.table.name}_key "
                    f"ON {meta.table.name} ({meta.c('media_id').name}, {meta.c('key').name});"))
        if layout == "append_log" and not meta.has("id"):
            report.findings.append(Finding(
                "error", "media_meta", "id", "layout 'append_log' needs an increasing id column to find the "
                "newest row per key", fix="library.columns.media_meta.id: <its autoincrement column>"))
        report.tables["media_meta"]["layout"] = layout + (
            " (newest row per key wins; a new row only when the value changed)" if layout == "append_log" else
            " (one row per media_id and key)")
    tags = tables.get("tags")
    tag_unique: tuple[str, ...] = ("name",)
    if tags is not None and tags.has("type"):
        uniques = _unique_sets(insp, tags.table.name, schema)
        if any(set(u) == {tags.c("name").name, tags.c("type").name} for u in uniques):
            tag_unique = ("name", "type")
    links = tables.get("media_tags")
    origin = library.tag_origin_column
    if origin is None and links is not None and links.has("source") and profile != LOCALSUPERVISOR:
        origin = links.c("source").name
    if origin is not None and (links is None or origin not in links.table.c):
        report.findings.append(Finding("error", "media_tags", origin, "the tag origin column is not there",
                                       fix="library.tag_origin_column: null   (links are then tracked in "
                                           "ollama_tag_links)"))
        origin = None
    if links is not None:
        report.tables["media_tags"]["origin"] = (
            f"column {origin}" if origin else "tracked in the pipeline's own table ollama_tag_links")
    value_format = library.value_format
    if value_format == "auto":
        value_format = "localsupervisor" if profile == LOCALSUPERVISOR else "json"
    quality_map = {**PROFILE_QUALITY.get(profile, {}), **library.quality_status}
    if quality_map:
        report.tables["media"]["quality_status_vocabulary"] = quality_map
    text_keys = frozenset(k for k, v in library.values.items() if v == "text")
    media = tables.get("media")
    id_type: IdType = "integer"
    if library.id_type != "auto":
        id_type = library.id_type
    elif media is not None and media.has("id"):
        id_type = id_type_of(media.c("id").type)
    if media is not None:
        report.tables["media"]["id_type"] = id_type + (
            "" if id_type == "integer" else " (partitions are hash buckets; --media lists ids, no ranges)")
    for name, info in report.tables.items():
        if info.get("present"):
            report.findings.append(Finding("ok", name, None, "present"))
    return Gallery(profile=profile, dialect=engine.dialect.name, tables=tables, meta_layout=layout,
                   value_format=value_format, text_keys=text_keys, quality_map=quality_map, tag_unique=tag_unique,
                   tag_origin=origin, report=report, id_type=id_type)


_lock = threading.Lock()
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines holding a discovered gallery


def _store(engine: Engine) -> dict[str, Gallery]:
    """The galleries discovered for this engine, kept on the engine itself (gone with it)."""
    store = getattr(engine, "_ollama_galleries", None)
    if store is None:
        store = {}
        engine._ollama_galleries = store  # type: ignore[attr-defined]
        _engines.add(engine)
    return store


def gallery_for(engine: Engine, library: LibraryConfig | None = None, *, refresh: bool = False) -> Gallery:
    """The discovered gallery of this engine (reflected once per engine and mapping)."""
    library = library or getattr(engine, "_ollama_library", None) or LibraryConfig()
    key = json.dumps(library.model_dump(mode="json"), sort_keys=True)
    with _lock:
        found = None if refresh else _store(engine).get(key)
    if found is None:
        found = discover(engine, library)
        if found.report.ok:  # a gap is looked at again on next use (after init-db, or a fixed mapping)
            with _lock:
                _store(engine)[key] = found
    return found


def bind_library(engine: Engine, library: LibraryConfig) -> None:
    """Remember the mapping for this engine (used by gallery_for without an explicit mapping)."""
    engine._ollama_library = library  # type: ignore[attr-defined]


def forget(engine: Engine) -> None:
    """Reflect again on next use (after init-db created or altered tables)."""
    with _lock:
        _store(engine).clear()


def forget_all() -> None:
    """Reflect again on next use, for every engine (tests that drop and recreate tables)."""
    with _lock:
        for engine in list(_engines):
            _store(engine).clear()


def require_gallery(engine: Engine, library: LibraryConfig | None = None) -> Gallery:
    """The gallery, or SchemaCheckError with the check-db report when a required column is missing."""
    gallery = gallery_for(engine, library)
    if not gallery.report.ok:
        raise SchemaCheckError("the gallery database lacks what the pipeline needs:\n" + gallery.report.render(),
                               gallery.report)
    return gallery
