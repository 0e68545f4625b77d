"""SQLAlchemy 2 models of the gallery tables the seed names (§1, §2) and of the pipeline's own tables.

Gallery tables (`media`, `prompts`, `tags`, `media_tags`, `scan_results`, `media_meta`,
`media_lifecycle_events`, `audit_log`) are used as they are when a gallery database already has them.
The pipeline's own tables are prefixed `ollama_`. This module defines tables only, no queries.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ollama_pipeline.core.ids import MediaIdType


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Media(Base):
    __tablename__ = "media"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    type: Mapped[str] = mapped_column(String(32), default="image")
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    rating: Mapped[int | None] = mapped_column(Integer)
    has_nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    hash: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32), default="active")
    quality_status: Mapped[str | None] = mapped_column(String(32))
    quality_score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    media_id: Mapped[int] = mapped_column(ForeignKey("media.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[str | None] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(255))
    sampler: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    size: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MediaTag(Base):
    __tablename__ = "media_tags"

    media_id: Mapped[int] = mapped_column(ForeignKey("media.id", ondelete="CASCADE"), primary_key=True)
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    confidence: Mapped[float | None] = mapped_column(Float)
    weight: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(32), default="human")  # human | import | ollama
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ScanResult(Base):
    __tablename__ = "scan_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    media_id: Mapped[int] = mapped_column(ForeignKey("media.id", ondelete="CASCADE"), index=True)
    scanner: Mapped[str | None] = mapped_column(String(64))
    nsfw_score: Mapped[float | None] = mapped_column(Float)
    flags: Mapped[str | None] = mapped_column(Text)  # JSON text: list of strings
    raw_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MediaMeta(Base):
    __tablename__ = "media_meta"
    __table_args__ = (UniqueConstraint("media_id", "key", name="uq_media_meta_media_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    media_id: Mapped[int] = mapped_column(ForeignKey("media.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str | None] = mapped_column(Text)  # JSON text
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class MediaLifecycleEvent(Base):
    __tablename__ = "media_lifecycle_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    media_id: Mapped[int] = mapped_column(ForeignKey("media.id", ondelete="CASCADE"), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[str | None] = mapped_column(Text)  # JSON text
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(64))
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    details: Mapped[str | None] = mapped_column(Text)  # JSON text
    job_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# ---- the pipeline's own tables -------------------------------------------------------------------


class OllamaJob(Base):
    """A unit of work of the job API (§3). At most one queued/running job per (job_type, media_id)."""

    __tablename__ = "ollama_jobs"
    __table_args__ = (
        Index(
            "uq_ollama_jobs_active",
            "job_type",
            "media_id",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_ollama_jobs_status_priority", "status", "priority", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_type: Mapped[str] = mapped_column(String(64))
    media_id: Mapped[int] = mapped_column(MediaIdType, index=True)
    payload: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed|cancelled
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(128))
    run_id: Mapped[str | None] = mapped_column(String(64))
    error_channel: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    retryable: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class OllamaStageResult(Base):
    """Provenance per media item and stage: what produced the stored answer, and the last outcome."""

    __tablename__ = "ollama_stage_results"

    media_id: Mapped[int] = mapped_column(MediaIdType, ForeignKey("media.id", ondelete="CASCADE"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # ok | failed
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    model_digest: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(128))
    error_channel: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    retryable: Mapped[bool | None] = mapped_column(Boolean)
    prompt_eval_count: Mapped[int | None] = mapped_column(Integer)
    eval_count: Mapped[int | None] = mapped_column(Integer)
    total_duration_ms: Mapped[float | None] = mapped_column(Float)
    load_duration_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    job_id: Mapped[int | None] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(String(64))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class OllamaMediaIndex(Base):
    """Cheap per-file facts computed by the `media` asset: content hash and perceptual hash."""

    __tablename__ = "ollama_media_index"

    media_id: Mapped[int] = mapped_column(MediaIdType, ForeignKey("media.id", ondelete="CASCADE"), primary_key=True)
    content_sha256: Mapped[str] = mapped_column(String(64))
    dhash: Mapped[str | None] = mapped_column(String(16), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class OllamaValue(Base):
    """The pipeline's copy of what it wrote per media item and key: the full value (canonical JSON of its
    stored schema; NULL for a key derived for the gallery's panel) and the exact text written into the
    gallery's media_meta, so a later different value there is recognised as a person's edit."""

    __tablename__ = "ollama_values"

    media_id: Mapped[int] = mapped_column(MediaIdType, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text)
    written: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class OllamaTagLink(Base):
    """The media_tags links the pipeline made, for galleries without an origin column: a re-run removes only
    these when they are stale; every other link belongs to people or importers."""

    __tablename__ = "ollama_tag_links"

    media_id: Mapped[int] = mapped_column(MediaIdType, primary_key=True)
    tag_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


GALLERY_TABLES = ("media", "prompts", "tags", "media_tags", "scan_results", "media_meta",
                  "media_lifecycle_events", "audit_log")
PIPELINE_TABLES = ("ollama_jobs", "ollama_stage_results", "ollama_media_index", "ollama_values", "ollama_tag_links")


class OllamaRunHeartbeat(Base):
    """One row per pipeline run (a Dagster run or a CLI run), renewed while it works: a row still `running`
    whose heartbeat is older than four of its intervals belongs to a killed process (see core.queue.heartbeats)."""

    __tablename__ = "ollama_run_heartbeats"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|ended|failed
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    interval_s: Mapped[float] = mapped_column(Float, default=10.0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    reason: Mapped[str | None] = mapped_column(Text)


class OllamaBackfillSelection(Base):
    """A targeted backfill's question and answer (core.backfill): the `--where` clauses, the stages it
    materializes, how many items and partitions it holds, and the Dagster backfill that was launched."""

    __tablename__ = "ollama_backfill_selections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    where_text: Mapped[str] = mapped_column(Text)  # the clauses as given, one per line
    stages: Mapped[str] = mapped_column(Text)  # JSON list of asset names
    items: Mapped[int] = mapped_column(Integer, default=0)
    partitions: Mapped[int] = mapped_column(Integer, default=0)
    backfill_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="cli")  # cli | web | bench
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class OllamaBackfillItem(Base):
    """One member of a stored selection: what the backfill's runs restrict their partitions to."""

    __tablename__ = "ollama_backfill_items"

    selection_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    media_id: Mapped[int] = mapped_column(MediaIdType, primary_key=True)
