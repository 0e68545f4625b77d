"""The seed's job API (§3) as plain functions: `enqueue_ollama`, `process_ollama_job`, `persist_ollama_result`.

They use one process-wide default `Pipeline`, built lazily (once) from `load_settings()`, and delegate to
`ollama_pipeline.core.queue.store` and to `Pipeline.persist`, the one write path to `media_meta`. Code that already
holds a `Pipeline` (Dagster resources, tests) calls `ollama_pipeline.core.queue.store` directly. No Dagster here.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.queue.store import EnqueueResult, JobOutcome
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import COMMON_KEYS, get_stage
from ollama_pipeline.core.stages.base import StageResult

_default: Pipeline | None = None
_lock = threading.Lock()


def default_pipeline() -> Pipeline:
    """The process-wide Pipeline, made on first use from load_settings()."""
    global _default
    with _lock:
        if _default is None:
            _default = Pipeline.from_settings(load_settings())
        return _default


def set_default_pipeline(pipeline: Pipeline | None) -> None:
    """Use this Pipeline for the module-level functions (None: build from load_settings() again)."""
    global _default
    with _lock:
        _default = pipeline


def enqueue_ollama(job_type: str, media_id: int, payload: dict[str, Any] | None = None) -> EnqueueResult:
    """Queue a job for one media item; deduplicated when an equal job is already queued or running."""
    return jobs.enqueue_ollama(default_pipeline(), job_type, media_id, payload)


def process_ollama_job(job_id: int) -> JobOutcome:
    """Claim and run one job; its result is persisted through persist_ollama_result."""
    return jobs.process_ollama_job(default_pipeline(), job_id)


def persist_ollama_result(media_id: int, result: StageResult | dict[str, Any]) -> dict[str, Any]:
    """Write one stage result (media_meta, tags, quality status, lifecycle events) in one transaction."""
    try:
        parsed = result if isinstance(result, StageResult) else StageResult.model_validate(result)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "result"
        raise ValidationError(f"invalid result: field '{field}': {first['msg']}", code="validation.payload") from None
    stage = get_stage(parsed.stage)
    provenance = sorted(k for k in parsed.output.meta if k in COMMON_KEYS)
    if provenance:
        raise ValidationError(f"{', '.join(provenance)} {'is' if len(provenance) == 1 else 'are'} written by the "
                              f"pipeline itself (from the result's model, version and ran_at); leave "
                              f"{'it' if len(provenance) == 1 else 'them'} out of output.meta",
                              code="validation.payload")
    foreign = sorted(k for k in parsed.output.meta if k not in stage.writes)
    if foreign:
        raise ValidationError(f"stage {stage.job_type} may not write {', '.join(foreign)} "
                              f"(it writes {', '.join(stage.writes)})", code="validation.payload")
    # Pipeline.persist validates every value against its key's stored schema before anything is written.
    return default_pipeline().persist(media_id, parsed)
