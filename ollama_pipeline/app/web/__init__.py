"""The web UI of the pipeline (§2 UI/Downstream): gallery, item pages, re-runs and the job queue.

`create_app(settings)` builds the FastAPI app; `ollama-pipeline web` (see `web.cli`) serves it with uvicorn
on 127.0.0.1. Pages are rendered on the server with Jinja2 (autoescape on) and need no JavaScript.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ollama_pipeline.app.web.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported lazily so `ollama-pipeline --help` does not load FastAPI
        from ollama_pipeline.app.web.app import create_app

        return create_app
    raise AttributeError(name)
