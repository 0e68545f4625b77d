"""Configuration (§4): one pydantic model, read once from YAML plus environment overrides.

The `ollama` section holds the seed's keys plus what several hosts and a real model server need
(`hosts`, `keep_alive`, `num_ctx`, `warm_up`). Everything else the pipeline adds lives under `database`,
`media_root`, `logs_dir` and `pipeline`. Environment variables override the file:
`OLLAMA_PIPELINE__OLLAMA__BASE_URL=...` sets `ollama.base_url` (double underscore separates levels).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

from ollama_pipeline.core.errors import ConfigError

CONFIG_ENV = "OLLAMA_PIPELINE_CONFIG"
DEFAULT_CONFIG_FILE = "ollama_pipeline.yaml"
DEMO_CONFIG_FILE = "demo/ollama_pipeline.yaml"  # written by `ollama-pipeline demo`
ENV_PREFIX = "OLLAMA_PIPELINE__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    default: str = Field(min_length=1, description="Model used when no vision/text model is set.")


class RetryConfig(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff_ms: int = Field(default=500, ge=0, le=600_000)


class DeterministicConfig(_Strict):
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    seed: int = Field(default=12345)


class OllamaHostConfig(_Strict):
    """One more Ollama server (`ollama.hosts`); an entry whose base_url is `ollama.base_url` configures the first."""

    base_url: HttpUrl
    weight: float = Field(default=1.0, gt=0.0, le=1000.0, description="Share of the items this host gets.")
    parallel: int | None = Field(default=None, ge=1, le=256,
                                 description="Calls at once (the host's OLLAMA_NUM_PARALLEL); default: "
                                             "pipeline.concurrency.")
    models: list[str] | None = Field(default=None, description="Models it serves (default: every model).")

    @property
    def host(self) -> str:
        return str(self.base_url).rstrip("/")


_DURATION = r"^(-1|0|\d+(\.\d+)?(ns|us|ms|s|m|h)(\d+(\.\d+)?(ns|us|ms|s|m|h))*)$"


class OllamaConfig(_Strict):
    """The seed's `ollama.*` keys, plus more hosts and the runner settings of a run."""

    base_url: HttpUrl
    model: ModelConfig
    timeout_ms: int = Field(ge=100, le=3_600_000)
    max_image_bytes: int = Field(ge=10_000, le=100_000_000)
    vision_model: str | None = None
    text_model: str | None = None
    retry: RetryConfig = RetryConfig()
    deterministic: DeterministicConfig = DeterministicConfig()
    hosts: list[OllamaHostConfig] = Field(default_factory=list, max_length=64)
    keep_alive: str = Field(default="2h", pattern=_DURATION,
                            description="How long Ollama keeps a model loaded after a call (Go duration; -1 = "
                                        "for ever). Ollama's default is 5m, shorter than a pause in a long run.")
    num_ctx: int | None = Field(default=None, ge=512, le=1_048_576,
                                description="Context size sent with every call of a run; default 8192, the "
                                            "largest request (two images + prompt + answer).")
    warm_up: bool = Field(default=True, description="Load each model with one empty call before a run starts.")

    def model_for(self, kind: Literal["vision", "text"]) -> str:
        """The seed's fallback chain: vision_model/text_model, else model.default."""
        chosen = self.vision_model if kind == "vision" else self.text_model
        return chosen or self.model.default

    @property
    def host(self) -> str:
        return str(self.base_url).rstrip("/")


class DatabaseConfig(_Strict):
    url: str = Field(min_length=1, description="SQLAlchemy URL of the gallery database.")
    busy_timeout_ms: int = Field(default=30_000, ge=0)
    lock_retries: int = Field(default=5, ge=0, le=50)


class QueueConfig(_Strict):
    max_queued: int = Field(default=100_000, ge=1)
    max_queued_per_type: int = Field(default=50_000, ge=1)
    max_enqueues_per_minute: int = Field(default=100_000, ge=1)
    lease_seconds: int = Field(default=300, ge=1)


class PipelineConfig(_Strict):
    """Switches and limits the pipeline adds to the seed."""

    concurrency: int = Field(default=4, ge=1, le=256, description="Model calls at once inside one run.")
    max_pixels: int = Field(default=1_048_576, ge=4096, description="Pixel budget of an image sent to the model.")
    repair_retries: int = Field(default=1, ge=0, le=3)
    combine_vision_stages: bool = Field(
        default=False, description="One model call per image answers every selected vision stage (each part "
        "validated against its own stage's schema; a failed part falls back to that stage's own request). "
        "Changing it re-runs the vision stages once (it is part of their fingerprints).")
    write_tags: bool = True
    write_quality_status: bool = True
    max_tags: int = Field(default=20, ge=1, le=200)
    duplicate_candidates: int = Field(default=3, ge=0, le=20)
    queue: QueueConfig = QueueConfig()
    slot_limiter_url: str | None = Field(
        default=None, description="PostgreSQL URL whose advisory locks hold each Ollama host to its slots "
                                  "across every worker process (core/limiter.py); default: per process only.")
    circuit_breaker: int = Field(default=5, ge=1, le=1000,
                                 description="A run stops after this many model calls in a row failed with a "
                                 "network error (after their retries); items not yet tried stay untouched.")
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=600,
                                     description="A running run renews its heartbeat this often; one silent for "
                                     "4 intervals is marked failed by the next run, sensor tick or `jobs`.")
    partition_size: int = Field(default=1000, ge=1, le=100_000,
                                description="Media items per Dagster partition: consecutive integer ids in blocks "
                                "of this size (text ids: hash buckets of about this size).")
    web_token: str | None = Field(default=None, description="Required by the web UI when bound off loopback.")
    dagster_ui_url: str = "http://127.0.0.1:3000"


class GalleryQueueLimits(_Strict):
    """Limits of a gallery's own job queue (LocalSupervisor's `jobs.queue_max_*`, same defaults)."""

    queue_max_total: int = Field(default=2000, ge=0)
    queue_max_per_type_default: int = Field(default=500, ge=0)
    queue_max_per_type: dict[str, int] = Field(default_factory=dict)
    queue_max_per_media: int = Field(default=2, ge=0)


class LibraryConfig(_Strict):
    """How the gallery's tables are laid out (`library:`); discovered by reflection, completed by this."""

    profile: Literal["auto", "pipeline", "localsupervisor", "custom"] = Field(
        default="auto", description="auto: LocalSupervisor when its schema_migrations lists its migrations, "
        "custom when tables/columns are mapped, else the pipeline's own schema.")
    schema_name: str | None = Field(default=None, alias="schema", description="PostgreSQL schema of the gallery.")
    prefix: str = Field(default="", description="Prefix of every gallery table name (e.g. 'gal_').")
    tables: dict[str, str] = Field(default_factory=dict, description="logical table -> table name")
    columns: dict[str, dict[str, str]] = Field(default_factory=dict, description="table -> logical -> column")
    id_type: Literal["auto", "integer", "text", "uuid"] = Field(
        default="auto", description="Type of media.id: integer (blocks of ids as partitions, ranges in --media), "
        "text or uuid (hash-bucket partitions, ids listed one by one); auto: from the reflected column type.")
    media_meta_layout: Literal["auto", "upsert", "append_log"] = "auto"
    value_format: Literal["auto", "json", "localsupervisor"] = "auto"
    values: dict[str, Literal["json", "text"]] = Field(
        default_factory=dict, description="per key: json (the stored schema as JSON text) or text (plain text "
        "of a text value such as ollama.caption)")
    tag_origin_column: str | None = Field(default=None, description="media_tags column naming a link's origin")
    quality_status: dict[Literal["ok", "needs_review", "rejected"], str] = Field(
        default_factory=dict, description="the pipeline's verdict -> the gallery's quality_status value")
    writable: dict[str, list[str]] = Field(
        default_factory=dict, description="table -> the logical columns the pipeline may write (default: all "
        "it knows)")

    jobs: GalleryQueueLimits = Field(default_factory=GalleryQueueLimits,
                                     description="limits of the gallery's own jobs table (LocalSupervisor)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("tables", "columns", "writable")
    @classmethod
    def _known_tables(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = ("media", "prompts", "tags", "media_tags", "scan_results", "media_meta", "media_lifecycle_events",
                 "audit_log")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return value


class Settings(_Strict):
    ollama: OllamaConfig
    database: DatabaseConfig
    media_root: Path
    logs_dir: Path = Path("LOGS")
    pipeline: PipelineConfig = PipelineConfig()
    library: LibraryConfig = LibraryConfig()

    @field_validator("media_root", "logs_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if path:
            _set_path(overrides, path, yaml.safe_load(raw) if raw else None)
    return overrides


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "missing":
            parts.append(f"required key '{key}' is missing")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"key '{key}': {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def config_path(env: dict[str, str] | None = None) -> Path:
    """$OLLAMA_PIPELINE_CONFIG, else ./ollama_pipeline.yaml, else the demo's (written by `make demo`), so
    every documented command works after `make demo` without a configuration of the user's."""
    env = dict(os.environ) if env is None else env
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    if not Path(DEFAULT_CONFIG_FILE).is_file() and Path(DEMO_CONFIG_FILE).is_file():
        return Path(DEMO_CONFIG_FILE)
    return Path(DEFAULT_CONFIG_FILE)


def settings_from_dict(data: dict[str, Any], *, base_dir: Path | None = None, source: str = "config") -> Settings:
    """Validate a config tree; relative paths are resolved against base_dir (the config file's folder)."""
    data = dict(data)
    if base_dir is not None:
        for key in ("media_root", "logs_dir"):
            if isinstance(data.get(key), str) and not Path(data[key]).expanduser().is_absolute():
                data[key] = str(base_dir / data[key])
        db = data.get("database")
        if isinstance(db, dict) and isinstance(db.get("url"), str) and db["url"].startswith("sqlite:///"):
            rest = db["url"][len("sqlite:///") :]
            if rest and not rest.startswith("/") and rest != ":memory:":
                data["database"] = {**db, "url": f"sqlite:///{(base_dir / rest).resolve()}"}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration in {source}: {_describe(exc)}") from None


def load_settings(path: Path | str | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the YAML file (OLLAMA_PIPELINE_CONFIG or ./ollama_pipeline.yaml) and apply env overrides."""
    env = dict(os.environ) if env is None else env
    file = Path(path) if path is not None else config_path(env)
    if not file.is_file():
        raise ConfigError(
            f"configuration file {file} not found: copy ollama_pipeline.example.yaml to {DEFAULT_CONFIG_FILE} "
            f"or set {CONFIG_ENV}"
        )
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"configuration file {file} must hold a mapping at the top level")
    merged = _merge(loaded, _env_overrides(env))
    return settings_from_dict(merged, base_dir=file.resolve().parent, source=str(file))
