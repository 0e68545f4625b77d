"""ollama_pipeline: enrich a media library with answers from a local Ollama server, orchestrated by Dagster.

The seed's job API (§3) is importable from here: `enqueue_ollama(job_type, media_id, payload)`,
`process_ollama_job(job_id)` and `persist_ollama_result(media_id, result)`. They use the configuration
found by `load_settings()` (./ollama_pipeline.yaml or $OLLAMA_PIPELINE_CONFIG).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["enqueue_ollama", "process_ollama_job", "persist_ollama_result", "__version__"]


def __getattr__(name: str) -> Any:  # imported lazily: importing the package must stay cheap
    if name in ("enqueue_ollama", "process_ollama_job", "persist_ollama_result"):
        from ollama_pipeline.core import api

        return getattr(api, name)
    raise AttributeError(name)
