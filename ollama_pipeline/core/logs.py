"""Structured JSONL logs (§5): `ollama_jobs.jsonl` and `ollama_errors.jsonl`.

Redaction happens here, once, for every line: secrets (passwords in URLs, tokens, Authorization headers,
API keys) are masked and anything that looks like base64 or image bytes is replaced by its length. Each
line is written with one `write` on a file opened with O_APPEND under an advisory lock, so several
processes can append at once without interleaving.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ollama_pipeline.core.errors import redact_url_credentials

JOBS_LOG = "ollama_jobs.jsonl"
ERRORS_LOG = "ollama_errors.jsonl"

_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|api[_-]?key|authorization|cookie|credential)", re.I)
_BINARY_KEYS = {"images", "image", "image_b64", "data", "bytes"}
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=_-]{100,}")
_KEYLIKE = re.compile(r"(?i)\b(api[_-]?key|token|password|secret)=([^&\s]+)")
_MAX_STRING = 2000


def redact_text(value: str) -> str:
    """Mask credentials in URLs, bearer tokens, key=value secrets and long base64-like runs."""
    value = redact_url_credentials(value)
    value = _BEARER.sub(lambda m: f"{m.group(1)} ***", value)
    value = _KEYLIKE.sub(lambda m: f"{m.group(1)}=***", value)
    value = _BASE64_RUN.sub(lambda m: f"<redacted {len(m.group(0))} chars>", value)
    if len(value) > _MAX_STRING:
        value = value[:_MAX_STRING] + f"...<{len(value) - _MAX_STRING} more chars>"
    return value


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of value that is safe to log."""
    if key is not None and _SECRET_KEYS.search(key) and value not in (None, "", 0):
        return "***"
    if key is not None and key.lower() in _BINARY_KEYS and value:
        if isinstance(value, list | tuple):
            return [f"<{len(v) if isinstance(v, str | bytes) else '?'} bytes redacted>" for v in value]
        return f"<{len(value) if isinstance(value, str | bytes) else '?'} bytes redacted>"
    if isinstance(value, dict):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes redacted>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact_text(str(value))


class JsonlLog:
    """Appends redacted JSON objects, one per line, to a file; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "event": event, "pid": os.getpid()}
        record.update({k: v for k, v in fields.items() if v is not None})
        safe = redact(record)
        line = (json.dumps(safe, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)
        return safe


class PipelineLogs:
    """The two log files of one logs folder."""

    def __init__(self, logs_dir: Path) -> None:
        self.jobs = JsonlLog(Path(logs_dir) / JOBS_LOG)
        self.errors = JsonlLog(Path(logs_dir) / ERRORS_LOG)

    def job_event(self, event: str, **fields: Any) -> None:
        self.jobs.write(event, **fields)

    def error(self, error: Any, **fields: Any) -> None:
        """Log a typed pipeline error (metadata only) to the errors log."""
        data = error.to_dict() if hasattr(error, "to_dict") else {"channel": "internal", "code": "internal.error",
                                                                  "message": str(error)}
        self.errors.write("error", **data, **fields)
