"""The seed's error channels (§6): one exception class per channel, each carrying a stable code.

Every failure the pipeline reports is one of these. Codes are part of the public contract (README lists
them); never rename one. This module must not import anything else from the package. A message never
carries the password of a URL (`redact_url_credentials`, which the logs use too).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

# scheme://user:password@host -> scheme://user:***@host; scheme://token@host -> scheme://***@host.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s'\"]*)"
                              r"(?::(?P<pw>[^@/\s'\"]*))?@")


def redact_url_credentials(text: str) -> str:
    """Mask the password of every URL in text (`http://user:***@host`); a lone user part may be a token."""
    def mask(m: re.Match[str]) -> str:
        if m.group("pw") is None:
            return f"{m.group('scheme')}***@"
        return f"{m.group('scheme')}{m.group('user')}:***@"

    return _URL_CREDENTIALS.sub(mask, text)


class OllamaPipelineError(Exception):
    """Base of every typed pipeline error: a channel, a stable code, a message and metadata."""

    channel: ClassVar[str] = "internal"
    default_code: ClassVar[str] = "internal.error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        message = redact_url_credentials(str(message))  # a message may be shown anywhere: never a password
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.http_status = http_status
        self.details = {k: redact_url_credentials(v) if isinstance(v, str) else v for k, v in (details or {}).items()}

    @property
    def retryable(self) -> bool:
        """Whether the client or the queue retries this failure: ERROR_CODES decides, never the caller."""
        return is_retryable(self.code)

    def __str__(self) -> str:
        return f"[{self.channel}/{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Metadata for logs and job rows (never payloads)."""
        return {
            "channel": self.channel,
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "http_status": self.http_status,
            **({"details": self.details} if self.details else {}),
        }


class NetworkError(OllamaPipelineError):
    """Network or timeout failure talking to Ollama (connect refused, timeout, HTTP 5xx, 503 busy)."""

    channel = "network"
    default_code = "network.connect"


class InvalidResponseFormatError(OllamaPipelineError):
    """The model answered, but not with pure JSON (prose, code fence, reasoning text, truncation), or the
    model itself is unusable (not found, request refused)."""

    channel = "invalid_response_format"
    default_code = "invalid_response_format.not_json"


class ValidationError(OllamaPipelineError):
    """Input or payload failed validation: a JSON answer that breaks the stage schema, a bad job payload,
    a bad config value, a missing/corrupt/oversized media file."""

    channel = "validation"
    default_code = "validation.payload"


class ConfigError(ValidationError):
    """The configuration is missing a required key or holds a wrong value."""

    default_code = "validation.config"


class PersistenceError(OllamaPipelineError):
    """The database refused a write or read (lock, constraint, connection)."""

    channel = "persistence"
    default_code = "persistence.db"


class QueueLimitError(OllamaPipelineError):
    """A queue limit refused an enqueue (rate per minute, or overflow of queued jobs)."""

    channel = "queue_limit"
    default_code = "queue_limit.overflow"


class BlockedError(OllamaPipelineError):
    """An upstream stage failed for the item, so this stage was not sent to the model (code names it)."""

    channel = "blocked"
    default_code = "upstream_failed"


ERROR_CLASSES: tuple[type[OllamaPipelineError], ...] = (
    NetworkError,
    InvalidResponseFormatError,
    ValidationError,
    PersistenceError,
    QueueLimitError,
)

# code -> (channel, retryable, meaning). The README error table is generated from this.
ERROR_CODES: dict[str, tuple[str, bool, str]] = {
    "network.connect": ("network", True, "Ollama could not be reached (connection refused or reset)."),
    "network.timeout": ("network", True, "No answer within ollama.timeout_ms."),
    "network.server_error": ("network", True, "Ollama answered HTTP 5xx."),
    "network.busy": ("network", True, "Ollama answered 503: too many pending requests."),
    "network.stream_error": ("network", True, "Ollama reported an error in the middle of a stream."),
    "network.unavailable": ("network", True, "`run` asked Ollama for its health before the first model call and got no answer: nothing was started."),
    "network.dagster": ("network", True, "The Dagster webserver or its GraphQL command could not be reached to launch a backfill; no selection was kept."),
    "network.circuit_open": ("network", True, "A run stopped after pipeline.circuit_breaker model calls in a row failed with network errors; items it had not tried are untouched."),
    "invalid_response_format.not_json": ("invalid_response_format", False, "The answer is prose, not JSON."),
    "invalid_response_format.code_fence": ("invalid_response_format", False, "The JSON is wrapped in a Markdown code fence."),
    "invalid_response_format.reasoning": ("invalid_response_format", False, "Text (reasoning) stands before or after the JSON."),
    "invalid_response_format.truncated": ("invalid_response_format", False, "The answer was cut off (done_reason length or unterminated JSON)."),
    "invalid_response_format.empty": ("invalid_response_format", False, "The answer is empty."),
    "invalid_response_format.model_not_found": ("invalid_response_format", False, "The configured model is not installed in Ollama (404)."),
    "invalid_response_format.bad_request": ("invalid_response_format", False, "Ollama refused the request (HTTP 4xx)."),
    "validation.schema": ("validation", False, "The JSON answer does not match the stage's output schema."),
    "validation.prompt_injection": ("validation", False, "The answer repeats an instruction found in the item's library data, or holds one of its own (the model obeyed a planted prompt injection): nothing of it is written, its tags neither."),
    "validation.stored_value": ("validation", False, "A stage built a media_meta value that breaks the key's stored schema (a pipeline bug; nothing is written)."),
    "validation.payload": ("validation", False, "A job payload or API argument is invalid."),
    "validation.job_type": ("validation", False, "Unknown job type."),
    "validation.media_missing": ("validation", False, "No media row with that id."),
    "validation.file_missing": ("validation", False, "The media file does not exist."),
    "validation.path_outside_root": ("validation", False, "media.path points outside the configured media root."),
    "validation.image_corrupt": ("validation", False, "The media file cannot be decoded as an image."),
    "validation.model_not_vision": ("validation", False, "The model set for a vision stage cannot see images (its /api/show capabilities lack vision): nothing is sent."),
    "validation.image_too_large": ("validation", False, "The image has more pixels than the decompression-bomb limit (120 MP), or cannot be made to fit ollama.max_image_bytes."),
    "validation.unsupported_media_type": ("validation", False, "The media type or file format is not one the pipeline reads (see Media types): the item is skipped with reason unsupported_media_type, not failed, and listed by `ollama-pipeline jobs problems`."),
    "validation.config": ("validation", False, "A configuration key is missing or has a wrong value."),
    "validation.schema_missing": ("validation", False, "The gallery database lacks a required table or column (the check-db report names it and the mapping line or SQL that fixes it)."),
    "persistence.locked": ("persistence", True, "The database stayed locked after retries with backoff."),
    "persistence.constraint": ("persistence", False, "A database constraint refused the write."),
    "persistence.db": ("persistence", True, "Any other database error (connection lost, ...)."),
    "queue_limit.rate": ("queue_limit", True, "More enqueues per minute than pipeline.queue.max_enqueues_per_minute."),
    "queue_limit.overflow": ("queue_limit", True, "More queued jobs than pipeline.queue.max_queued."),
    "queue_limit.overflow_job_type": ("queue_limit", True, "More queued jobs of one type than pipeline.queue.max_queued_per_type."),
    "internal.error": ("internal", False, "An unexpected error (a bug) failed this item only; its type is in the message and the errors log."),
    "internal.lease_expired": ("internal", True, "A job's lease ran out (worker stopped or killed, or its Dagster run never started): requeued while attempts remain, then failed with this code."),
    "internal.run_failed": ("internal", True, "Older releases: the Dagster run of a job ended without an outcome for its item. Now a run records its jobs' end states itself, and jobs of a run that never took them go back to the queue."),
    "internal.run_canceled": ("internal", False, "Older releases: the Dagster run of a job was canceled before it reached the item (see internal.run_failed)."),
    "upstream_failed.<asset>": ("blocked", False, "The item's media or upstream stage (named in the code) failed, in this run or as its stored result, so this stage did not call the model for it (a title whose caption failed)."),
}


def is_retryable(code: str | None) -> bool:
    """The `retryable` column of ERROR_CODES for a code (`upstream_failed.<asset>` by its pattern).

    Every exception and every stored error reads it here, so the README table, the classes and the queue
    cannot disagree. A code that is not in the table is not retried.
    """
    if not code:
        return False
    entry = ERROR_CODES.get(code)
    if entry is None and code.startswith("upstream_failed."):
        entry = ERROR_CODES["upstream_failed.<asset>"]
    return bool(entry and entry[1])
