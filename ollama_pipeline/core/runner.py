"""Runs a stage over media items: load inputs, fingerprint, skip what is unchanged, call the model,
validate (§8), persist through the one write path, log. Used by the Dagster assets and the job processor.

`Pipeline` bundles what one process needs (settings, engine, one Ollama client, logs); make it once per
process. This module must not import Dagster.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel
from sqlalchemy import Engine

from ollama_pipeline.core.client import OllamaClient, OllamaOptions, OllamaTextResponse
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db import repository
from ollama_pipeline.core.db.engine import engine_for_settings
from ollama_pipeline.core.errors import (
    BlockedError,
    InvalidResponseFormatError,
    NetworkError,
    OllamaPipelineError,
    ValidationError,
)
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.images import (
    check_media_type,
    encode_prepared,
    file_sha256,
    open_image,
    resolve_media_path,
    video_frame,
)
from ollama_pipeline.core.injection import answer_repeats_instruction, instruction_targets, strings_of
from ollama_pipeline.core.jsontext import canonical_json, sha256_json
from ollama_pipeline.core.logs import PipelineLogs
from ollama_pipeline.core.selection import as_library_ids
from ollama_pipeline.core.shaping import stage_order
from ollama_pipeline.core.stages import get_stage
from ollama_pipeline.core.stages.base import (
    SYSTEM_PROMPT,
    CallMetrics,
    ModelRequest,
    Stage,
    StageInputs,
    StageOutput,
    StageResult,
    combinable,
    combined_request,
    combined_schema,
    schema_fields,
    untrusted_strings,
)
from ollama_pipeline.core.stages.stored import STORED_SCHEMAS
from ollama_pipeline.core.stages.validation import parse_answer, repair_prompt

# Problems of an item's own file: the first run fails the item and remembers the file and row it saw;
# later runs report it as skipped (reason = the code without "validation.") until the file or the row changes.
FILE_PROBLEM_CODES = frozenset({"validation.file_missing", "validation.image_corrupt",
                                "validation.image_too_large", "validation.path_outside_root"})
UNSUPPORTED = "validation.unsupported_media_type"
_UNLOADED: Any = object()

_REPAIRABLE = {"invalid_response_format.not_json", "invalid_response_format.code_fence",
               "invalid_response_format.reasoning", "invalid_response_format.truncated",
               "invalid_response_format.empty", "validation.schema"}


# The context every call of a run gets unless ollama.num_ctx says otherwise: the same for every stage and
# model, so Ollama never reloads a model for a changed num_ctx (server/sched.go needsReload). Sized for the
# largest request, the duplicate pair: two LLaVA-1.6 images of up to 2,943 tokens each, the prompt and the
# answer. Ollama's own default (4,096 below 23 GiB of VRAM) refuses that pair with a 400.
DEFAULT_NUM_CTX = 8192


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
        engine = engine_for_settings(settings)
        if client is None:
            gate = None
            if settings.pipeline.slot_limiter_url:
                from ollama_pipeline.core.limiter import PostgresSlotGate

                gate = PostgresSlotGate(settings.pipeline.slot_limiter_url)
            client = OllamaClient(settings.ollama, default_slots=settings.pipeline.concurrency, gate=gate)
        return cls(settings=settings, engine=engine, client=client,
                   logs=PipelineLogs(settings.logs_dir))

    def remember_breaker(self, run_id: str, message: str) -> None:
        """Note that a run in this process stopped on its circuit breaker (read back by in-process launches)."""
        self._cache[f"breaker:{run_id}"] = message

    def breaker_message(self, run_id: str) -> str | None:
        return self._cache.get(f"breaker:{run_id}")

    def remember_counts(self, run_id: str, counts: dict[str, dict[str, int]]) -> None:
        """Items by status per asset of a run in this process (read back by in-process launches)."""
        self._cache[f"counts:{run_id}"] = counts

    def run_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        return self._cache.pop(f"counts:{run_id}", {})

    def model_for(self, stage: Stage) -> str:
        return self.settings.ollama.model_for(stage.model_kind)

    def options_for(self, stage: Stage, model: str | None = None) -> OllamaOptions:
        """The options of every call of this stage: sampling from the config, one num_ctx for every call."""
        det = self.settings.ollama.deterministic
        model = model or self.model_for(stage)
        return OllamaOptions(model=model, format=stage.schema, temperature=det.temperature,
                             top_p=det.top_p, seed=det.seed, timeout_ms=self.settings.ollama.timeout_ms,
                             think=False, num_ctx=self.settings.ollama.num_ctx or DEFAULT_NUM_CTX,
                             keep_alive=self.settings.ollama.keep_alive)

    def warm_up(self, stage: Stage, model: str | None = None, **fields: Any) -> None:
        """Load the stage's model with the run's options before an item's first call (ollama.warm_up); the
        log event names the job, run and item that waited for the load."""
        if self.settings.ollama.warm_up:
            loaded = self.client.warm_up(self.options_for(stage, model))
            if loaded:
                self.logs.job_event("model_loaded", model=model or self.model_for(stage), hosts=loaded, **fields)

    def persist(self, media_id: int, result: StageResult, *, force: bool = False) -> dict[str, Any]:
        """The one write path: the result is checked against the stored schemas, then written (force:
        also over values a person changed since the pipeline wrote them)."""
        check_stored(get_stage(result.stage), result.output)
        p = self.settings.pipeline
        return repository.persist_result(self.engine, media_id, result, write_tags=p.write_tags,
                                         write_quality_status=p.write_quality_status,
                                         lock_retries=self.settings.database.lock_retries, force=force)


class ItemOutcome(BaseModel):
    """What happened to one media item in one stage."""

    media_id: MediaId
    stage: str
    status: Literal["written", "unchanged", "skipped", "failed", "untouched"]
    reason: str | None = None  # why a skipped item was not run: unsupported_media_type, file_missing, ...
    model: str | None = None
    fingerprint: str | None = None
    error: dict[str, Any] | None = None
    metrics: CallMetrics = CallMetrics()
    changed_keys: list[str] = []
    human_edited: list[str] = []  # keys a person changed since the pipeline wrote them: kept, not overwritten

    @property
    def error_obj(self) -> OllamaPipelineError | None:
        """The failure as its channel's exception type (for the circuit breaker); None when it did not fail."""
        if self.status != "failed" or not self.error:
            return None
        cls = NetworkError if self.error.get("channel") == "network" else OllamaPipelineError
        return cls(str(self.error.get("message", "")), code=self.error.get("code"))


class CircuitBreaker:
    """Opens after `threshold` items in a row failed with a network error (their retries spent): the run
    then stops sending requests, and items not yet tried stay untouched. Any other outcome closes the count."""

    def __init__(self, threshold: int) -> None:
        self.threshold = max(1, threshold)
        self.consecutive = 0
        self.open = False
        self.last_error: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def record(self, error: OllamaPipelineError | None) -> None:
        with self._lock:
            if isinstance(error, NetworkError):
                self.consecutive += 1
                self.last_error = error.to_dict()
                if self.consecutive >= self.threshold:
                    self.open = True
            else:
                self.consecutive = 0


class CircuitOpenError(NetworkError):
    """Raised by run_stage after its breaker opened: Ollama stopped answering during the run."""

    default_code = "network.circuit_open"


def _call_model(pipeline: Pipeline, stage: Stage, request: ModelRequest, images_b64: list[str],
                options: OllamaOptions, metrics: CallMetrics, affinity: str) -> BaseModel:
    prompt = request.prompt
    repairs_left = pipeline.settings.pipeline.repair_retries
    while True:
        try:
            if images_b64:
                response: OllamaTextResponse = pipeline.client.analyze_image(
                    images_b64, prompt, options, system=SYSTEM_PROMPT, affinity=affinity)
            else:
                response = pipeline.client.generate_text(prompt, options, system=SYSTEM_PROMPT, affinity=affinity)
        except OllamaPipelineError as exc:  # the requests made before it gave up count as model calls
            metrics.calls += int(exc.details.get("attempts", 1))
            raise
        metrics.add_response(response)
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


def check_injection(stage: Stage, inputs: StageInputs, output: StageOutput, *, extra: Sequence[str] = ()) -> None:
    """Refuse an answer that repeats an instruction found in the item's library data, or holds one of its
    own: the model obeyed a planted order. Nothing of it is written (its tags neither). extra: library
    strings the call also carried (a combined request holds every part's data)."""
    values = [*strings_of(output.meta), *(t.name for t in output.tags or [])]
    targets = instruction_targets([*untrusted_strings(stage, inputs), *extra])
    if answer_repeats_instruction(values, targets):
        raise ValidationError(f"the answer of {stage.job_type} repeats an instruction found in the item's library "
                              f"data (a planted prompt injection the model obeyed); nothing of it is written",
                              code="validation.prompt_injection")


def _persist_output(pipeline: Pipeline, stage: Stage, inputs: StageInputs, output: StageOutput, *, model: str,
                    fingerprint: str, metrics: CallMetrics, started: float, job_id: int | None,
                    run_id: str | None, force: bool = False, **log: Any) -> ItemOutcome:
    """Check, persist and log one built output (from the model's answers, or refreshed from stored values)."""
    media_id = inputs.media.id
    metrics.wall_ms = (time.perf_counter() - started) * 1000.0
    result = StageResult(stage=stage.job_type, model=model, model_digest=pipeline.client.model_digest(model),
                         version=stage.version, fingerprint=fingerprint, output=output, metrics=metrics,
                         job_id=job_id, run_id=run_id, ran_at=datetime.now(UTC))
    changes = pipeline.persist(media_id, result, force=force)
    outcome = ItemOutcome(media_id=media_id, stage=stage.job_type,
                          status="written" if set(changes["changed_keys"]) - {"ollama.last_run_at"} else "unchanged", model=model,
                          fingerprint=fingerprint, metrics=metrics, changed_keys=changes["changed_keys"],
                          human_edited=changes.get("human_edited", []))
    pipeline.logs.job_event("stage_succeeded", job_id=job_id, run_id=run_id, media_id=media_id,
                            job_type=stage.job_type, model=model, version=stage.version,
                            duration_ms=round(metrics.wall_ms, 1), calls=metrics.calls,
                            prompt_eval_count=metrics.prompt_eval_count, eval_count=metrics.eval_count,
                            repairs=metrics.repairs, changed_keys=changes["changed_keys"], **log,
                            **({"human_edited": changes["human_edited"]} if changes.get("human_edited") else {}))
    return outcome


def problem_signature(settings: Settings, path: str, media_type: str | None, media_hash: str | None) -> str:
    """What a file problem was seen with: the media row (path, type, hash), the file (size and mtime, or
    its absence) and the settings that decide whether it can be used. A change to any of them re-runs it."""
    try:
        file = resolve_media_path(settings.media_root, path)
        stat = file.stat() if file.is_file() else None
        state: Any = [stat.st_size, stat.st_mtime_ns] if stat else "missing"
    except ValidationError:
        state = "outside_root"
    except OSError:
        state = "unreadable"
    return sha256_json({"path": path, "type": media_type, "hash": media_hash, "file": state,
                        "root": str(settings.media_root), "max_pixels": settings.pipeline.max_pixels,
                        "max_image_bytes": settings.ollama.max_image_bytes})


def note_media_problem(pipeline: Pipeline, media: Any, error: OllamaPipelineError, problem: dict[str, Any] | None,
                       *, run_id: str | None = None, job_id: int | None = None) -> str | None:
    """Decide what a problem with an item's own file means for this run; `media` has id, path, type, hash.

    Returns the reason to report the item as skipped (`unsupported_media_type`, or the code of a file
    problem already reported for the same file and row), or None: fail it as usual. A new file problem is
    remembered, so the next run reports it instead of failing it again."""
    if error.code == UNSUPPORTED:
        signature = problem_signature(pipeline.settings, media.path, media.type, media.hash)
        repository.record_media_problem(pipeline.engine, media.id, error, status="skipped", signature=signature,
                                        run_id=run_id, job_id=job_id,
                                        lock_retries=pipeline.settings.database.lock_retries)
        return "unsupported_media_type"
    if error.code not in FILE_PROBLEM_CODES:
        return None
    signature = problem_signature(pipeline.settings, media.path, media.type, media.hash)
    if (problem and problem.get("status") == "failed" and problem.get("error_code") == error.code
            and problem.get("fingerprint") == signature):
        return error.code.removeprefix("validation.")
    repository.record_media_problem(pipeline.engine, media.id, error, status="failed", signature=signature,
                                    run_id=run_id, job_id=job_id, lock_retries=pipeline.settings.database.lock_retries)
    return None


def _read_source(pipeline: Pipeline, ref: Any, media_type: str | None, own: bool) -> tuple[str, Path, bytes | None, str]:
    """(content sha256, path, bytes or None for a video, kind) of an image a request sends."""
    kind = check_media_type(media_type if own else None, ref.path)
    path = resolve_media_path(pipeline.settings.media_root, ref.path)
    if not path.is_file():
        raise ValidationError(f"media file {ref.path!r} does not exist", code="validation.file_missing")
    try:
        if kind == "video":  # hashed as a stream and decoded from the file: videos can be large
            return file_sha256(path), path, None, kind
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"media file {ref.path!r} cannot be read: {type(exc).__name__}",
                              code="validation.file_missing") from None
    return hashlib.sha256(data).hexdigest(), path, data, kind


def upstream_failures(pipeline: Pipeline, stage: Stage, media_ids: Iterable[int]) -> dict[int, tuple[str, bool]]:
    """Items whose stored result of an upstream stage is a failure -> (that stage, whether it was retryable)."""
    ids = list(media_ids)
    found: dict[int, tuple[str, bool]] = {}
    for upstream in stage.upstream:
        for media_id, state in repository.stage_states(pipeline.engine, upstream, ids).items():
            if state.get("status") == "failed":
                found.setdefault(media_id, (upstream, bool(state.get("retryable"))))
    return found


def run_item(pipeline: Pipeline, stage: Stage, inputs: StageInputs, *, state: dict[str, Any] | None = None,
             force: bool = False, model: str | None = None, job_id: int | None = None,
             run_id: str | None = None, problem: dict[str, Any] | None = _UNLOADED,
             blocked_by: tuple[str, bool] | None = None, breaker: CircuitBreaker | None = None) -> ItemOutcome:
    """Run one stage for one item; typed failures are recorded and returned, never raised.

    problem: the item's row in the list of media problems (repository.MEDIA_STAGE), when the caller
    loaded it; otherwise it is read when needed. blocked_by (stage, retryable) names an upstream stage that
    failed for this item: the item fails as upstream_failed.<stage> without a model call. With an open
    breaker the item is not tried at all (status untouched, nothing recorded)."""
    if breaker is not None and breaker.open:
        return ItemOutcome(media_id=inputs.media.id, stage=stage.job_type, status="untouched")
    outcome = _run_item(pipeline, stage, inputs, state=state, force=force, model=model, job_id=job_id,
                        run_id=run_id, problem=problem, blocked_by=blocked_by)
    if breaker is not None:
        breaker.record(outcome.error_obj)
    return outcome


def _run_item(pipeline: Pipeline, stage: Stage, inputs: StageInputs, *, state: dict[str, Any] | None,
              force: bool, model: str | None, job_id: int | None, run_id: str | None,
              problem: dict[str, Any] | None, blocked_by: tuple[str, bool] | None) -> ItemOutcome:
    run = _ItemRun(pipeline, stage, inputs, state=state, force=force, model=model, job_id=job_id, run_id=run_id,
                   problem=problem)
    return run.prepare(blocked_by) or run.finish()


class _ItemRun:
    """One stage for one item in two steps: `prepare` (plan, read the files, fingerprint, skip what is
    unchanged) and `finish` (call the model unless a combined call already answered, build, check, persist).
    Typed failures end as a failed or skipped outcome, recorded; never raised."""

    def __init__(self, pipeline: Pipeline, stage: Stage, inputs: StageInputs, *, state: dict[str, Any] | None,
                 force: bool, model: str | None, job_id: int | None, run_id: str | None,
                 problem: dict[str, Any] | None, shared: tuple[dict[int, Any], dict[int, str]] | None = None) -> None:
        """shared: (sources, prepared images) of the item's other stages, so a file is read, decoded and
        encoded once per item, not once per stage."""
        self.pipeline, self.stage, self.inputs = pipeline, stage, inputs
        self.state, self.force, self.job_id, self.run_id = state, force, job_id, run_id
        self.media_id = inputs.media.id
        self.started = time.perf_counter()
        self.metrics = CallMetrics()
        self.model = model or pipeline.model_for(stage)
        self.fingerprint: str | None = None
        self.current: Any = None  # the image being read or decoded, to tell the item's own file from another's
        self.sources: dict[int, tuple[str, Path, bytes | None, str]] = shared[0] if shared is not None else {}
        self.prepared: dict[int, str] = shared[1] if shared is not None else {}
        self.requests: list[ModelRequest] = []
        self.options: OllamaOptions | None = None
        self.combinable = False
        self.answered: dict[str, BaseModel] | None = None  # answers of `call`, for `finish`
        self._problem = problem

    def known_problem(self) -> dict[str, Any] | None:
        if self._problem is _UNLOADED:
            self._problem = repository.stage_states(self.pipeline.engine, repository.MEDIA_STAGE,
                                                    [self.media_id]).get(self.media_id)
        return self._problem

    def done(self, outcome: ItemOutcome) -> ItemOutcome:
        if self.media_id in self.sources and self.known_problem():  # the file is usable again: off the list
            repository.clear_media_problem(self.pipeline.engine, self.media_id,
                                           lock_retries=self.pipeline.settings.database.lock_retries)
        return outcome

    def prepare(self, blocked_by: tuple[str, bool] | None = None) -> ItemOutcome | None:
        """Plan and fingerprint; an outcome when the item is finished here (blocked, unchanged, a file
        problem), None when it needs its model answers (then `finish`)."""
        pipeline, stage, inputs, model = self.pipeline, self.stage, self.inputs, self.model
        try:
            if blocked_by is not None:
                upstream, _ = blocked_by  # retryable or not, ERROR_CODES decides for upstream_failed.*
                raise BlockedError(f"{upstream} failed for media {self.media_id}, so {stage.job_type} was not run",
                                   code=f"upstream_failed.{upstream}")
            if not self.force and stage.run_condition is not None:
                held = stage.run_condition(inputs, self.state)
                if held is not None:
                    pipeline.logs.job_event("stage_skipped", job_id=self.job_id, run_id=self.run_id,
                                            media_id=self.media_id, job_type=stage.job_type, model=model,
                                            reason=held.reason, message=held.message, calls=0)
                    return ItemOutcome(media_id=self.media_id, stage=stage.job_type, status="skipped",
                                       reason=held.reason, model=model)
            self.requests = requests = list(stage.plan(stage, inputs))
            for req in requests:
                for ref in req.images:
                    if ref.media_id not in self.sources:
                        self.current = ref
                        self.sources[ref.media_id] = _read_source(pipeline, ref, inputs.media.type,
                                                                  ref.media_id == self.media_id)
            self.current = None
            self.options = options = pipeline.options_for(stage, model)
            self.combinable = combinable(stage, inputs, requests)
            extra = {"extra": stage.fingerprint_extra(inputs)} if stage.fingerprint_extra else {}
            # The request shape is part of the fingerprint only when combining is on, so turning it on or
            # off re-runs the combinable stages once, and fingerprints made without it stay as they were.
            shape = {"shape": "combined"} if self.combinable and pipeline.settings.pipeline.combine_vision_stages else {}
            self.fingerprint = fingerprint = sha256_json({
                **extra, **shape,
                "stage": stage.version, "model": model, "digest": pipeline.client.model_digest(model),
                "options": options.ollama_options(), "max_pixels": pipeline.settings.pipeline.max_pixels,
                "requests": [{"key": r.key, "prompt": hashlib.sha256(r.prompt.encode()).hexdigest(),
                              "images": [self.sources[i.media_id][0] for i in r.images]} for r in requests],
            })
            state = self.state
            if not self.force and state and state.get("status") == "ok" and state.get("fingerprint") == fingerprint:
                refreshed = stage.refresh(stage, inputs) if stage.refresh is not None else None
                if refreshed is None:
                    return self.done(ItemOutcome(media_id=self.media_id, stage=stage.job_type, status="skipped",
                                                 model=model, fingerprint=fingerprint))
                return self.done(self._persist(refreshed))
            return None
        except OllamaPipelineError as exc:
            return self.fail(exc)
        except Exception as exc:  # an unexpected bug still fails only this item, with its type logged
            return self.fail(OllamaPipelineError(f"unexpected {type(exc).__name__}: {exc}"))

    def warm_up(self) -> None:
        loading = time.perf_counter()
        self.pipeline.warm_up(self.stage, self.model, job_id=self.job_id, run_id=self.run_id, media_id=self.media_id,
                              job_type=self.stage.job_type)  # once per model and host; not on this item's clock
        self.started += time.perf_counter() - loading

    def preload(self) -> None:
        """Decode and encode the images of this stage's requests now, before the item takes a slot; a
        problem is left for `finish`, which meets it again and reports it."""
        try:
            for req in self.requests:
                for ref in req.images:
                    self.image_b64(ref)
        except Exception:  # reported by finish
            pass
        self.current = None

    def image_b64(self, ref: Any) -> str:
        """The prepared (checked, downscaled, encoded) image of a request, once per item."""
        if ref.media_id not in self.prepared:
            cfg = self.pipeline.settings
            self.current = ref
            sha, path, data, kind = self.sources[ref.media_id]
            label = f"media file {ref.path!r}"
            img = video_frame(path, label)[0] if kind == "video" else open_image(data or b"", label, ref.path)
            self.prepared[ref.media_id] = encode_prepared(
                img, ref.path, max_image_bytes=cfg.ollama.max_image_bytes, max_pixels=cfg.pipeline.max_pixels,
                source_sha256=sha, source_bytes=len(data) if data is not None else path.stat().st_size).b64
            self.current = None
        return self.prepared[ref.media_id]

    def _answers(self) -> dict[str, BaseModel]:
        self.warm_up()
        answers: dict[str, BaseModel] = {}
        for req in self.requests:
            b64 = [self.image_b64(ref) for ref in req.images]
            assert self.options is not None
            answers[req.key] = _call_model(self.pipeline, self.stage, req, b64, self.options, self.metrics,
                                           str(self.media_id))
        return answers

    def call(self) -> ItemOutcome | None:
        """Only the model calls of `finish` (kept for it); an outcome when they failed (recorded)."""
        try:
            self.answered = self._answers()
            return None
        except OllamaPipelineError as exc:
            return self.fail(exc)
        except Exception as exc:  # an unexpected bug still fails only this item, with its type logged
            return self.fail(OllamaPipelineError(f"unexpected {type(exc).__name__}: {exc}"))

    def finish(self, given: BaseModel | None = None, *, shared: CallMetrics | None = None,
               combined: Sequence[str] = (), untrusted: Sequence[str] = ()) -> ItemOutcome:
        """Call the model for each request and persist. `given`: this stage's part of a combined answer
        (already valid against its schema); `shared`: its share of that call's cost; `combined`: the stages
        of that call. A part that does not hold up (build or injection check) falls back to the stage's own
        request; so does a stage whose part failed (given None, combined set)."""
        stage, inputs = self.stage, self.inputs
        if shared is not None:
            _add_metrics(self.metrics, shared)
        request = "combined" if given is not None else "own"
        try:
            output = None
            if given is not None:
                try:
                    output = stage.combine(stage, inputs, {"main": given})
                    check_injection(stage, inputs, output, extra=untrusted)
                except OllamaPipelineError as exc:  # this part falls back to the stage's own request
                    self._rejected(exc, combined)
                    output, request = None, "own"
            elif combined:
                request = "own"
            if output is None:
                answers = self.answered if self.answered is not None else self._answers()
                output = stage.combine(stage, inputs, answers)
                check_injection(stage, inputs, output)
            log = {"request": request, "combined_with": list(combined)} if combined else {}
            return self.done(self._persist(output, force=self.force, **log))
        except OllamaPipelineError as exc:
            return self.fail(exc)
        except Exception as exc:  # an unexpected bug still fails only this item, with its type logged
            return self.fail(OllamaPipelineError(f"unexpected {type(exc).__name__}: {exc}"))

    def _rejected(self, exc: OllamaPipelineError, combined: Sequence[str]) -> None:
        self.pipeline.logs.job_event("combined_part_rejected", job_id=self.job_id, run_id=self.run_id,
                                     media_id=self.media_id, job_type=self.stage.job_type, code=exc.code,
                                     combined_with=list(combined))

    def _persist(self, output: StageOutput, *, force: bool = False, **log: Any) -> ItemOutcome:
        assert self.fingerprint is not None
        return _persist_output(self.pipeline, self.stage, self.inputs, output, model=self.model,
                               fingerprint=self.fingerprint, metrics=self.metrics, started=self.started,
                               job_id=self.job_id, run_id=self.run_id, force=force, **log)

    def fail(self, error: OllamaPipelineError) -> ItemOutcome:
        pipeline, stage, media_id, model = self.pipeline, self.stage, self.media_id, self.model
        job_id, run_id, metrics = self.job_id, self.run_id, self.metrics
        metrics.wall_ms = (time.perf_counter() - self.started) * 1000.0
        current = self.current
        if current is not None and current.media_id == media_id:
            try:
                reason = note_media_problem(pipeline, self.inputs.media, error, self.known_problem(), run_id=run_id,
                                            job_id=job_id)
            except OllamaPipelineError as record_error:
                pipeline.logs.error(record_error, media_id=media_id, job_type=stage.job_type, job_id=job_id)
                reason = None
            if reason is not None:
                pipeline.logs.job_event("stage_skipped", job_id=job_id, run_id=run_id, media_id=media_id,
                                        job_type=stage.job_type, model=model, reason=reason, code=error.code,
                                        duration_ms=round(metrics.wall_ms, 1), calls=metrics.calls)
                return ItemOutcome(media_id=media_id, stage=stage.job_type, status="skipped", reason=reason,
                                   model=model, fingerprint=self.fingerprint, error=error.to_dict(), metrics=metrics)
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
                           fingerprint=self.fingerprint, error=error.to_dict(), metrics=metrics)


def _add_metrics(into: CallMetrics, more: CallMetrics) -> None:
    for name in ("calls", "prompt_eval_count", "eval_count", "total_duration_ms", "load_duration_ms", "image_bytes",
                 "repairs"):
        setattr(into, name, getattr(into, name) + getattr(more, name))


def run_item_held(pipeline: Pipeline, stage: Stage, inputs: StageInputs, **kwargs: Any) -> ItemOutcome:
    """run_item with one slot of the item's host held for all its calls (candidates, repairs), so they
    reach the Ollama slot that has the item's image in its prompt cache."""
    with pipeline.client.hold(str(inputs.media.id)):
        return run_item(pipeline, stage, inputs, **kwargs)


def spread_over_hosts(pipeline: Pipeline, ids: list[int], models: Iterable[str]) -> list[int]:
    """With several hosts: decide each item's host for this run (core/hosts.py `assign`, bounded loads)
    and order the items so the hosts' items interleave in proportion to their shares; then the calls in
    flight at any moment are spread over every host, not queued behind one while another idles."""
    pool = pipeline.client.pool
    if len(pool.hosts) < 2 or len(ids) < 2:
        return ids
    keys = [str(i) for i in ids]
    plans = [pool.assign(keys, m) for m in dict.fromkeys(models)]
    mine: dict[int, list[int]] = {}
    for media_id in ids:
        mine.setdefault(plans[0][str(media_id)].index, []).append(media_id)
    position = {media_id: (k + 0.5) / len(group) for group in mine.values() for k, media_id in enumerate(group)}
    return sorted(ids, key=lambda i: position[i])


def run_stage(pipeline: Pipeline, stage: Stage | str, media_ids: Iterable[int], *, force: bool = False,
              concurrency: int | None = None, run_id: str | None = None, job_ids: dict[int, int] | None = None,
              chunk_size: int = 256, model: str | None = None,
              breaker: CircuitBreaker | None = None) -> Iterator[ItemOutcome]:
    """Run a stage over many items with bounded concurrency; yields one outcome per item as they complete.

    model overrides the configured model of the stage (a job payload's `model`). breaker (default: one for
    this call, `pipeline.circuit_breaker`) stops the run after that many network failures in a row: the
    items not tried by then come back as `untouched`, with nothing recorded for them. An item whose stored
    upstream result is a failure fails as upstream_failed.<stage> without a model call."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    ids = spread_over_hosts(pipeline, as_library_ids(pipeline.engine, media_ids),
                            [model or pipeline.model_for(stage)])
    workers = max(1, concurrency or pipeline.settings.pipeline.concurrency)
    if len(pipeline.client.pool.hosts) > 1:  # enough calls at once to fill every host's slots
        workers = max(workers, 2 * pipeline.client.pool.total_slots)
    job_ids = job_ids or {}
    breaker = breaker or CircuitBreaker(pipeline.settings.pipeline.circuit_breaker)
    lock = threading.Lock()
    # Items in flight or finished but not yet taken by the caller: a caller that is busy for a moment
    # (a Dagster run storing events) does not leave the model server idle.
    window = max(workers * 4, 32)
    submitted = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{stage.job_type}") as pool:
        pending: set[Future[ItemOutcome]] = set()
        for start in range(0, len(ids), chunk_size):
            if breaker.open:
                break
            chunk = ids[start : start + chunk_size]
            inputs = repository.load_inputs_many(pipeline.engine, chunk)
            if stage.enrich is not None:
                with lock:
                    stage.enrich(pipeline, inputs)
            states = repository.stage_states(pipeline.engine, stage.job_type, chunk)
            problems = repository.stage_states(pipeline.engine, repository.MEDIA_STAGE, chunk)
            blocked = upstream_failures(pipeline, stage, chunk) if stage.upstream else {}
            for media_id in chunk:
                if breaker.open:
                    break
                submitted += 1
                if media_id not in inputs:
                    err = ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
                    pipeline.logs.error(err, media_id=media_id, job_type=stage.job_type, run_id=run_id)
                    yield ItemOutcome(media_id=media_id, stage=stage.job_type, status="failed", error=err.to_dict())
                    continue
                while len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield fut.result()
                pending.add(pool.submit(run_item_held, pipeline, stage, inputs[media_id], state=states.get(media_id),
                                        force=force, model=model, job_id=job_ids.get(media_id), run_id=run_id,
                                        problem=problems.get(media_id), blocked_by=blocked.get(media_id),
                                        breaker=breaker))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    for media_id in ids[submitted:]:
        yield ItemOutcome(media_id=media_id, stage=stage.job_type, status="untouched")
    if breaker.open:
        pipeline.logs.job_event("circuit_open", run_id=run_id, job_type=stage.job_type,
                                consecutive_failures=breaker.consecutive,
                                code=(breaker.last_error or {}).get("code"),
                                untouched=len(ids) - submitted)
    log_hosts(pipeline, run_id, stage.job_type)


def log_hosts(pipeline: Pipeline, run_id: str | None, stage: str) -> None:
    """With several hosts: their state and this process's counters so far, as one `hosts` log event."""
    if len(pipeline.client.pool.hosts) > 1:
        pipeline.logs.job_event("hosts", run_id=run_id, job_type=stage, hosts=pipeline.client.host_stats())


_CombinedAnswer = pydantic.RootModel[dict[str, Any]]


def _split(total: float, weights: Sequence[float], *, whole: bool) -> list[float]:
    """total shared in proportion to weights (equal shares when they are all 0); whole numbers keep the sum."""
    w = [max(0.0, float(x)) for x in weights]
    if not sum(w):
        w = [1.0] * len(w)
    raw = [total * x / sum(w) for x in w]
    if not whole:
        return raw
    base = [math.floor(r) for r in raw]
    for i in sorted(range(len(w)), key=lambda i: raw[i] - base[i], reverse=True)[: int(round(total - sum(base)))]:
        base[i] += 1
    return [float(b) for b in base]


def _combined_call(pipeline: Pipeline, runs: list[_ItemRun]) -> list[tuple[BaseModel | None, CallMetrics]]:
    """One call answering the question of every run (prepared stages of one item). Per run: its part,
    validated against its own schema (None: no valid part, the stage falls back to its own request), and
    its share of the call's cost. Apportioning rule: prompt tokens by each stage's share of the schema's
    top-level fields; output tokens and model time by its share of the answer's JSON (the characters of
    its part); the call itself, its attempts, repairs and image bytes count on the first stage."""
    first = runs[0]
    stages = [r.stage for r in runs]
    request = combined_request(first.inputs, [(r.stage, r.requests[0]) for r in runs])
    assert first.options is not None
    options = first.options.model_copy(update={"format": combined_schema(stages)})
    metrics = CallMetrics()
    names = [s.job_type for s in stages]
    parts: dict[str, Any] = {}
    first.warm_up()
    try:
        b64 = [first.image_b64(ref) for ref in request.images]
        for run in runs[1:]:
            run.prepared.update(first.prepared)
        try:
            response = pipeline.client.analyze_image(b64, request.prompt, options, system=SYSTEM_PROMPT,
                                                     affinity=str(first.media_id))
        except OllamaPipelineError as exc:
            metrics.calls += int(exc.details.get("attempts", 1))
            raise
        metrics.add_response(response)
        parts = parse_answer(response.text, response.done_reason, _CombinedAnswer).root
    except OllamaPipelineError as exc:  # every stage falls back to its own request (which reports its error)
        first.current = None
        pipeline.logs.job_event("combined_call_failed", run_id=first.run_id, media_id=first.media_id,
                                combined_with=names, code=exc.code, calls=metrics.calls)
    answers: list[BaseModel | None] = []
    sizes: list[int] = []
    for run in runs:
        raw = parts.get(run.stage.job_type)
        sizes.append(len(canonical_json(raw)) if raw is not None else 0)
        try:
            answers.append(run.stage.output_schema.model_validate(raw) if raw is not None else None)
        except pydantic.ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors()})
            run._rejected(ValidationError(f"part does not match schema {run.stage.output_schema.__name__}: fields "
                                          f"{', '.join(fields[:8])}", code="validation.schema"), names)
            answers.append(None)
    prompt = _split(metrics.prompt_eval_count, [schema_fields(s) for s in stages], whole=True)
    output = _split(metrics.eval_count, sizes, whole=True)
    total = _split(metrics.total_duration_ms, sizes, whole=False)
    load = _split(metrics.load_duration_ms, sizes, whole=False)
    shares = []
    for i in range(len(runs)):
        shares.append(CallMetrics(calls=metrics.calls if i == 0 else 0, prompt_eval_count=int(prompt[i]),
                                  eval_count=int(output[i]), total_duration_ms=total[i], load_duration_ms=load[i],
                                  image_bytes=metrics.image_bytes if i == 0 else 0))
    return list(zip(answers, shares, strict=True))


def _item_stages(pipeline: Pipeline, stages: Sequence[Stage], inputs: StageInputs, *,
                 states: Mapping[str, dict[str, Any] | None], problem: dict[str, Any] | None,
                 blocked: Mapping[str, tuple[str, bool]], force: bool, model: str | None, run_id: str | None,
                 breaker: CircuitBreaker | None) -> list[ItemOutcome]:
    """An item's stages back to back on one slot of its host; with pipeline.combine_vision_stages the
    combinable ones in one combined call (a stage that depends on another of them runs after it)."""
    media_id = inputs.media.id
    outcomes: dict[str, ItemOutcome] = {}
    combine = pipeline.settings.pipeline.combine_vision_stages
    names = {s.job_type for s in stages}

    def stopped() -> bool:
        return breaker is not None and breaker.open

    def note(outcome: ItemOutcome, *, counted: bool = False) -> None:
        outcomes[outcome.stage] = outcome
        if breaker is not None and outcome.status != "untouched" and not counted:
            breaker.record(outcome.error_obj)

    def upstream_of(stage: Stage) -> tuple[str, bool] | None:
        if stage.job_type in blocked:
            return blocked[stage.job_type]
        for upstream in stage.upstream:  # failed earlier in this item's turn
            done = outcomes.get(upstream)
            if done is not None and done.status == "failed":
                return upstream, bool((done.error or {}).get("retryable"))
        return None

    def run_alone(stage: Stage) -> None:
        note(run_item(pipeline, stage, inputs, state=states.get(stage.job_type), force=force, model=model,
                      run_id=run_id, problem=problem, blocked_by=upstream_of(stage), breaker=breaker),
             counted=True)  # run_item told the breaker

    shared: tuple[dict[int, Any], dict[int, str]] = ({}, {})
    if not combine:
        # Prepare every stage that does not wait for another of them (plan, read, fingerprint, decode and
        # encode the image: once per item) before the first call, make the item's calls back to back on
        # its slot, and give the slot back before the answers are built, checked and written: the slot
        # waits only on the calls, not on CPU work or writes that can be done without it.
        ready: dict[str, tuple[_ItemRun, float]] = {}
        with pipeline.client.hold(str(media_id)):  # the slot is taken at the item's first call
            for stage in stages:
                if set(stage.upstream) & names or stopped():
                    continue
                clock = time.perf_counter()
                run = _ItemRun(pipeline, stage, inputs, state=states.get(stage.job_type), force=force, model=model,
                               job_id=None, run_id=run_id, problem=problem, shared=shared)
                done = run.prepare(upstream_of(stage))
                if done is not None:
                    note(done)
                    continue
                run.preload()
                ready[stage.job_type] = (run, time.perf_counter() - clock)
            for stage in stages:
                if stage.job_type not in ready:
                    continue
                run, prep_s = ready[stage.job_type]
                run.started = time.perf_counter() - prep_s  # its wall time: its own work, not the wait
                failed = None if not stopped() else ItemOutcome(media_id=media_id, stage=stage.job_type,
                                                                status="untouched")
                failed = failed or run.call()
                if failed is not None:
                    note(failed)
                    del ready[stage.job_type]
        for run, _ in ready.values():
            note(run.finish())
        if len(outcomes) < len(stages):
            with pipeline.client.hold(str(media_id)):
                for stage in stages:
                    if stage.job_type in outcomes:
                        continue
                    if stopped():
                        note(ItemOutcome(media_id=media_id, stage=stage.job_type, status="untouched"))
                    else:
                        run_alone(stage)
        return [outcomes[s.job_type] for s in stages]
    with pipeline.client.hold(str(media_id)):
        later: list[Stage] = []
        pending: list[_ItemRun] = []
        for stage in stages:
            if stage.model_kind != "vision" or set(stage.upstream) & names:
                later.append(stage)
                continue
            if stopped():
                note(ItemOutcome(media_id=media_id, stage=stage.job_type, status="untouched"))
                continue
            run = _ItemRun(pipeline, stage, inputs, state=states.get(stage.job_type), force=force, model=model,
                           job_id=None, run_id=run_id, problem=problem, shared=shared)
            prepared = run.prepare(upstream_of(stage))
            if prepared is not None:
                note(prepared)
            elif run.combinable:
                pending.append(run)
            else:
                note(run.finish())
        if len(pending) == 1:
            note(pending[0].finish())
        elif pending:
            together = [r.stage.job_type for r in pending]
            untrusted = [text for r in pending for text in untrusted_strings(r.stage, r.inputs)]
            for run, (answer, share) in zip(pending, _combined_call(pipeline, pending), strict=True):
                if answer is None and stopped():
                    note(ItemOutcome(media_id=media_id, stage=run.stage.job_type, status="untouched",
                                     metrics=share))
                    continue
                note(run.finish(answer, shared=share, combined=together, untrusted=untrusted))
        for stage in later:
            run_alone(stage)
    return [outcomes[s.job_type] for s in stages]


def run_items(pipeline: Pipeline, stages: Sequence[Stage | str], media_ids: Iterable[int], *, force: bool = False,
              concurrency: int | None = None, run_id: str | None = None, model: str | None = None,
              breaker: CircuitBreaker | None = None, exclude: Mapping[str, Collection[int]] | None = None,
              chunk_size: int = 256) -> Iterator[ItemOutcome]:
    """Several stages item by item: each item's stages back to back on one slot of its host (the image is
    prefilled once, then served from Ollama's prompt cache; with pipeline.combine_vision_stages, one call
    answers them all). Yields one outcome per item and stage as they complete.

    exclude: per job type, items not to run for it (the caller accounts for them). breaker as in
    run_stage: once open, the items not tried come back `untouched` for each of their stages."""
    order = [get_stage(s) if isinstance(s, str) else s for s in stages]
    ids = spread_over_hosts(pipeline, as_library_ids(pipeline.engine, media_ids),
                            [model or pipeline.model_for(s) for s in order])
    exclude = exclude or {}
    skip = {s.job_type: set(exclude.get(s.job_type, ())) for s in order}
    breaker = breaker or CircuitBreaker(pipeline.settings.pipeline.circuit_breaker)
    # Two items per slot: while one holds the slot for its calls, the next is prepared (plan, read,
    # fingerprint, decode and encode its image) and waits for the slot with its requests ready; the
    # slots bound the calls, the workers bound the prepared images held in memory (one item each).
    workers = max(1, concurrency or pipeline.settings.pipeline.concurrency, 2 * pipeline.client.pool.total_slots)
    window = max(workers * 4, 32)
    lock = threading.Lock()
    submitted = 0
    label = ",".join(s.job_type for s in order)

    def wanted(media_id: int) -> list[Stage]:
        return [s for s in order if media_id not in skip[s.job_type]]

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="items") as pool:
        pending: set[Future[list[ItemOutcome]]] = set()
        for start in range(0, len(ids), chunk_size):
            if breaker.open:
                break
            chunk = ids[start : start + chunk_size]
            inputs = repository.load_inputs_many(pipeline.engine, chunk)
            with lock:
                for stage in order:
                    if stage.enrich is not None:
                        stage.enrich(pipeline, inputs)  # each enrichment fills its own field
            states = {s.job_type: repository.stage_states(pipeline.engine, s.job_type, chunk) for s in order}
            problems = repository.stage_states(pipeline.engine, repository.MEDIA_STAGE, chunk)
            blocked: dict[str, dict[int, tuple[str, bool]]] = {
                s.job_type: upstream_failures(pipeline, s, chunk) for s in order if s.upstream}
            for media_id in chunk:
                if breaker.open:
                    break
                submitted += 1
                mine = wanted(media_id)
                if not mine:
                    continue
                if media_id not in inputs:
                    err = ValidationError(f"no media row with id {media_id}", code="validation.media_missing")
                    pipeline.logs.error(err, media_id=media_id, job_type=label, run_id=run_id)
                    for stage in mine:
                        yield ItemOutcome(media_id=media_id, stage=stage.job_type, status="failed", error=err.to_dict())
                    continue
                while len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        yield from fut.result()
                pending.add(pool.submit(
                    _item_stages, pipeline, mine, inputs[media_id],
                    states={j: states[j].get(media_id) for j in states}, problem=problems.get(media_id),
                    blocked={j: b[media_id] for j, b in blocked.items() if media_id in b}, force=force,
                    model=model, run_id=run_id, breaker=breaker))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield from fut.result()
    untouched = 0
    for media_id in ids[submitted:]:
        for stage in wanted(media_id):
            untouched += 1
            yield ItemOutcome(media_id=media_id, stage=stage.job_type, status="untouched")
    if breaker.open:
        pipeline.logs.job_event("circuit_open", run_id=run_id, job_type=label,
                                consecutive_failures=breaker.consecutive,
                                code=(breaker.last_error or {}).get("code"), untouched=untouched)
    log_hosts(pipeline, run_id, label)


def run_stages(pipeline: Pipeline, job_types: Iterable[str], media_ids: Iterable[int], *, force: bool = False,
               concurrency: int | None = None, run_id: str | None = None, chunk_size: int = 256
               ) -> Iterator[ItemOutcome]:
    """Run several stages item by item: an item's vision stages back to back on one slot of its host (the
    image is prefilled once, then served from Ollama's prompt cache), then the text stages stage by stage
    (vision work first, so a host that holds one model swaps once). Yields outcomes as they complete."""
    order = [get_stage(j) for j in stage_order(job_types)]
    vision = [s for s in order if s.model_kind == "vision"]
    text = [s for s in order if s.model_kind == "text"]
    ids = as_library_ids(pipeline.engine, media_ids)
    if vision and ids:
        yield from run_items(pipeline, vision, ids, force=force, concurrency=concurrency, run_id=run_id,
                             chunk_size=chunk_size)
    for stage in text:
        yield from run_stage(pipeline, stage, ids, force=force, concurrency=concurrency, run_id=run_id,
                             chunk_size=chunk_size)
