"""Runs a stage over media items: load inputs, fingerprint, skip what is unchanged, call the model,
validate (§8), persist through the one write path, log. Used by the Dagster assets and the job processor.

`Pipeline` bundles what one process needs (settings, engine, one Ollama client, logs); make it once per
process. This module must not import Dagster.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pydantic
from pydantic import BaseModel
from sqlalchemy import Engine

from ollama_pipeline.core.client import OllamaClient, OllamaOptions, OllamaTextResponse
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import get_engine
from ollama_pipeline.core.errors import InvalidResponseFormatError, OllamaPipelineError, ValidationError
from ollama_pipeline.core.images import prepare_image_bytes, read_media_file
from ollama_pipeline.core.injection import answer_repeats_instruction, instruction_targets, strings_of
from ollama_pipeline.core.jsontext import sha256_json
from ollama_pipeline.core.logs import PipelineLogs
from ollama_pipeline.core.stages import get_stage
from ollama_pipeline.core.stages.base import (
    SYSTEM_PROMPT,
    CallMetrics,
    ModelRequest,
    Stage,
    StageInputs,
    StageOutput,
    StageResult,
    untrusted_strings,
)
from ollama_pipeline.core.stages.stored import STORED_SCHEMAS
from ollama_pipeline.core.stages.validation import parse_answer, repair_prompt

_REPAIRABLE = {"invalid_response_format.not_json", "invalid_response_format.code_fence",
               "invalid_response_format.reasoning", "invalid_response_format.truncated",
               "invalid_response_format.empty", "validation.schema"}


@dataclass
class Pipeline:
    """Settings, database engine, Ollama client and logs of one process."""

    settings: Settings
    engine: Engine
    client: OllamaClient
    logs: PipelineLogs
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, *, client: OllamaClient | None = None) -> Pipeline:
        engine = get_engine(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
        client = client or OllamaClient(settings.ollama, default_slots=settings.pipeline.concurrency)
        return cls(settings=settings, engine=engine, client=client,
                   logs=PipelineLogs(settings.logs_dir))

    def model_for(self, stage: Stage) -> str:
        return self.settings.ollama.model_for(stage.model_kind)

    def options_for(self, stage: Stage, model: str | None = None) -> OllamaOptions:
        det = self.settings.ollama.deterministic
        return OllamaOptions(model=model or self.model_for(stage), format=stage.schema, temperature=det.temperature,
                             top_p=det.top_p, seed=det.seed, timeout_ms=self.settings.ollama.timeout_ms,
                             think=False)

    def persist(self, media_id: int, result: StageResult) -> dict[str, Any]:
        """The one write path: the result is checked against the stored schemas, then written."""
        check_stored(get_stage(result.stage), result.output)
        p = self.settings.pipeline
        return repository.persist_result(self.engine, media_id, result, write_tags=p.write_tags,
                                         write_quality_status=p.write_quality_status,
                                         lock_retries=self.settings.database.lock_retries)


class ItemOutcome(BaseModel):
    """What happened to one media item in one stage."""

    media_id: int
    stage: str
    status: Literal["written", "unchanged", "skipped", "failed"]
    model: str | None = None
    fingerprint: str | None = None
    error: dict[str, Any] | None = None
    metrics: CallMetrics = CallMetrics()
    changed_keys: list[str] = []


def _call_model(pipeline: Pipeline, stage: Stage, request: ModelRequest, images_b64: list[str],
                options: OllamaOptions, metrics: CallMetrics, affinity: str) -> BaseModel:
    prompt = request.prompt
    repairs_left = pipeline.settings.pipeline.repair_retries
    while True:
        if images_b64:
            response: OllamaTextResponse = pipeline.client.analyze_image(images_b64, prompt, options,
                                                                         system=SYSTEM_PROMPT, affinity=affinity)
        else:
            response = pipeline.client.generate_text(prompt, options, system=SYSTEM_PROMPT, affinity=affinity)
        metrics.calls += response.attempts
        metrics.prompt_eval_count += response.prompt_eval_count or 0
        metrics.eval_count += response.eval_count or 0
        metrics.total_duration_ms += (response.total_duration_ns or 0) / 1e6
        metrics.load_duration_ms += (response.load_duration_ns or 0) / 1e6
        metrics.image_bytes += response.image_bytes
        try:
            return parse_answer(response.text, response.done_reason, stage.output_schema)
        except (InvalidResponseFormatError, ValidationError) as exc:
            if exc.code not in _REPAIRABLE or repairs_left <= 0:
                raise
            repairs_left -= 1
            metrics.repairs += 1
            prompt = repair_prompt(request.prompt, exc)


_QUALITY_VERDICTS = ("ok", "needs_review", "rejected")


def check_stored(stage: Stage, output: StageOutput) -> None:
    """Every value a stage built matches its key's stored schema, before anything is written."""
    for key, value in output.meta.items():
        schema = STORED_SCHEMAS.get(key)
        if key not in stage.writes or schema is None:
            raise ValidationError(f"stage {stage.job_type} built key {key!r}, which it does not declare",
                                  code="validation.stored_value")
        try:
            schema.model_validate(value)
        except pydantic.ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors()})
            raise ValidationError(f"stage {stage.job_type} built an invalid {key} value: fields {', '.join(fields[:8])}",
                                  code="validation.stored_value") from None
    for tag in output.tags or []:
        if not tag.name.strip() or not (0 <= tag.confidence <= 1 and 0 <= tag.weight <= 1):
            raise ValidationError(f"stage {stage.job_type} built an invalid tag {tag.name!r}: the name must not be "
                                  f"empty and confidence and weight lie in 0..1", code="validation.stored_value")
    if output.quality is not None and (output.quality.status not in _QUALITY_VERDICTS
                                       or not 0 <= output.quality.score <= 1):
        raise ValidationError(f"stage {stage.job_type} built an invalid quality update: status must be one of "
                              f"{', '.join(_QUALITY_VERDICTS)} and score lie in 0..1", code="validation.stored_value")


def check_injection(stage: Stage, inputs: StageInputs, output: StageOutput) -> None:
    """Refuse an answer that repeats an instruction found in the item's library data, or holds one of its
    own: the model obeyed a planted order. Nothing of it is written (its tags neither)."""
    values = [*strings_of(output.meta), *(t.name for t in output.tags or [])]
    targets = instruction_targets(untrusted_strings(stage, inputs))
    if answer_repeats_instruction(values, targets):
        raise ValidationError(f"the answer of {stage.job_type} repeats an instruction found in the item's library "
                              f"data (a planted prompt injection the model obeyed); nothing of it is written",
                              code="validation.prompt_injection")


def _persist_output(pipeline: Pipeline, stage: Stage, inputs: StageInputs, output: StageOutput, *, model: str,
                    fingerprint: str, metrics: CallMetrics, started: float, job_id: int | None,
                    run_id: str | None) -> ItemOutcome:
    """Check, persist and log one built output (from the model's answers, or refreshed from stored values)."""
    media_id = inputs.media.id
    metrics.wall_ms = (time.perf_counter() - started) * 1000.0
    result = StageResult(stage=stage.job_type, model=model, model_digest=pipeline.client.model_digest(model),
                         version=stage.version, fingerprint=fingerprint, output=output, metrics=metrics,
                         job_id=job_id, run_id=run_id, ran_at=datetime.now(UTC))
    changes = pipeline.persist(media_id, result)
    outcome = ItemOutcome(media_id=media_id, stage=stage.job_type,
                          status="written" if set(changes["changed_keys"]) - {"ollama.last_run_at"} else "unchanged", model=model,
                          fingerprint=fingerprint, metrics=metrics, changed_keys=changes["changed_keys"])
    pipeline.logs.job_event("stage_succeeded", job_id=job_id, run_id=run_id, media_id=media_id,
                            job_type=stage.job_type, model=model, version=stage.version,
                            duration_ms=round(metrics.wall_ms, 1), calls=metrics.calls,
                            prompt_eval_count=metrics.prompt_eval_count, eval_count=metrics.eval_count,
                            repairs=metrics.repairs, changed_keys=changes["changed_keys"])
    return outcome


def run_item(pipeline: Pipeline, stage: Stage, inputs: StageInputs, *, state: dict[str, Any] | None = None,
             force: bool = False, model: str | None = None, job_id: int | None = None,
             run_id: str | None = None) -> ItemOutcome:
    """Run one stage for one item; typed failures are recorded and returned, never raised."""
    media_id = inputs.media.id
    started = time.perf_counter()
    metrics = CallMetrics()
    model = model or pipeline.model_for(stage)
    fingerprint = None
    try:
        requests = list(stage.plan(stage, inputs))
        image_bytes: dict[int, tuple[str, bytes]] = {}
        for req in requests:
            for ref in req.images:
                if ref.media_id not in image_bytes:
                    _, data = read_media_file(pipeline.settings.media_root, ref.path)
                    image_bytes[ref.media_id] = (hashlib.sha256(data).hexdigest(), data)
        options = pipeline.options_for(stage, model)
        extra = {"extra": stage.fingerprint_extra(inputs)} if stage.fingerprint_extra else {}
        fingerprint = sha256_json({
            **extra,
            "stage": stage.version, "model": model, "digest": pipeline.client.model_digest(model),
            "options": options.ollama_options(), "max_pixels": pipeline.settings.pipeline.max_pixels,
            "requests": [{"key": r.key, "prompt": hashlib.sha256(r.prompt.encode()).hexdigest(),
                          "images": [image_bytes[i.media_id][0] for i in r.images]} for r in requests],
        })
        if not force and state and state.get("status") == "ok" and state.get("fingerprint") == fingerprint:
            refreshed = stage.refresh(stage, inputs) if stage.refresh is not None else None
            if refreshed is None:
                return ItemOutcome(media_id=media_id, stage=stage.job_type, status="skipped", model=model,
                                   fingerprint=fingerprint)
            return _persist_output(pipeline, stage, inputs, refreshed, model=model, fingerprint=fingerprint,
                                   metrics=metrics, started=started, job_id=job_id, run_id=run_id)
        prepared: dict[int, str] = {}
        answers: dict[str, BaseModel] = {}
        cfg = pipeline.settings
        for req in requests:
            b64 = []
            for ref in req.images:
                if ref.media_id not in prepared:
                    prepared[ref.media_id] = prepare_image_bytes(
                        image_bytes[ref.media_id][1], ref.path, max_image_bytes=cfg.ollama.max_image_bytes,
                        max_pixels=cfg.pipeline.max_pixels).b64
                b64.append(prepared[ref.media_id])
            answers[req.key] = _call_model(pipeline, stage, req, b64, options, metrics, str(media_id))
        output = stage.combine(stage, inputs, answers)
        check_injection(stage, inputs, output)
        return _persist_output(pipeline, stage, inputs, output, model=model, fingerprint=fingerprint,
                               metrics=metrics, started=started, job_id=job_id, run_id=run_id)
    except OllamaPipelineError as exc:
        error = exc
    except Exception as exc:  # an unexpected bug still fails only this item, with its type logged
        error = OllamaPipelineError(f"unexpected {type(exc).__name__}: {exc}")
    metrics.wall_ms = (time.perf_counter() - started) * 1000.0
    pipeline.logs.error(error, job_id=job_id, run_id=run_id, media_id=media_id, job_type=stage.job_type,
                        model=model)
    pipeline.logs.job_event("stage_failed", job_id=job_id, run_id=run_id, media_id=media_id,
                            job_type=stage.job_type, model=model, channel=error.channel, code=error.code,
                            duration_ms=round(metrics.wall_ms, 1), calls=metrics.calls)
    try:
        repository.record_stage_failure(pipeline.engine, media_id, stage.job_type, error, model=model,
                                        job_id=job_id, run_id=run_id,
                                        lock_retries=pipeline.settings.database.lock_retries)
    except OllamaPipelineError as record_error:
        pipeline.logs.error(record_error, media_id=media_id, job_type=stage.job_type, job_id=job_id)
    return ItemOutcome(media_id=media_id, stage=stage.job_type, status="failed", model=model,
                       fingerprint=fingerprint, error=error.to_dict(), metrics=metrics)


def run_stage(pipeline: Pipeline, stage: Stage | str, media_ids: Iterable[int], *, force: bool = False,
              concurrency: int | None = None, run_id: str | None = None, job_ids: dict[int, int] | None = None,
              chunk_size: int = 256, model: str | None = None) -> Iterator[ItemOutcome]:
    """Run a stage over many items with bounded concurrency; yields outcomes as they complete.

    model overrides the configured model of the stage (a job payload's `model`)."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    ids = list(dict.fromkeys(int(i) for i in media_ids))
    workers = max(1, concurrency or pipeline.settings.pipeline.concurrency)
    if len(pipeline.client.pool.hosts) > 1:  # enough calls at once to fill every host's slots
        workers = max(workers, 2 * pipeline.client.pool.total_slots)
    job_ids = job_ids or {}
    lock = threading.Lock()
    # Items in flight or finished but not yet taken by the caller: a caller that is busy for a moment
    # (a Dagster run storing events) does not leave the model server idle.
    window = max(workers * 4, 32)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{stage.job_type}") as pool:
        pending: set[Future[ItemOutcome]] = set()
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            inputs = repository.load_inputs_many(pipeline.engine, chunk)
            if stage.enrich is not None:
                with lock:
                    stage.enrich(pipeline, inputs)
            states = repository.stage_states(pipeline.engine, stage.job_type, chunk)
            for media_id in chunk:
                if media_id not in inputs:
                    err = ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
                    pipeline.logs.error(err, media_id=media_id, job_type=stage.job_type, run_id=run_id)
                    yield ItemOutcome(media_id=media_id, stage=stage.job_type, status="failed", error=err.to_dict())
                    continue
                while len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
                pending.add(pool.submit(run_item, pipeline, stage, inputs[media_id], state=states.get(media_id),
                                        force=force, model=model, job_id=job_ids.get(media_id), run_id=run_id))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
