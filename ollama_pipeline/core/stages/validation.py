"""§8 rule in one function: a model answer must be pure JSON that validates against the stage schema.

Every stage's answers pass through `parse_answer`. Prose, code fences, reasoning text around the JSON
and truncated JSON are `invalid_response_format`; JSON that breaks the schema is `validation.schema`.
"""

from __future__ import annotations

import json
from typing import TypeVar

import pydantic
from pydantic import BaseModel

from ollama_pipeline.core.errors import InvalidResponseFormatError, ValidationError

M = TypeVar("M", bound=BaseModel)


def _classify(text: str) -> tuple[str, str]:
    stripped = text.strip()
    if stripped.startswith("```"):
        return "invalid_response_format.code_fence", "the answer is wrapped in a Markdown code fence"
    decoder = json.JSONDecoder()
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    if start > 0:
        try:
            decoder.raw_decode(stripped[start:])
            return "invalid_response_format.reasoning", "text stands before the JSON object"
        except ValueError:
            pass
    if start == 0:
        try:
            _, end = decoder.raw_decode(stripped)
            return "invalid_response_format.reasoning", f"text follows the JSON object at character {end}"
        except ValueError:
            return "invalid_response_format.truncated", "the JSON is incomplete"
    return "invalid_response_format.not_json", "the answer is prose, not JSON"


def parse_answer(text: str, done_reason: str | None, schema: type[M]) -> M:
    """Parse and validate one answer, or raise a typed error naming what is wrong (never the text)."""
    if not text or not text.strip():
        raise InvalidResponseFormatError("the model returned an empty answer", code="invalid_response_format.empty")
    if done_reason == "length":
        raise InvalidResponseFormatError("the answer was cut off (done_reason=length)",
                                         code="invalid_response_format.truncated")
    try:
        value = json.loads(text)
    except ValueError:
        code, why = _classify(text)
        raise InvalidResponseFormatError(f"not pure JSON: {why} ({len(text)} chars)", code=code) from None
    try:
        return schema.model_validate(value)
    except pydantic.ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors()})
        raise ValidationError(f"answer does not match schema {schema.__name__}: fields {', '.join(fields[:8])}",
                              code="validation.schema", details={"fields": fields[:20]}) from None


def repair_prompt(prompt: str, error: Exception) -> str:
    """The one repair request: the original prompt plus what was wrong with the last answer."""
    return (f"{prompt}\n\nYour previous answer was rejected: {error}. Answer again with exactly one JSON "
            f"object that matches the schema, and nothing else.")
