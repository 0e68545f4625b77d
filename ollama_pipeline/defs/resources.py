"""The Dagster resources: `OllamaResource` and `LibraryResource` show the configuration a run uses, and
`PipelineResource` hands assets and sensors the one `Pipeline` of a process built from it.

The settings file (YAML, `load_settings`, with its OLLAMA_PIPELINE__* environment overrides) stays the
source: the code location fills the two shown resources from it when it loads (`shown_resources`), so the
Dagster UI's resource page lists base URL, hosts, models, timeouts, keep_alive and the database instead of
a config path. A field left empty means "the settings file's value"; a field that is set (in the code
location or in a run's resource config) replaces it. Passwords never appear there: a URL shows `user:***@`
and its password comes from the settings file, or from `dagster.EnvVar` ($OLLAMA_PIPELINE_OLLAMA_PASSWORD,
$OLLAMA_PIPELINE_DATABASE_PASSWORD), which the UI names without its value. The `Pipeline` (engine, Ollama
client, logs) is built once per process and configuration and reused: creating an Ollama client costs
about 50 ms.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from dagster import Config, ConfigurableResource, EnvVar
from pydantic import Field

from ollama_pipeline.core.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    Settings,
    config_path,
    load_settings,
    settings_from_dict,
)
from ollama_pipeline.core.errors import ConfigError, redact_url_credentials
from ollama_pipeline.core.runner import Pipeline

OLLAMA_PASSWORD_ENV = "OLLAMA_PIPELINE_OLLAMA_PASSWORD"
DATABASE_PASSWORD_ENV = "OLLAMA_PIPELINE_DATABASE_PASSWORD"
HIDDEN = "***"

_lock = threading.Lock()
_pipelines: dict[tuple[object, ...], Pipeline] = {}
_registered: dict[str, Settings] = {}


def register_settings(settings: Settings) -> str:
    """Make already-loaded settings usable by PipelineResource in this process; returns their id."""
    settings_id = "settings-" + hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]
    with _lock:
        _registered[settings_id] = settings
    return settings_id


def _file_key(path: str | None) -> tuple[object, ...]:
    """Identifies a settings source: the file, its last change, and the env overrides that apply."""
    file = Path(path) if path else config_path()
    try:
        mtime = file.stat().st_mtime_ns
    except OSError:
        mtime = None
    overrides = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and k != CONFIG_ENV))
    return ("file", str(file.resolve()), mtime, overrides)


def _with_password(url: str, password: str) -> str:
    """url with its password replaced (the user part is kept; none means an empty user)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(unquote(parts.username or ""), safe="")
    return urlunsplit((parts.scheme, f"{user}:{quote(password, safe='')}@{host}", parts.path, parts.query,
                       parts.fragment))


def resolve_url(shown: str, password: str | None, known: list[str], key: str, env: str) -> str:
    """The real URL behind a shown one: a hidden part (`***`) is the settings file's (the known URL that
    shows the same); a `password` (from EnvVar) is set on it and always wins."""
    real = shown
    if HIDDEN in shown:
        match = next((url for url in known if redact_url_credentials(url) == shown), None)
        if match is not None:
            real = match
        elif not password or unquote(urlsplit(shown).username or "") == HIDDEN:
            raise ConfigError(f"{key} {shown} hides a password that is not in the settings file: set {env}")
    return _with_password(real, password) if password else real


class OllamaHostResource(Config):
    """One entry of `ollama.hosts` as shown (password hidden)."""

    base_url: str
    weight: float = 1.0
    parallel: int | None = Field(default=None, description="Calls at once (the host's OLLAMA_NUM_PARALLEL).")
    models: list[str] | None = Field(default=None, description="Models it serves (empty: every model).")


class OllamaResource(ConfigurableResource):
    """The Ollama server(s) and the runner settings of a run. Empty fields: the settings file's value."""

    base_url: str | None = Field(default=None, description="The first Ollama host (`ollama.base_url`); a "
                                 "password shows as ***.")
    password: str | None = Field(default=None, description=f"Password of base_url's user: only through "
                                 f"EnvVar('{OLLAMA_PASSWORD_ENV}'), never a literal.")
    hosts: list[OllamaHostResource] | None = Field(default=None, description="More hosts (`ollama.hosts`).")
    model: str | None = Field(default=None, description="`ollama.model.default`")
    vision_model: str | None = None
    text_model: str | None = None
    timeout_ms: int | None = Field(default=None, description="Timeout of one model call.")
    max_attempts: int | None = Field(default=None, description="`ollama.retry.max_attempts`")
    keep_alive: str | None = Field(default=None, description="How long Ollama keeps a model loaded (Go duration).")
    num_ctx: int | None = Field(default=None, description="Context size sent with every call of a run.")
    warm_up: bool | None = None
    concurrency: int | None = Field(default=None, description="Model calls at once inside one run "
                                    "(`pipeline.concurrency`).")

    def apply(self, data: dict[str, Any], real: Settings) -> None:
        """Write the set fields into a settings tree (real: the settings file's, for hidden passwords)."""
        ollama = data["ollama"]
        known = [real.ollama.host, *(h.host for h in real.ollama.hosts)]
        if self.base_url is not None or self.password:
            ollama["base_url"] = resolve_url(self.base_url or redact_url_credentials(real.ollama.host),
                                             self.password, known, "ollama.base_url", OLLAMA_PASSWORD_ENV)
        if self.hosts is not None:
            ollama["hosts"] = [{**h.model_dump(exclude_none=True),
                                "base_url": resolve_url(h.base_url, None, known, "ollama.hosts.base_url",
                                                        OLLAMA_PASSWORD_ENV)} for h in self.hosts]
        if self.model is not None:
            ollama["model"] = {"default": self.model}
        for name in ("vision_model", "text_model", "timeout_ms", "keep_alive", "num_ctx", "warm_up"):
            if getattr(self, name) is not None:
                ollama[name] = getattr(self, name)
        if self.max_attempts is not None:
            ollama["retry"] = {**ollama.get("retry", {}), "max_attempts": self.max_attempts}
        if self.concurrency is not None:
            data["pipeline"]["concurrency"] = self.concurrency

    @classmethod
    def shown(cls, settings: Settings | None) -> OllamaResource:
        """The resource as the UI shows it: the settings' values, passwords hidden, the EnvVar named if set."""
        password = EnvVar(OLLAMA_PASSWORD_ENV) if os.environ.get(OLLAMA_PASSWORD_ENV) else None
        if settings is None:
            return cls(password=password)
        o = settings.ollama
        return cls(
            base_url=redact_url_credentials(o.host), password=password,
            hosts=[OllamaHostResource(base_url=redact_url_credentials(h.host), weight=h.weight, parallel=h.parallel,
                                      models=h.models) for h in o.hosts],
            model=o.model.default, vision_model=o.vision_model, text_model=o.text_model, timeout_ms=o.timeout_ms,
            max_attempts=o.retry.max_attempts, keep_alive=o.keep_alive, num_ctx=o.num_ctx, warm_up=o.warm_up,
            concurrency=settings.pipeline.concurrency)


class LibraryResource(ConfigurableResource):
    """The gallery: its database, media folder and table layout. Empty fields: the settings file's value."""

    database_url: str | None = Field(default=None, description="SQLAlchemy URL (`database.url`); a password "
                                     "shows as ***.")
    password: str | None = Field(default=None, description=f"Password of the database user: only through "
                                 f"EnvVar('{DATABASE_PASSWORD_ENV}'), never a literal.")
    busy_timeout_ms: int | None = None
    lock_retries: int | None = None
    media_root: str | None = Field(default=None, description="Folder the media paths are relative to.")
    profile: str | None = Field(default=None, description="`library.profile` (auto, pipeline, "
                                "localsupervisor, custom).")
    schema_name: str | None = Field(default=None, description="PostgreSQL schema of the gallery (`library.schema`).")
    slot_limiter_url: str | None = Field(default=None, description="PostgreSQL URL of the shared per-host slot "
                                         "limiter (`pipeline.slot_limiter_url`); a password shows as ***.")

    def apply(self, data: dict[str, Any], real: Settings) -> None:
        """Write the set fields into a settings tree (real: the settings file's, for hidden passwords)."""
        if self.database_url is not None or self.password:
            data["database"]["url"] = resolve_url(self.database_url or redact_url_credentials(real.database.url),
                                                  self.password, [real.database.url], "database.url",
                                                  DATABASE_PASSWORD_ENV)
        for name in ("busy_timeout_ms", "lock_retries"):
            if getattr(self, name) is not None:
                data["database"][name] = getattr(self, name)
        if self.media_root is not None:
            data["media_root"] = self.media_root
        if self.profile is not None:
            data["library"]["profile"] = self.profile
        if self.schema_name is not None:
            data["library"]["schema"] = self.schema_name
        if self.slot_limiter_url is not None:
            data["pipeline"]["slot_limiter_url"] = resolve_url(
                self.slot_limiter_url, None, [real.pipeline.slot_limiter_url or ""], "pipeline.slot_limiter_url",
                "OLLAMA_PIPELINE__PIPELINE__SLOT_LIMITER_URL")

    @classmethod
    def shown(cls, settings: Settings | None) -> LibraryResource:
        """The resource as the UI shows it: the settings' values, passwords hidden, the EnvVar named if set."""
        password = EnvVar(DATABASE_PASSWORD_ENV) if os.environ.get(DATABASE_PASSWORD_ENV) else None
        if settings is None:
            return cls(password=password)
        limiter = settings.pipeline.slot_limiter_url
        return cls(database_url=redact_url_credentials(settings.database.url), password=password,
                   busy_timeout_ms=settings.database.busy_timeout_ms, lock_retries=settings.database.lock_retries,
                   media_root=str(settings.media_root), profile=settings.library.profile,
                   schema_name=settings.library.schema_name,
                   slot_limiter_url=redact_url_credentials(limiter) if limiter else None)


def shown_resources(path: str | None = None) -> tuple[OllamaResource, LibraryResource]:
    """The Ollama and library resources filled from the settings file (empty when there is none or it is
    invalid: the code location still loads, and a run reports the problem)."""
    try:
        settings: Settings | None = load_settings(path)
    except ConfigError:
        settings = None
    return OllamaResource.shown(settings), LibraryResource.shown(settings)


class PipelineResource(ConfigurableResource):
    """The pipeline core (settings, library database, Ollama client, JSONL logs) for assets and sensors,
    configured by the settings file and the `ollama` and `library` resources."""

    ollama: OllamaResource
    library: LibraryResource
    config_path: str | None = Field(
        default=None,
        description="Settings file (YAML). Default: $OLLAMA_PIPELINE_CONFIG, else ./ollama_pipeline.yaml. "
        "Secrets belong in that file, in OLLAMA_PIPELINE__* environment variables or in the EnvVar fields of "
        "the ollama and library resources, never here.",
    )
    settings_id: str | None = Field(
        default=None,
        description="Set only by in-process launches (materialize_stages): settings registered in this "
        "process with register_settings. Overrides config_path; the ollama and library fields still apply.",
    )

    def __init__(self, **data: Any) -> None:
        data.setdefault("ollama", OllamaResource())
        data.setdefault("library", LibraryResource())
        super().__init__(**data)

    @classmethod
    def for_settings(cls, settings: Settings) -> PipelineResource:
        """A resource bound to settings already loaded in this process (in-process runs only)."""
        return cls(settings_id=register_settings(settings))

    def _key(self) -> tuple[object, ...]:
        source = ("registered", self.settings_id) if self.settings_id else _file_key(self.config_path)
        return (*source, self.ollama.model_dump_json(), self.library.model_dump_json())

    def setup_for_execution(self, context: Any) -> None:
        """At run start (never at code-location load, so a database outage does not break the location):
        the gallery check. A missing required column is logged with the check-db report here; the step then
        reports it as the `media_check_db` asset check and stops before touching an item."""
        from ollama_pipeline.core.db.gallery import gallery_for

        try:
            report = gallery_for(self.pipeline().engine).report
        except Exception as exc:  # noqa: BLE001 - an outage: the step's own first query reports it
            context.log.error(f"check-db could not read the gallery database: {type(exc).__name__}")
            return
        if not report.ok:
            context.log.error("the gallery database lacks what the pipeline needs:\n" + report.render())

    def settings(self) -> Settings:
        """The settings this resource points at."""
        return self.pipeline().settings

    def resolved_settings(self) -> Settings:
        """The settings file (or the registered settings) with the set fields of `ollama` and `library`."""
        if self.settings_id:
            base = _registered.get(self.settings_id)
            if base is None:
                raise KeyError(f"settings {self.settings_id!r} were not registered in this process")
        else:
            base = load_settings(self.config_path)
        data = base.model_dump(mode="json", by_alias=True)
        before = repr(data)
        self.ollama.apply(data, base)
        self.library.apply(data, base)
        if repr(data) == before:
            return base
        return settings_from_dict(data, source="the ollama and library resources")

    def pipeline(self) -> Pipeline:
        """The process-wide Pipeline for these settings, built on first use."""
        key = self._key()
        with _lock:
            found = _pipelines.get(key)
            if found is not None:
                return found
            pipeline = _pipelines[key] = Pipeline.from_settings(self.resolved_settings())
            return pipeline
