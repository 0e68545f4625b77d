"""The emulator's HTTP server: Ollama's endpoints (`/`, `/api/version`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/generate`, `/api/chat`), streaming NDJSON and single answers, Ollama's error bodies and codes, a
capacity model like OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE, fault injection, and counters under
`/_emulator/`. Each response is sent in one write on a TCP_NODELAY socket (no delayed-ACK stalls).
Standard library only; must not import the pipeline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ollama_pipeline.emulator.answers import Rng, answer_for, sentence

VERSION = "0.12.6"
FAULT_KINDS = ("latency", "http_500", "http_503", "hang", "prose", "code_fence", "truncated", "reasoning",
               "bad_schema", "stream_error")
DEFAULT_MODELS = ("llava:7b", "qwen2.5vl:7b", "llama3.2:3b", "qwen3:4b")
_VISION_HINTS = ("llava", "vl", "vision", "gemma3", "moondream")
_THINKING_HINTS = ("qwen3", "deepseek-r1", "gpt-oss")
_MARKER = re.compile(r"\[\[fault:([a-z_0-9]+)(?::(\d+))?\]\]")
BUSY = "server busy, please try again.  maximum pending requests exceeded"


@dataclass
class Fault:
    kind: str
    rate: float = 1.0
    count: int | None = None
    match: str | None = None
    arg: int | None = None  # latency ms

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`KIND`, `KIND:rate` or `latency:MS`."""
        kind, _, rest = text.partition(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if kind == "latency":
            return cls(kind=kind, arg=int(rest or 0))
        return cls(kind=kind, rate=float(rest) if rest else 1.0)


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 11434
    latency_ms: int = 0
    parallel: int = 4
    max_queue: int = 512
    faults: list[Fault] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))


def is_vision(model: str) -> bool:
    return any(h in model.lower() for h in _VISION_HINTS)


def is_thinking(model: str) -> bool:
    return any(h in model.lower() for h in _THINKING_HINTS)


def _digest(model: str) -> str:
    return hashlib.sha256(f"emulated-weights:{model}".encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _State:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(max(1, config.parallel))
        self.stop = threading.Event()
        self.faults: list[Fault] = list(config.faults)
        self.fault_counter = 0
        self.loaded: dict[str, float] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests = 0
            self.model_calls = 0
            self.by_path: dict[str, int] = {}
            self.by_model: dict[str, int] = {}
            self.inflight = 0
            self.waiting = 0
            self.max_inflight_seen = 0
            self.rejected_busy = 0
            self.recent.clear()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "model_calls": self.model_calls, "by_path": dict(self.by_path),
                    "by_model": dict(self.by_model), "inflight": self.inflight,
                    "max_inflight_seen": self.max_inflight_seen, "rejected_busy": self.rejected_busy,
                    "served": self.model_calls}

    def pick_fault(self, text: str, header: str | None) -> Fault | None:
        if header:
            return Fault.parse(header)
        marker = _MARKER.search(text)
        if marker:
            kind = marker.group(1)
            if kind in FAULT_KINDS:
                return Fault(kind=kind, arg=int(marker.group(2)) if marker.group(2) else None)
        with self.lock:
            for fault in self.faults:
                if fault.match and fault.match not in text:
                    continue
                if fault.count is not None and fault.count <= 0:
                    continue
                self.fault_counter += 1
                if fault.rate < 1.0:
                    # deterministic spread: fire when the running fraction falls below the rate
                    fires = int(self.fault_counter * fault.rate) != int((self.fault_counter - 1) * fault.rate)
                    if not fires:
                        continue
                if fault.count is not None:
                    fault.count -= 1
                return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OllamaEmulator"
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---- responses ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8") -> None:
        reason = self.responses.get(status, ("",))[0]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Date: {self.date_time_string()}\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))
        self.wfile.flush()

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _stream(self, chunks: list[dict[str, Any]]) -> None:
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
                f"Date: {self.date_time_string()}\r\n\r\n").encode("latin-1")
        parts = [head]
        for chunk in chunks:
            line = json.dumps(chunk, separators=(",", ":")).encode() + b"\n"
            parts.append(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        parts.append(b"0\r\n\r\n")
        self.wfile.write(b"".join(parts))
        self.wfile.flush()

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        return json.loads(raw)

    def _count(self, path: str) -> None:
        with self.state.lock:
            self.state.requests += 1
            self.state.by_path[path] = self.state.by_path.get(path, 0) + 1

    # ---- routing --------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self._count(path)
        s = self.state
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._json(200, {"version": VERSION})
        elif path == "/api/tags":
            self._json(200, {"models": [self._model_entry(m) for m in s.config.models]})
        elif path == "/api/ps":
            with s.lock:
                loaded = list(s.loaded)
            self._json(200, {"models": [{**self._model_entry(m), "expires_at": _now(), "size_vram": 4_000_000_000,
                                         "context_length": 4096} for m in loaded]})
        elif path == "/_emulator/stats":
            self._json(200, s.stats())
        elif path == "/_emulator/requests":
            limit = 50
            if "limit=" in self.path:
                limit = int(self.path.split("limit=", 1)[1].split("&")[0] or 50)
            with s.lock:
                self._json(200, {"requests": list(s.recent)[-limit:]})
        else:
            self._error(404, "404 page not found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self._count(path)
        try:
            body = self._body()
        except (ValueError, UnicodeDecodeError) as exc:
            self._error(400, f"invalid character in request body: {exc}")
            return
        if path == "/_emulator/reset":
            self.state.reset()
            self._json(200, {"ok": True})
        elif path == "/_emulator/faults":
            try:
                faults = [Fault(**f) for f in (body or {}).get("faults", [])]
            except TypeError as exc:
                self._error(400, str(exc))
                return
            with self.state.lock:
                self.state.faults = faults
            self._json(200, {"faults": len(faults)})
        elif path == "/api/show":
            model = (body or {}).get("model") or (body or {}).get("name")
            if not model:
                self._error(400, "model is required")
            elif model not in self.state.config.models:
                self._error(404, f"model '{model}' not found")
            else:
                self._json(200, self._show(model))
        elif path in ("/api/generate", "/api/chat"):
            self._completion(path, body)
        else:
            self._error(404, "404 page not found")

    # ---- models ---------------------------------------------------------------------------------

    def _model_entry(self, model: str) -> dict[str, Any]:
        family = model.split(":")[0].rstrip("0123456789.")
        return {"name": model, "model": model, "modified_at": "2026-10-01T12:00:00Z", "size": 4_700_000_000,
                "digest": _digest(model),
                "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                            "parameter_size": (model.split(":")[1].upper() if ":" in model else "7B"),
                            "quantization_level": "Q4_K_M"}}

    def _show(self, model: str) -> dict[str, Any]:
        caps = ["completion"] + (["vision"] if is_vision(model) else []) + (["thinking"] if is_thinking(model) else [])
        entry = self._model_entry(model)
        return {"license": "emulated", "modelfile": f"FROM {model}", "parameters": "temperature 0.8",
                "template": "{{ .Prompt }}", "details": entry["details"], "modified_at": entry["modified_at"],
                "model_info": {"general.architecture": entry["details"]["family"],
                               "general.parameter_count": 7_000_000_000, "llama.context_length": 4096},
                "capabilities": caps}

    # ---- completions ----------------------------------------------------------------------------

    def _completion(self, path: str, body: Any) -> None:
        s = self.state
        if not isinstance(body, dict):
            self._error(400, "missing request body")
            return
        model = body.get("model")
        if not model:
            self._error(400, "model is required")
            return
        if model not in s.config.models:
            self._error(404, f"model '{model}' not found")
            return
        chat = path == "/api/chat"
        if chat:
            messages = body.get("messages") or []
            text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
            images = [i for m in messages if isinstance(m, dict) for i in (m.get("images") or [])]
        else:
            text = f"{body.get('system') or ''}\n{body.get('prompt') or ''}"
            images = list(body.get("images") or [])
        sizes = []
        for img in images:
            try:
                sizes.append(len(base64.b64decode(img, validate=True)))
            except (binascii.Error, ValueError, TypeError):
                self._error(400, "illegal base64 data at input byte 0")
                return
        if images and not is_vision(model):
            self._error(500, f"model '{model}' does not support images")
            return
        if body.get("think") is True and not is_thinking(model):
            self._error(400, f'"{model}" does not support thinking')
            return
        fmt = body.get("format")
        options = body.get("options") or {}
        stream = body.get("stream", True)
        with s.lock:
            s.recent.append({"path": path, "model": model, "prompt_sha256": hashlib.sha256(text.encode()).hexdigest(),
                             "images": len(images), "image_bytes": sizes,
                             "format": "schema" if isinstance(fmt, dict) else (fmt or None), "options": options})
            if s.inflight + s.waiting >= s.config.parallel + s.config.max_queue:
                s.rejected_busy += 1
                busy = True
            else:
                s.waiting += 1
                busy = False
        if busy:
            self._error(503, BUSY)
            return
        s.slots.acquire()
        with s.lock:
            s.waiting -= 1
            s.inflight += 1
            s.max_inflight_seen = max(s.max_inflight_seen, s.inflight)
            s.model_calls += 1
            s.by_model[model] = s.by_model.get(model, 0) + 1
            s.loaded[model] = time.time()
        try:
            self._answer(chat, model, text, images, fmt, options, stream, body)
        finally:
            with s.lock:
                s.inflight -= 1
            s.slots.release()

    def _answer(self, chat: bool, model: str, text: str, images: list[str], fmt: Any, options: dict[str, Any],
                stream: bool, body: dict[str, Any]) -> None:
        s = self.state
        started = time.perf_counter()
        fault = s.pick_fault(text, self.headers.get("X-Emulator-Fault"))
        latency = s.config.latency_ms
        if fault and fault.kind == "latency":
            latency = fault.arg or 0
        if latency:
            s.stop.wait(latency / 1000.0)
        if fault and fault.kind == "hang":
            s.stop.wait(120)
            return
        if fault and fault.kind == "http_500":
            self._error(500, "llama runner process has terminated: exit status 2")
            return
        if fault and fault.kind == "http_503":
            self._error(503, BUSY)
            return
        seed_material = json.dumps([model, text, [hashlib.sha256(i.encode()).hexdigest() for i in images], fmt,
                                    options.get("seed")], sort_keys=True)
        content = answer_for(seed_material, fmt, text)
        done_reason = "stop"
        kind = fault.kind if fault else None
        if kind == "prose":
            content = sentence(Rng(seed_material + "prose"))
        elif kind == "code_fence":
            content = f"```json\n{content}\n```"
        elif kind == "truncated":
            content = content[: max(1, len(content) // 2)]
            done_reason = "length"
        elif kind == "reasoning":
            content = f"Let me think about this image step by step. The answer is:\n{content}"
        elif kind == "bad_schema":
            content = json.dumps({"unexpected": True})
        prompt_tokens = max(1, len(text) // 4) + 576 * len(images)
        eval_tokens = max(1, len(content) // 4)
        elapsed = int((time.perf_counter() - started) * 1e9) + 1
        final = {"model": model, "created_at": _now(), "done": True, "done_reason": done_reason,
                 "total_duration": elapsed, "load_duration": 1_000_000, "prompt_eval_count": prompt_tokens,
                 "prompt_eval_duration": elapsed // 3, "eval_count": eval_tokens, "eval_duration": elapsed // 2}
        if not stream:
            if chat:
                final["message"] = {"role": "assistant", "content": content}
            else:
                final["response"] = content
            self._json(200, final)
            return
        pieces = [content[i : i + 16] for i in range(0, len(content), 16)] or [""]
        chunks: list[dict[str, Any]] = []
        for i, piece in enumerate(pieces):
            if kind == "stream_error" and i == len(pieces) // 2:
                chunks.append({"error": "an error was encountered while running the model: unexpected EOF"})
                break
            chunk: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
            if chat:
                chunk["message"] = {"role": "assistant", "content": piece}
            else:
                chunk["response"] = piece
            chunks.append(chunk)
        else:
            if chat:
                final["message"] = {"role": "assistant", "content": ""}
            else:
                final["response"] = ""
            chunks.append(final)
        self._stream(chunks)


class EmulatorServer:
    """Runs the emulator in a background thread; `base_url`, `stats()`, `set_faults()`, `stop()`."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._state = _State(self.config)
        handler = type("Handler", (_Handler,), {"state": self._state})
        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 1024
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ollama-emulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.1)

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def reset_stats(self) -> None:
        self._state.reset()

    def set_faults(self, faults: list[Fault | dict[str, Any] | str]) -> None:
        parsed = [f if isinstance(f, Fault) else Fault.parse(f) if isinstance(f, str) else Fault(**f) for f in faults]
        with self._state.lock:
            self._state.faults = parsed

    def stop(self) -> None:
        self._state.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
