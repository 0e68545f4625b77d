"""`PipelineResource`: the Dagster resource that hands assets and sensors the one `Pipeline` of a process.

Its only configuration is where the settings come from (a YAML path, default: the usual lookup of
`load_settings`). Secrets (an Ollama URL with credentials, a database password) stay in that file or in the
environment, so the Dagster UI never shows them. The `Pipeline` (engine, Ollama client, logs) is built once
per process and settings source and reused: creating an Ollama client costs about 50 ms.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from ollama_pipeline.core.config import CONFIG_ENV, ENV_PREFIX, Settings, config_path, load_settings
from ollama_pipeline.core.runner import Pipeline

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


class PipelineResource(ConfigurableResource):
    """The pipeline core (settings, library database, Ollama client, JSONL logs) for assets and sensors."""

    config_path: str | None = Field(
        default=None,
        description="Settings file (YAML). Default: $OLLAMA_PIPELINE_CONFIG, else ./ollama_pipeline.yaml. "
        "Secrets belong in that file or in OLLAMA_PIPELINE__* environment variables, never here.",
    )
    settings_id: str | None = Field(
        default=None,
        description="Set only by in-process launches (materialize_stages): settings registered in this "
        "process with register_settings. Overrides config_path.",
    )

    @classmethod
    def for_settings(cls, settings: Settings) -> PipelineResource:
        """A resource bound to settings already loaded in this process (in-process runs only)."""
        return cls(settings_id=register_settings(settings))

    def _key(self) -> tuple[object, ...]:
        return ("registered", self.settings_id) if self.settings_id else _file_key(self.config_path)

    def setup_for_execution(self, context: Any) -> None:
        """At run start (never at code-location load, so a database outage does not break the location):
        the gallery check; a missing required column fails the run with the check-db report."""
        from ollama_pipeline.core.db.gallery import require_gallery

        require_gallery(self.pipeline().engine)

    def settings(self) -> Settings:
        """The settings this resource points at."""
        return self.pipeline().settings

    def pipeline(self) -> Pipeline:
        """The process-wide Pipeline for these settings, built on first use."""
        key = self._key()
        with _lock:
            found = _pipelines.get(key)
            if found is not None:
                return found
            if self.settings_id:
                settings = _registered.get(self.settings_id)
                if settings is None:
                    raise KeyError(f"settings {self.settings_id!r} were not registered in this process")
            else:
                settings = load_settings(self.config_path)
            pipeline = _pipelines[key] = Pipeline.from_settings(settings)
            return pipeline
