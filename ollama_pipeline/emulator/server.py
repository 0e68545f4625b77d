"""The emulator's HTTP server: Ollama v0.32.15's API as an ASGI app (Starlette, served by uvicorn).

Endpoints follow server/routes.go at that tag: `/`, `/api/version`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/pull`, `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings`; errors use its status codes and
texts; streams send each chunk when it is produced. Scheduling and cost live in engine.py, request decoding
in protocol.py, answers in answers.py, the injection rule in gullible.py. Fault injection and counters are
under `/_emulator/`. The listening socket is created with IPPROTO_TCP so that asyncio sets TCP_NODELAY on
every connection (small writes never wait ~40 ms for a delayed ACK). Must not import the pipeline.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import math
import re
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ollama_pipeline.emulator import protocol as proto
from ollama_pipeline.emulator.answers import Rng, answer_for, generate, sentence, thinking_for
from ollama_pipeline.emulator.engine import BUSY, Engine, Placement, Unit, count_tokens, text_units
from ollama_pipeline.emulator.profiles import LEGACY_MODELS, MODELS, HostProfile, ModelProfile, host_profile
from ollama_pipeline.emulator.protocol import RequestError

VERSION = "0.32.15"  # the Ollama release this emulator follows (git tag v0.32.15)
FAULT_KINDS = ("latency", "http_500", "http_503", "hang", "prose", "code_fence", "truncated", "reasoning",
               "bad_schema", "stream_error", "bad_part")
DEFAULT_MODELS = LEGACY_MODELS
_MARKER = re.compile(r"\[\[fault:([a-z_0-9]+)(?::(\d+))?\]\]")
RUNNER_STOPPED = ("model runner has unexpectedly stopped, this may be due to resource limitations or an internal "
                  "error, check ollama server logs for details")
STREAM_EOF = "an error was encountered while running the model: unexpected EOF"


def _llama_server_error(message: str, kind: str = "invalid_request_error", **extra: Any) -> str:
    """llama-server's error body, which Ollama passes on as the error text (llm/llama_server.go statusErrorMessage)."""
    return json.dumps({"error": {"code": 400, "message": message, "type": kind, **extra}}, separators=(",", ":"))


NO_MULTIMODAL = _llama_server_error("Multimodal data provided, but model does not support multimodal requests.")
BAD_IMAGE = _llama_server_error("Failed to load image or audio file")


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
    """Where the emulator listens and which host it emulates (a profile, or the flat test host)."""

    host: str = "127.0.0.1"
    port: int = 11434
    latency_ms: float = 0  # flat profile: what every call costs
    parallel: int | None = None  # OLLAMA_NUM_PARALLEL (flat default 4; a profile's own otherwise)
    max_queue: int | None = None  # OLLAMA_MAX_QUEUE
    faults: list[Fault] = field(default_factory=list)
    models: list[str] | None = None
    profile: str | None = None  # a HOSTS name; None: "flat"
    time_scale: float | None = None
    keep_alive_s: float | None = None  # OLLAMA_KEEP_ALIVE
    max_loaded_models: int | None = None  # OLLAMA_MAX_LOADED_MODELS
    vram_gib: float | None = None

    def host_profile(self) -> HostProfile:
        name = self.profile or "flat"
        overrides: dict[str, Any] = {
            "num_parallel": self.parallel, "max_queue": self.max_queue, "time_scale": self.time_scale,
            "keep_alive_s": self.keep_alive_s, "max_loaded_models": self.max_loaded_models,
            "models": tuple(self.models) if self.models else None,
            "vram_bytes": int(self.vram_gib * 1024**3) if self.vram_gib else None}
        if name == "flat":
            overrides["flat_latency_ms"] = float(self.latency_ms or 0)
        host = host_profile(name, **overrides)
        unknown = [m for m in host.models if proto.normalize_name(m) not in _catalogue()]
        if unknown:
            raise ValueError(f"no emulator profile for model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
        return host


def _catalogue() -> dict[str, ModelProfile]:
    """Every shipped model by normalized name and alias."""
    out: dict[str, ModelProfile] = {}
    for m in MODELS.values():
        for n in (m.name, *m.aliases):
            key = proto.normalize_name(n)
            if key:
                out[key] = m
    return out


def _digest(model: ModelProfile) -> str:
    return hashlib.sha256(f"emulated-weights:{model.name}".encode()).hexdigest()


def _go_time(ts: float) -> str:
    """A time as Go's encoding/json writes it (RFC 3339 with nanoseconds and offset)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return _go_time(time.time())


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


class _Stop(Exception):
    pass


class State:
    """Everything the ASGI app shares: the engine, the pulled models, faults and the request log."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.host = config.host_profile()
        self.engine = Engine(self.host)
        catalogue = _catalogue()
        self.pulled: dict[str, ModelProfile] = {}  # every name that resolves (aliases included)
        self.listed: dict[str, ModelProfile] = {}  # what /api/tags lists
        for name in self.host.models:
            self._add(catalogue[proto.normalize_name(name) or ""])
        self.faults: list[Fault] = list(config.faults)
        self.fault_counter = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.stop = asyncio.Event()
        self.image_cache: dict[str, tuple[int, int] | None] = {}

    def _add(self, model: ModelProfile) -> None:
        # every tag that resolves is listed (as Ollama lists each pulled tag, e.g. llava:7b and llava:latest)
        for n in (model.name, *(a for a in model.aliases if ":" in a)):
            self.listed[n] = model
        for n in (model.name, *model.aliases):
            key = proto.normalize_name(n)
            if key:
                self.pulled[key] = model

    def find(self, raw: str) -> ModelProfile | None:
        key = proto.normalize_name(raw)
        return self.pulled.get(key) if key else None

    def models(self) -> list[ModelProfile]:
        return list({m.name: m for m in self.listed.values()}.values())

    def pick_fault(self, text: str, header: str | None) -> Fault | None:
        if header:
            return Fault.parse(header)
        marker = _MARKER.search(text)
        if marker and marker.group(1) in FAULT_KINDS:
            return Fault(kind=marker.group(1), arg=int(marker.group(2)) if marker.group(2) else None)
        with self.engine.lock:
            for fault in self.faults:
                if fault.match and fault.match not in text:
                    continue
                if fault.count is not None and fault.count <= 0:
                    continue
                self.fault_counter += 1
                if fault.rate < 1.0:
                    # deterministic spread: fire when the running fraction falls below the rate
                    if int(self.fault_counter * fault.rate) == int((self.fault_counter - 1) * fault.rate):
                        continue
                if fault.count is not None:
                    fault.count -= 1
                return fault
        return None

    def image_size(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) of an image llama.cpp can decode (stb_image formats; Ollama turns WebP into PNG)."""
        key = hashlib.sha256(data).hexdigest()
        if key not in self.image_cache:
            self.image_cache[key] = _decode_image(data)
            if len(self.image_cache) > 4096:
                self.image_cache.pop(next(iter(self.image_cache)))
        return self.image_cache[key]


def _decode_image(data: bytes) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG", "BMP", "GIF", "TGA", "PPM", "PSD", "WEBP"):
                return None
            size = img.size
            img.verify()
            return size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _count(state: State, path: str) -> None:
    with state.engine.lock:
        state.engine.requests += 1
        state.engine.by_path[path] = state.engine.by_path.get(path, 0) + 1


async def _body(request: Request, spec: tuple[str, dict[str, str]]) -> dict[str, Any]:
    return proto.decode_struct(proto.decode_body(await request.body()), spec)


Handler = Callable[[Request, "State", dict[str, Any]], Awaitable[Response]]


def api(spec: tuple[str, dict[str, str]] | None = None) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """An Ollama endpoint: counts the request, decodes its body into the request struct `spec` (if any) and
    answers a RequestError raised while handling it with its status and `{"error": ...}` (as routes.go's
    handlers answer `c.AbortWithStatusJSON(status, gin.H{"error": ...})`)."""
    def wrap(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            state: State = request.app.state.emu
            _count(state, request.url.path)
            try:
                body = await _body(request, spec) if spec else {}
                return await fn(request, state, body)
            except RequestError as exc:
                return _error(exc.status, exc.message)
        return handler
    return wrap


def _model_details(m: ModelProfile) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": m.family, "families": list(m.families),
            "parameter_size": m.parameter_size, "quantization_level": m.quantization}


def _entry(m: ModelProfile, name: str | None = None) -> dict[str, Any]:
    return {"name": name or m.name, "model": name or m.name, "modified_at": "2026-08-20T12:00:00Z",
            "size": int(m.weights_gib * 1024**3), "digest": _digest(m), "details": _model_details(m)}


# ---- metadata endpoints ---------------------------------------------------------------------------------

@api()
async def root(request: Request, state: State, body: dict[str, Any]) -> Response:
    return PlainTextResponse("Ollama is running")


@api()
async def version(request: Request, state: State, body: dict[str, Any]) -> Response:
    return JSONResponse({"version": VERSION})


@api()
async def tags(request: Request, state: State, body: dict[str, Any]) -> Response:
    return JSONResponse({"models": [_entry(m, name) for name, m in state.listed.items()]})


@api()
async def ps(request: Request, state: State, body: dict[str, Any]) -> Response:
    rows = []
    for runner in list(state.engine.loaded.values()):
        m = runner.model
        rows.append({**_entry(m), "expires_at": _go_time(runner.expires_at), "size": runner.memory,
                     "size_vram": runner.memory, "context_length": runner.num_ctx})
    rows.sort(key=lambda r: r["expires_at"], reverse=True)  # "longest duration remaining listed first"
    return JSONResponse({"models": rows})


@api(proto.SHOW)
async def show(request: Request, state: State, body: dict[str, Any]) -> Response:
    name = body.get("model") or body.get("name")
    if not name:
        return _error(400, "model is required")
    m = state.find(name)
    if m is None:
        if proto.normalize_name(name) is None:
            return _error(400, "invalid model name")
        return _error(404, f"model '{name}' not found")
    arch = m.architecture
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": int(m.params_b * 1e9),
                            "general.file_type": 15, f"{arch}.context_length": m.context_length}
    if m.embedding_length:
        info[f"{arch}.embedding_length"] = m.embedding_length
    resp = {"license": "emulated", "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {m.name}\n",
            "parameters": "", "template": "{{ .Prompt }}", "details": _model_details(m),
            "model_info": info, "capabilities": list(m.capabilities), "modified_at": "2026-08-20T12:00:00Z",
            "tensors": []}
    if m.image is not None:
        resp["projector_info"] = {"general.architecture": "clip", "clip.has_vision_encoder": True}
    return JSONResponse(resp)


@api(proto.PULL)
async def pull(request: Request, state: State, body: dict[str, Any]) -> Response:
    raw = body.get("model") or body.get("name") or ""
    key = proto.normalize_name(raw)
    if not raw.strip() or key is None:
        return _error(400, "invalid model name")
    model = _catalogue().get(key)

    async def progress() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        if model is None:
            yield {"error": "pull model manifest: file does not exist"}
            return
        digest = "sha256:" + _digest(model)
        total = int(model.weights_gib * 1024**3)
        have = state.find(raw) is not None
        for step in ((total,) if have else (0, total // 3, 2 * total // 3, total)):
            yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": step}
            await asyncio.sleep(0)
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        state._add(model)
        yield {"status": "success"}

    if body.get("stream") is False:  # waitForStream: the last progress line, or the error with 500
        last: dict[str, Any] = {}
        async for item in progress():
            if "error" in item:
                return _error(500, item["error"])
            last = item
        return JSONResponse(last)
    return StreamingResponse(_ndjson(progress()), media_type="application/x-ndjson")


@api(proto.COPY)
async def copy(request: Request, state: State, body: dict[str, Any]) -> Response:
    """server/routes.go CopyHandler: the destination names the same model."""
    source, dest = body.get("source") or "", body.get("destination") or ""
    model = state.find(source)
    if model is None:
        return _error(404, f"model '{source}' not found")
    key = proto.normalize_name(dest)
    if key is None:
        return _error(400, f"destination \"{dest}\" is invalid")
    state.pulled[key] = model
    state.listed[key] = model
    return Response(status_code=200)


@api(proto.DELETE)
async def delete(request: Request, state: State, body: dict[str, Any]) -> Response:
    """server/routes.go DeleteHandler: removes that name (other names of the model stay)."""
    name = body.get("model") or body.get("name") or ""
    key = proto.normalize_name(name)
    if key is None or key not in state.pulled:
        return _error(404, f"model '{name}' not found")
    del state.pulled[key]
    for listed, _m in list(state.listed.items()):
        if proto.normalize_name(listed) == key:
            del state.listed[listed]
    return Response(status_code=200)


async def _ndjson(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for item in items:
        yield json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# ---- emulator-only endpoints ----------------------------------------------------------------------------

async def emu_stats(request: Request) -> Response:
    return JSONResponse(request.app.state.emu.engine.snapshot())


async def emu_requests(request: Request) -> Response:
    state: State = request.app.state.emu
    limit = int(request.query_params.get("limit") or 50)
    with state.engine.lock:
        return JSONResponse({"requests": list(state.recent)[-limit:]})


async def emu_events(request: Request) -> Response:
    state: State = request.app.state.emu
    with state.engine.lock:
        return JSONResponse({"events": list(state.engine.events)})


async def emu_profile(request: Request) -> Response:
    state: State = request.app.state.emu
    h = state.host
    return JSONResponse({"profile": h.name, "num_parallel": h.num_parallel, "max_loaded_models": h.max_runners,
                         "max_queue": h.max_queue, "keep_alive_s": h.keep_alive_s, "vram_bytes": h.vram_bytes,
                         "time_scale": h.time_scale, "default_num_ctx": h.default_num_ctx,
                         "flat_latency_ms": h.flat_latency_ms,
                         "models": {m.name: {"parallel": h.parallel_for(m),
                                             "rates": [*state.engine.rates(m), state.engine._load_s(m)]}
                                    for m in state.models()}})


async def emu_reset(request: Request) -> Response:
    state: State = request.app.state.emu
    state.engine.reset()
    with state.engine.lock:
        state.recent.clear()
    return JSONResponse({"ok": True})


async def emu_faults(request: Request) -> Response:
    state: State = request.app.state.emu
    try:
        body = json.loads(await request.body() or b"{}")
        faults = [Fault(**f) for f in (body or {}).get("faults", [])]
    except (TypeError, ValueError) as exc:
        return _error(400, str(exc))
    with state.engine.lock:
        state.faults = faults
    return JSONResponse({"faults": len(faults)})


# ---- prompts --------------------------------------------------------------------------------------------

def _render(messages: list[dict[str, Any]], sizes: dict[int, tuple[str, int]]) -> tuple[list[Unit], str]:
    """A chat template's token units (message headers, images before each message's text, as
    server/prompt.go imageTaggedMessages places them) and the plain text the model reads."""
    units: list[Unit] = []
    text_parts: list[str] = []
    image_index = 0
    for msg in messages:
        units.extend(text_units(f"<|{msg.get('role') or 'user'}|>\n"))
        for _ in msg.get("images") or []:
            digest, tokens = sizes[image_index]
            units.append(Unit("i" + digest, tokens))
            image_index += 1
        content = msg.get("content") or ""
        units.extend(text_units(content + "\n"))
        text_parts.append(content)
    units.extend(text_units("<|assistant|>\n"))
    return units, "\n".join(text_parts)


# ---- completions ----------------------------------------------------------------------------------------

@dataclass
class Call:
    chat: bool
    name: str  # as the client wrote it (echoed in answers and errors)
    model: ModelProfile
    messages: list[dict[str, Any]]
    images: list[bytes]
    fmt: Any
    options: dict[str, Any]
    raw_options: dict[str, Any]
    stream: bool
    think: bool | str | None
    keep_alive_s: float | None
    tools: list[Any]
    truncate: bool
    raw: bool


def _think_on(call: Call) -> bool:
    return bool(call.think) and "thinking" in call.model.capabilities


def _texts(chat: bool, answer: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Where an answer's text goes: its message's `content` (chat) or its `response` (generate)."""
    if chat:
        return answer.setdefault("message", {"role": "assistant"}), "content"
    return answer, "response"


def _done(chat: bool, name: str, reason: str) -> dict[str, Any]:
    """A final answer without text (done_reason "load" or "unload")."""
    answer: dict[str, Any] = {"model": name, "created_at": _now(), "done": True, "done_reason": reason}
    where, key = _texts(chat, answer)
    where[key] = ""
    return answer


@api()
async def completion(request: Request, state: State, _: dict[str, Any]) -> Response:
    """/api/generate and /api/chat (server/routes.go GenerateHandler, ChatHandler)."""
    chat = request.url.path == "/api/chat"
    started = time.perf_counter()
    call = _prepare(state, await _body(request, proto.CHAT if chat else proto.GENERATE), chat)
    if isinstance(call, Response):
        return call
    engine = state.engine
    call.options = proto.check_options(call.raw_options)  # modelOptions → FromMap: a wrong type fails here
    placement = await _unless_disconnected(request, engine.get_runner(call.model, call.options, call.keep_alive_s))
    if placement is None:
        return Response(status_code=499)  # the client went away while it waited (Ollama: "request canceled")
    runner = placement.runner
    try:
        empty = (not call.messages) if chat else not (call.messages[-1].get("content") or "")
        if empty:  # "load the model": an empty prompt or no messages
            engine.release(runner)
            runner = None
            return JSONResponse(_done(chat, call.name, "load"))
        events = _run(state, call, placement, request.headers.get("X-Emulator-Fault"), started)
        first = await _unless_disconnected(request, events.__anext__())
    except BaseException:
        if runner is not None:
            engine.release(runner)
        raise
    if first is None:  # the client went away: its request ends and frees its slot (the Go context is done)
        await events.aclose()
        engine.release(runner)
        return Response(status_code=499)
    if "error" in first and first.get("status"):
        engine.release(runner)
        await events.aclose()
        return _error(first["status"], first["error"])

    async def rest() -> AsyncIterator[dict[str, Any]]:
        try:
            yield first
            async for item in events:
                yield item
        finally:
            engine.release(runner)

    if not call.stream:
        merged: dict[str, Any] = {}
        content: list[str] = []
        thinking: list[str] = []
        async for item in rest():
            if "error" in item:
                return _error(item.get("status") or 500, item["error"])
            where, key = _texts(chat, item)
            content.append(where.get(key) or "")
            thinking.append(where.get("thinking") or "")
            merged = item
        where, key = _texts(chat, merged)
        where[key] = "".join(content)
        if any(thinking):
            where["thinking"] = "".join(thinking)
        return JSONResponse(merged)
    return StreamingResponse(_ndjson(rest()), media_type="application/x-ndjson")


async def _unless_disconnected(request: Request, awaitable: Any) -> Any:
    """The awaitable's result, or None when the client disconnects first (the awaitable is cancelled), as a
    Go handler's work ends when its request context is done."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    return None


def _prepare(state: State, body: dict[str, Any], chat: bool) -> Call | Response:
    """Checks that routes.go makes before it schedules a runner."""
    name = body.get("model") or ""
    if proto.normalize_name(name) is None and name.strip():
        return _error(400, "invalid model name")
    if not name.strip():
        return _error(400, "model is required") if chat else _error(404, f"model '{name}' not found")
    top = body.get("top_logprobs") or 0
    if top < 0 or top > 20:
        return _error(400, "top_logprobs must be between 0 and 20")
    model = state.find(name)
    if model is None:
        return _error(404, f"model '{name}' not found")
    keep_alive = body.get("keep_alive")
    messages = body.get("messages") or []
    prompt = body.get("prompt") or ""
    if keep_alive == 0 and not (messages if chat else prompt):  # "unload the model"
        state.engine.expire_now(model)
        return JSONResponse(_done(chat, name, "unload"))
    if chat:
        images = [img for m in messages for img in (m.get("images") or [])]
    else:
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            return _error(400, "raw mode does not support template, system, or context")
        images = list(body.get("images") or [])
        messages = []
        if body.get("system") and not body.get("raw"):
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": prompt, "images": images})
    think = body.get("think")
    caps = model.capabilities
    if "completion" not in caps:
        return _error(400, f'"{name}" does not support {"chat" if chat else "generate"}')
    if "thinking" in caps:
        if think is None:
            think = True  # routes.go: thinking models think unless told not to
    elif think:
        return _error(400, f'"{name}" does not support thinking')
    tools = body.get("tools") or []
    if tools and "tools" not in caps:
        return _error(400, f"registry.ollama.ai/library/{model.name} does not support tools")
    return Call(chat=chat, name=name, model=model, messages=messages, images=images, fmt=body.get("format"),
                options={}, raw_options=body.get("options") or {}, stream=body.get("stream") is not False,
                think=think, keep_alive_s=keep_alive, tools=tools, truncate=body.get("truncate") is not False,
                raw=bool(body.get("raw")))


async def _run(state: State, call: Call, placement: Placement, fault_header: str | None,
               started: float) -> AsyncIterator[dict[str, Any]]:
    """One completion on a runner slot; yields Ollama's chunks (an error first carries its status)."""
    engine = state.engine
    runner = placement.runner
    model = call.model
    queued = time.perf_counter()
    must_wait = runner.sem.locked()
    with engine.lock:
        engine.waiting += 1
    try:
        await runner.sem.acquire()
    finally:
        with engine.lock:
            engine.waiting -= 1
    slot_wait_wall = time.perf_counter() - queued if must_wait else 0.0
    slot = None
    try:
        with engine.lock:
            engine.inflight += 1
            engine.max_inflight_seen = max(engine.max_inflight_seen, engine.inflight)
            engine.model_calls += 1
            engine.by_model[model.name] = engine.by_model.get(model.name, 0) + 1
            c = engine.c(model.name)
            c.requests += 1
            runner.active += 1
            c.max_concurrent = max(c.max_concurrent, runner.active)
        text = "\n".join(m.get("content") or "" for m in call.messages)
        fault = state.pick_fault(text, fault_header)
        with engine.lock:
            state.recent.append({
                "path": "/api/chat" if call.chat else "/api/generate", "model": model.name,
                "prompt_sha256": hashlib.sha256(text.encode()).hexdigest(), "images": len(call.images),
                "image_bytes": [len(i) for i in call.images],
                "format": "schema" if isinstance(call.fmt, dict) else (call.fmt or None),
                "options": call.raw_options, "think": call.think, "keep_alive": call.keep_alive_s,
                "num_ctx": runner.num_ctx})
        if fault and fault.kind == "latency":
            await asyncio.sleep((fault.arg or 0) / 1000.0)
        if fault and fault.kind == "hang":
            try:
                await asyncio.wait_for(state.stop.wait(), 120)
            except TimeoutError:
                pass
            yield {"error": RUNNER_STOPPED, "status": 500}
            return
        if fault and fault.kind == "http_500":
            yield {"error": RUNNER_STOPPED, "status": 500}
            return
        if fault and fault.kind == "http_503":
            yield {"error": BUSY, "status": 503}
            return
        try:
            fmt = proto.check_format(call.fmt)
        except RequestError as exc:
            yield {"error": exc.message, "status": exc.status}
            return
        # media: a model without a projector refuses them; bytes stb_image cannot decode are refused too
        sizes: dict[int, tuple[str, int]] = {}
        if call.images:
            if model.image is None:
                yield {"error": NO_MULTIMODAL, "status": 400}
                return
            for i, data in enumerate(call.images):
                dims = state.image_size(data)
                if dims is None:
                    yield {"error": BAD_IMAGE, "status": 400}
                    return
                sizes[i] = (hashlib.sha256(data).hexdigest()[:16], model.image.tokens_for(*dims))
        units, plain = _render(call.messages, sizes)
        if call.raw:
            units = text_units(plain)
        prompt_tokens = count_tokens(units)
        num_ctx = runner.num_ctx
        if prompt_tokens > num_ctx - 1:
            if call.images or not call.truncate:
                yield {"error": _llama_server_error(
                    f"request ({prompt_tokens} tokens) exceeds the available context size ({num_ctx} tokens), "
                    "try increasing it", "exceed_context_size_error", n_prompt_tokens=prompt_tokens, n_ctx=num_ctx),
                    "status": 400}
                return
            # llm/llama_server.go completionPromptForRequest: keep num_keep tokens, drop the middle
            keep = min(max(0, int(call.options.get("num_keep", 4))) + 1, num_ctx - 1)
            limit = num_ctx - max((num_ctx - keep) // 2, 1)
            units = units[:keep] + units[len(units) - (limit - keep):]
            prompt_tokens = count_tokens(units)
        # slot and prefix cache
        slot = engine.pick_slot(runner, units)
        slot.busy = True
        cached = min(engine_prefix(slot.units, units), prompt_tokens - 1)
        image_total = sum(u.tokens for u in units if u.key.startswith("i"))
        image_cached = _image_tokens_in_prefix(units, cached)
        prefill_tokens = prompt_tokens - cached
        # the answer
        seed_material = json.dumps([model.name, plain, [s[0] for s in sizes.values()], call.fmt,
                                    call.options.get("seed")], sort_keys=True, default=str)
        content = answer_for(seed_material, fmt, plain)
        kind = fault.kind if fault else None
        if kind == "prose":
            content = sentence(Rng(seed_material + "prose"))
        elif kind == "code_fence":
            content = f"```json\n{content}\n```"
        elif kind == "reasoning":
            content = f"Let me think about this image step by step. The answer is:\n{content}"
        elif kind == "bad_schema":
            content = json.dumps({"unexpected": True})
        elif kind == "bad_part":  # one property of the answer object (arg: its index, default 0) breaks its schema
            whole = json.loads(content) if isinstance(fmt, dict) else None
            if isinstance(whole, dict) and whole:
                name = list(whole)[min(fault.arg or 0, len(whole) - 1)] if fault else list(whole)[0]
                whole[name] = {"unexpected": True}
                content = json.dumps(whole, separators=(",", ":"))
        tool_calls = _tool_calls(call, seed_material)
        if tool_calls:
            content = ""
        thinking = thinking_for(seed_material, model.thinking_tokens or 300) if _think_on(call) else ""
        think_tokens = math.ceil(len(thinking) / 4)
        content_tokens = max(1, math.ceil(len(content) / 4))
        done_reason = "stop"
        budget = int(call.options.get("num_predict", -1))
        if budget < 0 or budget > 10 * num_ctx:
            budget = 10 * num_ctx  # boundedNumPredict: open-ended generations stop at 10 × num_ctx
        if kind == "truncated":
            content = content[: max(1, len(content) // 2)]
            content_tokens = max(1, math.ceil(len(content) / 4))
            done_reason = "length"
        if think_tokens + content_tokens > budget:
            done_reason = "length"
            if think_tokens >= budget:
                thinking, content, think_tokens, content_tokens = thinking[: budget * 4], "", budget, 0
            else:
                content_tokens = budget - think_tokens
                content = content[: content_tokens * 4]
            tool_calls = []
        output_tokens = think_tokens + content_tokens
        prefill_s, decode_s = engine.cost(model, prefill_tokens, output_tokens)
        with engine.lock:
            seen = engine.seen_images.setdefault(model.name, set())
            new_images = {digest: n for digest, n in sizes.values() if digest not in seen}
            seen.update(new_images)
        engine.add(model.name, prompt_tokens=prompt_tokens, prefill_tokens=prefill_tokens, cached_tokens=cached,
                   cache_hits=1 if cached > 0 else 0, image_tokens=image_total, image_tokens_cached=image_cached,
                   distinct_images=len(new_images), distinct_image_tokens=sum(new_images.values()),
                   output_tokens=output_tokens, thinking_tokens=think_tokens, prefill_s=prefill_s, decode_s=decode_s)
        # prefill, then stream the tokens as they are decoded
        await engine.clock.sleep(prefill_s)
        pieces: list[tuple[str, str]] = [("thinking", thinking[i : i + 16]) for i in range(0, len(thinking), 16)]
        pieces += [("content", content[i : i + 16]) for i in range(0, len(content), 16)]
        per_piece = decode_s / max(1, len(pieces))
        debt = 0.0
        for i, (field_name, piece) in enumerate(pieces):
            if kind == "stream_error" and i == len(pieces) // 2 and i > 0:
                yield {"error": STREAM_EOF}
                return
            debt += per_piece
            if engine.clock.wall(debt) >= 0.002 or i == len(pieces) - 1:
                await engine.clock.sleep(debt)
                debt = 0.0
            yield _chunk(call, field_name, piece)
        if not pieces:
            await engine.clock.sleep(decode_s)
        if kind == "stream_error":
            yield {"error": STREAM_EOF}
            return
        slot.units = units + text_units(thinking + content)
        slot_wait_s = slot_wait_wall * engine.clock.scale
        load_s = placement.load_s
        final = _chunk(call, "content", "")
        final.update({"done": True, "done_reason": done_reason,
                      "total_duration": _ns(load_s + slot_wait_s + prefill_s + decode_s),
                      "load_duration": _ns(load_s), "prompt_eval_count": prompt_tokens,
                      "prompt_eval_duration": _ns(prefill_s), "eval_count": output_tokens,
                      "eval_duration": _ns(decode_s)})
        if tool_calls:
            final["message"]["tool_calls"] = tool_calls
        if not call.chat and not call.raw:
            final["context"] = _context_tokens(seed_material, prompt_tokens + output_tokens)
        yield final
    finally:
        if slot is not None:
            slot.busy = False
            slot.last_used = time.perf_counter()
        with engine.lock:
            engine.inflight -= 1
            runner.active -= 1
        runner.sem.release()


def engine_prefix(a: list[Unit], b: list[Unit]) -> int:
    from ollama_pipeline.emulator.engine import common_prefix_tokens

    return common_prefix_tokens(a, b)


def _image_tokens_in_prefix(units: list[Unit], cached: int) -> int:
    total = seen = 0
    for u in units:
        if seen + u.tokens > cached:
            break
        seen += u.tokens
        if u.key.startswith("i"):
            total += u.tokens
    return total


def _chunk(call: Call, field_name: str, piece: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": call.name, "created_at": _now(), "done": False}
    where, key = _texts(call.chat, chunk)
    where[key] = piece if field_name == "content" else ""
    if field_name == "thinking":
        where["thinking"] = piece
    return chunk


def _context_tokens(seed: str, count: int) -> list[int]:
    base = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
    return [(base + i * 2654435761) % 128000 for i in range(count)]


def _tool_calls(call: Call, seed: str) -> list[dict[str, Any]]:
    """A call of the first tool when the last message is the user's (tools are answered with content after)."""
    if not call.chat or not call.tools or (call.messages and call.messages[-1].get("role") == "tool"):
        return []
    tool = call.tools[0] if isinstance(call.tools[0], dict) else {}
    fn = tool.get("function") or {}
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    args = generate(params, Rng(seed + ":tool")) if isinstance(params, dict) else {}
    return [{"id": "call_" + hashlib.sha256(seed.encode()).hexdigest()[:8],
             "function": {"index": 0, "name": fn.get("name") or "tool", "arguments": args}}]


# ---- embeddings -----------------------------------------------------------------------------------------

def _vector(text: str, dims: int) -> list[float]:
    values = []
    counter = 0
    while len(values) < dims:
        digest = hashlib.sha256(f"{text}:{counter}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vec = values[:dims]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def _embed_texts(state: State, model: ModelProfile, texts: list[str], options: dict[str, Any],
                       keep_alive: float | None, dims: int = 0) -> tuple[list[list[float]], int, float, float]:
    engine = state.engine
    placement = await engine.get_runner(model, options, keep_alive)
    runner = placement.runner
    try:
        tokens = 0
        seconds = 0.0
        out = []
        for text in texts:
            await runner.sem.acquire()
            try:
                n = min(max(1, math.ceil(len(text) / 4)), runner.num_ctx)  # truncated to the context by default
                prefill_s, _ = engine.cost(model, n, 0)
                if engine.host.flat_latency_ms is not None:
                    prefill_s = 0.0
                engine.add(model.name, requests=1, prompt_tokens=n, prefill_tokens=n, prefill_s=prefill_s)
                await engine.clock.sleep(prefill_s)
            finally:
                runner.sem.release()
            vec = _vector(text, model.embedding_length or 768)
            if 0 < dims < len(vec):
                norm = math.sqrt(sum(v * v for v in vec[:dims])) or 1.0
                vec = [v / norm for v in vec[:dims]]
            out.append(vec)
            tokens += n
            seconds += prefill_s
        return out, tokens, placement.load_s, seconds
    finally:
        engine.release(runner)


@api(proto.EMBED)
async def embed(request: Request, state: State, body: dict[str, Any]) -> Response:
    name = body.get("model") or ""
    if not name.strip():
        return _error(404, f"model '{name}' not found")
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        texts = [raw_input] if raw_input else []
    elif isinstance(raw_input, list) and all(isinstance(v, str) for v in raw_input):
        texts = list(raw_input)
    elif raw_input is None:
        texts = []
    else:
        return _error(400, "invalid input type")
    model = state.find(name)
    if model is None:
        return _error(404, f'model "{name}" not found, try pulling it first')
    options = proto.check_options(body.get("options"))
    vectors, tokens, load_s, seconds = await _embed_texts(state, model, texts, options, body.get("keep_alive"),
                                                          body.get("dimensions") or 0)
    if not texts:
        return JSONResponse({"model": name, "embeddings": []})
    return JSONResponse({"model": name, "embeddings": vectors, "total_duration": _ns(load_s + seconds),
                         "load_duration": _ns(load_s), "prompt_eval_count": tokens})


@api(proto.EMBEDDINGS)
async def embeddings(request: Request, state: State, body: dict[str, Any]) -> Response:
    name = body.get("model") or ""
    if not name.strip():
        return _error(400, "model is required")
    model = state.find(name)
    if model is None:
        return _error(404, f'model "{name}" not found, try pulling it first')
    prompt = body.get("prompt") or ""
    options = proto.check_options(body.get("options"))
    vectors, _, _, _ = await _embed_texts(state, model, [prompt] if prompt else [], options, body.get("keep_alive"))
    return JSONResponse({"embedding": vectors[0] if vectors else []})


async def not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("404 page not found", status_code=404)


def build_app(config: EmulatorConfig) -> Starlette:
    """The ASGI app of one emulated host."""
    state = State(config)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.engine.start()
        yield
        state.stop.set()
        await state.engine.close()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/generate", completion, methods=["POST"]),
        Route("/api/chat", completion, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        Route("/_emulator/stats", emu_stats, methods=["GET"]),
        Route("/_emulator/requests", emu_requests, methods=["GET"]),
        Route("/_emulator/events", emu_events, methods=["GET"]),
        Route("/_emulator/profile", emu_profile, methods=["GET"]),
        Route("/_emulator/reset", emu_reset, methods=["POST"]),
        Route("/_emulator/faults", emu_faults, methods=["POST"]),
    ]
    from contextlib import asynccontextmanager

    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={404: not_found, 405: not_found})
    app.state.emu = state
    return app


class EmulatorServer:
    """Runs one emulated host (uvicorn on its own event loop, in a background thread).

    `base_url`, `stats()`, `reset_stats()`, `set_faults()`, `stop()`; usable as a context manager.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        import uvicorn

        self.config = config or EmulatorConfig()
        self.app = build_app(self.config)
        self._state: State = self.app.state.emu
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (base_events._set_nodelay)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.config.host, self.config.port))
        self._sock.listen(1024)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=1,
            timeout_keep_alive=30, backlog=1024))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> EmulatorServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                task = loop.create_task(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.005)
                ready.set()
                await task

            try:
                loop.run_until_complete(main())
            finally:
                ready.set()
                loop.close()

        self._thread = threading.Thread(target=run, name="ollama-emulator", daemon=True)
        self._thread.start()
        ready.wait(30)
        if not self._server.started:
            raise RuntimeError("the emulator did not start")
        return self

    def serve_forever(self) -> None:
        self.start()
        assert self._thread is not None
        self._thread.join()

    def stats(self) -> dict[str, Any]:
        return self._state.engine.snapshot()

    def reset_stats(self) -> None:
        self._state.engine.reset()
        with self._state.engine.lock:
            self._state.recent.clear()

    def set_faults(self, faults: list[Fault | dict[str, Any] | str]) -> None:
        parsed = [f if isinstance(f, Fault) else Fault.parse(f) if isinstance(f, str) else Fault(**f) for f in faults]
        with self._state.engine.lock:
            self._state.faults = parsed

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._state.stop.set)
            except RuntimeError:
                pass
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
