"""Ollama's request decoding as its Go server does it (api/types.go, encoding/json via gin).

Bodies are decoded into the request structs of api/types.go: a field of the wrong JSON type is a 400 with
Go's decoder message, `keep_alive` parses like Go's time.ParseDuration, `think` takes a bool or a level,
images are base64 (StdEncoding), and `options` are type-checked like api.Options.FromMap (a wrong type
is an error; an unknown option is ignored). Must not import the pipeline.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any


class RequestError(Exception):
    """An error Ollama answers with `{"error": message}` and this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---- JSON decoding with Go's messages -------------------------------------------------------------------

def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _syntax_error(doc: str, exc: json.JSONDecodeError) -> str:
    if exc.pos >= len(doc.rstrip()):
        return "unexpected EOF"
    ch = doc[exc.pos]
    shown = repr(ch) if ch != "'" else "'\\''"
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {shown} looking for beginning of object key string"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character {shown} after object key"
    if exc.msg.startswith("Expecting ','"):
        before = doc[: exc.pos].rstrip()
        depth_obj = before.count("{") - before.count("}")
        depth_arr = before.count("[") - before.count("]")
        where = "array element" if depth_arr > 0 and before.rfind("[") > before.rfind("{") else "object key:value pair"
        del depth_obj
        return f"invalid character {shown} after {where}"
    return f"invalid character {shown} looking for beginning of value"


def decode_body(raw: bytes) -> Any:
    """The first JSON value of a body, as Go's json.Decoder reads it (trailing data is not read)."""
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise RequestError(400, "missing request body")
    try:
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except json.JSONDecodeError as exc:
        raise RequestError(400, _syntax_error(text.lstrip(), exc)) from None
    return value


# Go field types: "string", "bool", "int", "*bool", "raw", "duration", "think", "images", "map", "any",
# "[]int", "messages", "tools", "array".
GO_TYPE_NAMES = {"string": "string", "bool": "bool", "*bool": "bool", "int": "int", "map": "map[string]interface {}",
                 "[]int": "[]int", "images": "[]api.ImageData", "messages": "[]api.Message", "tools": "api.Tools",
                 "array": "[]interface {}"}

GENERATE = ("GenerateRequest", {
    "model": "string", "prompt": "string", "suffix": "string", "system": "string", "template": "string",
    "context": "[]int", "stream": "*bool", "raw": "bool", "format": "raw", "keep_alive": "duration",
    "images": "images", "options": "map", "think": "think", "truncate": "*bool", "shift": "*bool",
    "_debug_render_only": "bool", "logprobs": "bool", "top_logprobs": "int"})
CHAT = ("ChatRequest", {
    "model": "string", "messages": "messages", "stream": "*bool", "format": "raw", "keep_alive": "duration",
    "tools": "tools", "options": "map", "think": "think", "truncate": "*bool", "shift": "*bool",
    "_debug_render_only": "bool", "logprobs": "bool", "top_logprobs": "int"})
MESSAGE = {"role": "string", "content": "string", "thinking": "string", "images": "images",
           "tool_calls": "array", "tool_name": "string", "tool_call_id": "string"}
EMBED = ("EmbedRequest", {"model": "string", "input": "any", "keep_alive": "duration", "truncate": "*bool",
                          "dimensions": "int", "options": "map"})
EMBEDDINGS = ("EmbeddingRequest", {"model": "string", "prompt": "string", "keep_alive": "duration", "options": "map"})
SHOW = ("ShowRequest", {"model": "string", "name": "string", "system": "string", "template": "string",
                        "verbose": "bool", "options": "map"})
COPY = ("CopyRequest", {"source": "string", "destination": "string"})
DELETE = ("DeleteRequest", {"model": "string", "name": "string"})
PULL = ("PullRequest", {"model": "string", "name": "string", "insecure": "bool", "username": "string",
                        "password": "string", "stream": "*bool"})


def _mismatch(value: Any, struct: str, path: str, gotype: str) -> RequestError:
    kind = _json_kind(value)
    if kind == "number" and gotype == "int":
        kind = f"number {value}"
    return RequestError(400, f"json: cannot unmarshal {kind} into Go struct field {struct}.{path} of type {gotype}")


def _decode_images(value: Any, struct: str, path: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _mismatch(value, struct, path, "[]api.ImageData")
    out = []
    for item in value:
        if item is None:
            out.append(b"")
            continue
        if not isinstance(item, str):
            raise _mismatch(item, struct, path, "api.ImageData")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            bad = next((i for i, c in enumerate(item) if c not in _B64), len(item) - (len(item) % 4 or 4))
            raise RequestError(400, f"illegal base64 data at input byte {bad}") from None
    return out


_B64 = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def decode_struct(value: Any, spec: tuple[str, dict[str, str]]) -> dict[str, Any]:
    """Check value against a request struct; return it with decoded images, durations and think values."""
    struct, fields = spec
    if not isinstance(value, dict):
        raise RequestError(400, f"json: cannot unmarshal {_json_kind(value)} into Go value of type api.{struct}")
    by_lower = {k.lower(): k for k in fields}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = by_lower.get(key.lower())
        if name is None:
            continue  # Go ignores unknown fields
        out[name] = _decode_field(item, fields[name], struct, name)
    return out


def _decode_field(item: Any, gotype: str, struct: str, path: str) -> Any:
    if gotype == "raw" or gotype == "any":
        return item
    if item is None:
        return None
    if gotype == "string" and not isinstance(item, str):
        raise _mismatch(item, struct, path, "string")
    if gotype in ("bool", "*bool") and not isinstance(item, bool):
        raise _mismatch(item, struct, path, "bool")
    if gotype == "int":
        if isinstance(item, bool) or not isinstance(item, (int, float)) or (isinstance(item, float) and not item.is_integer()):
            raise _mismatch(item, struct, path, "int")
        return int(item)
    if gotype == "[]int":
        if not isinstance(item, list):
            raise _mismatch(item, struct, path, "[]int")
        return [_decode_field(v, "int", struct, path) for v in item]
    if gotype == "map" and not isinstance(item, dict):
        raise _mismatch(item, struct, path, GO_TYPE_NAMES["map"])
    if gotype == "array" and not isinstance(item, list):
        raise _mismatch(item, struct, path, "[]api.ToolCall")
    if gotype == "images":
        return _decode_images(item, struct, path)
    if gotype == "duration":
        return parse_keep_alive(item)
    if gotype == "think":
        return parse_think(item)
    if gotype == "tools":
        if not isinstance(item, list):
            raise _mismatch(item, struct, path, "api.Tools")
        return item
    if gotype == "messages":
        if not isinstance(item, list):
            raise _mismatch(item, struct, path, "[]api.Message")
        msgs = []
        for m in item:
            if not isinstance(m, dict):
                raise _mismatch(m, struct, path, "api.Message")
            msg = {"role": "", "content": "", "images": []}
            by_lower = {k.lower(): k for k in MESSAGE}
            for k, v in m.items():
                name = by_lower.get(k.lower())
                if name is not None:
                    decoded = _decode_field(v, MESSAGE[name], struct, f"{path}.{name}")
                    msg[name] = decoded if decoded is not None else msg.get(name)
            msgs.append(msg)
        return msgs
    return item


# ---- keep_alive (api.Duration.UnmarshalJSON + Go's time.ParseDuration) ----------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d*\.?\d*)([a-zµμ]*)")
FOREVER = math.inf


def go_parse_duration(text: str) -> float:
    """Seconds, parsed like Go's time.ParseDuration (its error messages included)."""
    quoted = json.dumps(text)
    s = text
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise RequestError(400, f"time: invalid duration {quoted}")
    total = 0.0
    while s:
        match = _PART.match(s)
        number, unit = match.group(1), match.group(2)
        if not number or number == ".":
            raise RequestError(400, f"time: invalid duration {quoted}")
        if not unit:
            raise RequestError(400, f"time: missing unit in duration {quoted}")
        if unit not in _UNITS:
            raise RequestError(400, f"time: unknown unit {json.dumps(unit)} in duration {quoted}")
        total += float(number) * _UNITS[unit]
        s = s[match.end():]
    return sign * total


def parse_keep_alive(value: Any) -> float | None:
    """Seconds the model stays loaded after a request (inf: forever); None: not given."""
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        go = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}[type(value)]
        raise RequestError(400, f"Unsupported type: '{go}'")
    if isinstance(value, (int, float)):
        return FOREVER if value < 0 else float(value)
    seconds = go_parse_duration(value)
    return FOREVER if seconds < 0 else seconds


def parse_think(value: Any) -> bool | str | None:
    """api.ThinkValue: a bool, or one of the levels."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in ("high", "medium", "low", "max"):
            raise RequestError(400, f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", '
                                    '"max", true, or false)')
        return value
    raise RequestError(400, 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)')


# ---- options (api.Options.FromMap) ----------------------------------------------------------------------

INT_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "num_thread", "draft_num_predict", "num_keep", "seed",
               "num_predict", "top_k", "repeat_last_n"}
FLOAT_OPTIONS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                 "frequency_penalty"}
BOOL_OPTIONS = {"use_mmap"}
PTR_INT_OPTIONS = {"main_gpu"}
LIST_OPTIONS = {"stop"}
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict")
DEFAULTS = {"num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": -1, "num_predict": -1,
            "num_batch": 512, "num_gpu": -1}


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Options with Ollama's defaults applied; a value of the wrong type raises like FromMap (a 500)."""
    out = dict(DEFAULTS)
    for key, val in (options or {}).items():
        if val is None:
            continue
        if key in INT_OPTIONS or key in PTR_INT_OPTIONS:
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise RequestError(500, f'option "{key}" must be of type integer')
            out[key] = int(val)
        elif key in FLOAT_OPTIONS:
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise RequestError(500, f'option "{key}" must be of type float32')
            out[key] = float(val)
        elif key in BOOL_OPTIONS:
            if not isinstance(val, bool):
                raise RequestError(500, f'option "{key}" must be of type boolean')
            out[key] = val
        elif key in LIST_OPTIONS:
            if not isinstance(val, list):
                raise RequestError(500, f'option "{key}" must be of type array')
            if not all(isinstance(v, str) for v in val):
                raise RequestError(500, f'option "{key}" must be of an array of strings')
            out[key] = list(val)
        # unknown options: Ollama logs "invalid option provided" and goes on
    return out


def check_format(fmt: Any) -> Any:
    """The format a runner accepts: None, "json" or a schema object (llm/llama_server.go Completion)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raw = json.dumps(fmt, separators=(",", ":"))
    raise RequestError(500, f'invalid format: {json.dumps(raw)}; expected "json" or a valid JSON Schema object')


# ---- model names (types/model ParseName) ----------------------------------------------------------------

_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def normalize_name(raw: str) -> str | None:
    """`name:tag` lower-cased with `:latest` implied and the default registry/namespace stripped; None if invalid."""
    name = raw.strip()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        if name.lower().startswith(prefix):
            name = name[len(prefix):]
    model, _, tag = name.partition(":")
    tag = tag or "latest"
    if not _NAME_PART.match(model.split("/")[-1] or "-") or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$", tag):
        return None
    return f"{model}:{tag}".lower()
