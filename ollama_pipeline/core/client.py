"""The Ollama client (§7): the only module that talks to Ollama, built on the official `ollama` package.

`generate_text`, `analyze_image`, `health` and `list_models` return typed models. One private method,
`_call`, is the single place where transport and HTTP failures become the seed's typed errors (§6) and
where retries with backoff happen (connect errors, timeouts, 5xx and 503 only; never 4xx). With several
hosts (`ollama.hosts`), `_call` asks the pool of core/hosts.py which host serves a call and moves a call
whose host failed its health check to the item's next host.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import ollama
from pydantic import BaseModel, Field

from ollama_pipeline.core.config import OllamaConfig
from ollama_pipeline.core.errors import (
    InvalidResponseFormatError,
    NetworkError,
    OllamaPipelineError,
    ValidationError,
)
from ollama_pipeline.core.hosts import RECHECK_S, Host, HostPool, SlotGate, model_key
from ollama_pipeline.core.logs import redact_text

T = TypeVar("T")


class OllamaOptions(BaseModel):
    """Per-call options as in the seed (§7)."""

    model: str
    format: Literal["json"] | dict[str, Any] | None = "json"
    temperature: float | None = 0.0
    top_p: float | None = 0.9
    seed: int | None = 12345
    timeout_ms: int | None = None
    think: bool | None = None
    num_predict: int | None = None
    # Runner settings: one num_ctx for every call of a run (a change reloads the model, server/sched.go
    # needsReload; part of the fingerprint, as a cut prompt changes the answer); keep_alive only keeps the
    # model loaded, so it stays out of `ollama_options` (which fingerprints hash).
    num_ctx: int | None = None
    keep_alive: str | None = None

    def ollama_options(self) -> dict[str, Any]:
        """The options that decide an answer (part of every stage fingerprint)."""
        opts = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "num_predict": self.num_predict, "num_ctx": self.num_ctx}
        return {k: v for k, v in opts.items() if v is not None}

    def request_options(self) -> dict[str, Any]:
        """What is sent as `options` (the same as the fingerprinted ones)."""
        return self.ollama_options()


class OllamaTextResponse(BaseModel):
    model: str
    text: str
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    wall_ms: float = 0.0
    attempts: int = 1
    image_bytes: int = 0


class OllamaVisionResponse(OllamaTextResponse):
    images: int = 1


class HealthAnswer(BaseModel):
    """What one health probe of an Ollama base URL found."""

    ok: bool
    base_url: str
    version: str | None = None
    latency_ms: float | None = None
    error_code: str | None = None
    error: str | None = None


class HostHealth(HealthAnswer):
    """One host's answer to the health check, with this process's counters for it."""

    weight: float | None = None
    slots: int | None = None
    models: list[str] | None = None
    calls: int = 0
    ok_calls: int = 0
    failed: int = 0
    calls_per_s: float | None = None


class OllamaHealthResponse(HealthAnswer):
    """The health of the first host (the seed's `ollama.base_url`), and of every configured host."""

    hosts: list[HostHealth] = Field(default_factory=list)


class OllamaModel(BaseModel):
    name: str
    digest: str | None = None
    size: int | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class OllamaModelsResponse(BaseModel):
    models: list[OllamaModel] = Field(default_factory=list)

    def names(self) -> list[str]:
        return [m.name for m in self.models]


def split_credentials(base_url: str) -> tuple[str, dict[str, str]]:
    """Move user:password out of the URL into a Basic Authorization header (never logged)."""
    parts = urlsplit(base_url)
    if not parts.username and not parts.password:
        return base_url.rstrip("/"), {}
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)).rstrip("/")
    token = base64.b64encode(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()).decode()
    return clean, {"Authorization": f"Basic {token}"}


class OllamaClient:
    """One per process: wraps one `ollama.Client` per host (creating one costs ~50 ms) with typed errors,
    retries, and the host pool of core/hosts.py (stickiness, slots, failover)."""

    def __init__(self, config: OllamaConfig, *, headers: dict[str, str] | None = None,
                 sleep: Callable[[float], None] = time.sleep, default_slots: int = 4,
                 gate: SlotGate | None = None, recheck_s: float = RECHECK_S) -> None:
        self.config = config
        self.base_url, _ = split_credentials(config.host)
        self._extra_headers = dict(headers or {})
        self._sleep = sleep
        self._clients: dict[tuple[int, int], ollama.Client] = {}
        self._auth: dict[int, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._digests: dict[str, str | None] = {}
        self._capabilities: dict[str, list[str]] = {}
        self._held = threading.local()
        self._warm: set[tuple[int, str, int | None]] = set()
        self._warm_lock = threading.Lock()
        self.pool = HostPool(self._hosts(default_slots), self._probe, recheck_s=recheck_s, gate=gate)

    def _hosts(self, default_slots: int) -> list[Host]:
        entries = {h.host: h for h in self.config.hosts}
        order = [self.config.host] + [h for h in entries if h != self.config.host]
        hosts = []
        for index, url in enumerate(dict.fromkeys(order)):
            entry = entries.get(url)
            clean, auth = split_credentials(url)
            self._auth[index] = auth
            models = frozenset(model_key(m) for m in entry.models) if entry and entry.models is not None else None
            hosts.append(Host(index=index, base_url=clean, weight=entry.weight if entry else 1.0,
                              slots=(entry.parallel if entry and entry.parallel else default_slots),
                              models=models))
        return hosts

    # ---- transport -----------------------------------------------------------------------------

    def _client(self, timeout_ms: int | None = None, host: Host | None = None) -> ollama.Client:
        host = host or self.pool.hosts[0]
        timeout = timeout_ms or self.config.timeout_ms
        with self._lock:
            client = self._clients.get((host.index, timeout))
            if client is None:
                client = ollama.Client(host=host.base_url, timeout=timeout / 1000.0,
                                       headers={**self._auth[host.index], **self._extra_headers})
                self._clients[(host.index, timeout)] = client
            return client

    def _map_error(self, exc: Exception, model: str | None, host: Host | None = None) -> OllamaPipelineError:
        base_url = host.base_url if host is not None else self.base_url
        if isinstance(exc, OllamaPipelineError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return NetworkError(f"no answer from Ollama within {self.config.timeout_ms} ms",
                                code="network.timeout")
        if isinstance(exc, ollama.ResponseError):
            status = exc.status_code
            message = redact_text(str(exc.error))
            if status == 503:
                return NetworkError(f"Ollama is busy: {message}", code="network.busy", http_status=status)
            if status >= 500:
                return NetworkError(f"Ollama answered HTTP {status}: {message}", code="network.server_error",
                                    http_status=status)
            if status == 404:
                return InvalidResponseFormatError(f"model {model!r} not found in Ollama: {message}",
                                                  code="invalid_response_format.model_not_found",
                                                  http_status=status)
            if status == -1:  # an {"error": ...} line inside a stream
                return NetworkError(f"Ollama reported an error mid-stream: {message}",
                                    code="network.stream_error")
            return InvalidResponseFormatError(f"Ollama refused the request (HTTP {status}): {message}",
                                              code="invalid_response_format.bad_request", http_status=status)
        if isinstance(exc, ConnectionError | httpx.TransportError):
            return NetworkError(f"cannot reach Ollama at {redact_text(base_url)}: {type(exc).__name__}",
                                code="network.connect")
        raise exc

    def _probe(self, host: Host) -> bool:
        """The host answers /api/version within a short timeout."""
        try:
            client = self._client(min(self.config.timeout_ms, 2000), host)
            client._request_raw("GET", "/api/version")
            return True
        except Exception:  # any failure means the host is not usable now
            return False

    @contextmanager
    def hold(self, affinity: str) -> Iterator[None]:
        """Keep one slot of the item's host for this thread's calls of that item inside the block, so they
        go back to back to the same host (and Ollama slot, whose cache holds the item's image)."""
        held = getattr(self._held, "slot", None)
        if held is not None:
            yield
            return
        self._held.slot = [affinity, None, None]  # affinity, host, token: taken at the first call
        try:
            yield
        finally:
            slot = self._held.slot
            self._held.slot = None
            if slot[1] is not None:
                self.pool.release(slot[1], slot[2], ok=True, busy_s=0.0, count=False)

    def _acquire(self, model: str | None, affinity: str | None) -> tuple[Host, object | None, bool]:
        """A slot for one call: the slot this thread holds for the item, or a new one (held=False)."""
        slot = getattr(self._held, "slot", None)
        if slot is not None and slot[0] == affinity:
            host = slot[1]
            if host is not None and host.up and not host.suspect and host.serves(model):
                self.pool.count_call(host)
                return host, slot[2], True
            if host is not None:  # the held host went down or lacks the model: give its slot back
                self.pool.release(host, slot[2], ok=True, busy_s=0.0, count=False)
                slot[1] = slot[2] = None
            host, token = self.pool.acquire(model, affinity)
            slot[1], slot[2] = host, token
            return host, token, True
        host, token = self.pool.acquire(model, affinity)
        return host, token, False

    def _release(self, host: Host, token: object | None, held: bool, **counts: Any) -> None:
        if held:
            slot = self._held.slot
            self.pool.record(host, **counts)
            if counts.get("suspect") and not counts.get("ok"):  # a failing host: let the item move
                self.pool.release(host, token, ok=True, busy_s=0.0, count=False)
                slot[1] = slot[2] = None
            return
        self.pool.release(host, token, **counts)

    def _call(self, fn: Callable[[ollama.Client], T], *, model: str | None, timeout_ms: int | None = None,
              affinity: str | None = None, metered: bool = True) -> tuple[T, int]:
        """Run fn on the item's host with retries; a host that fails its health check is left for another
        (that move does not use up an attempt). Return (result, calls made)."""
        attempts = max(1, self.config.retry.max_attempts)
        backoff = self.config.retry.backoff_ms / 1000.0
        attempt = 0
        calls = 0
        moves = 0
        while True:
            host, token, held = self._acquire(model, affinity) if metered else (self.pool.pick(model), None, False)
            started = time.perf_counter()
            calls += 1
            try:
                result = fn(self._client(timeout_ms, host))
            except Exception as exc:  # mapped below; unknown exceptions re-raise unchanged
                busy = time.perf_counter() - started
                try:
                    error = self._map_error(exc, model, host)
                except Exception:
                    if metered:
                        self._release(host, token, held, ok=False, busy_s=busy, error=type(exc).__name__)
                    raise
                if metered:
                    self._release(host, token, held, ok=False, busy_s=busy, error=error.code,
                                  suspect=error.retryable and error.code != "network.busy")
                error.details["attempts"] = calls
                if len(self.pool.hosts) > 1:
                    error.details["host"] = host.label
                if not error.retryable:
                    raise error from None
                if (len(self.pool.hosts) > 1 and error.code != "network.busy" and moves < len(self.pool.hosts)
                        and not self.pool.check(host) and self.pool.has_alternative(host, model)):
                    moves += 1  # the host is down: the call moves to the item's next host at once
                    continue
                attempt += 1
                if attempt >= attempts:
                    raise error from None
                self._sleep(backoff * (2 ** (attempt - 1)))
                continue
            if not metered:
                return result, calls
            busy = time.perf_counter() - started
            self._release(host, token, held, ok=True, busy_s=busy,
                              prompt_tokens=getattr(result, "prompt_eval_count", None) or 0,
                              output_tokens=getattr(result, "eval_count", None) or 0,
                              model_s=(getattr(result, "total_duration", None) or 0) / 1e9)
            return result, calls

    # ---- the seed's API (§7) -------------------------------------------------------------------

    def _generate(self, prompt: str, options: OllamaOptions, images: Sequence[str] | None,
                  system: str | None, affinity: str | None) -> tuple[OllamaTextResponse, int]:
        think = options.think if options.think is not None and self.supports_thinking(options.model) else None
        started = time.perf_counter()

        def call(client: ollama.Client) -> Any:
            return client.generate(model=options.model, prompt=prompt, system=system or "",
                                   images=list(images) if images else None, format=options.format or None,
                                   options=options.request_options(), stream=False, think=think,
                                   keep_alive=options.keep_alive)

        raw, attempts = self._call(call, model=options.model, timeout_ms=options.timeout_ms, affinity=affinity)
        return OllamaTextResponse(
            model=raw.model or options.model,
            text=raw.response or "",
            done_reason=raw.done_reason,
            prompt_eval_count=raw.prompt_eval_count,
            eval_count=raw.eval_count,
            total_duration_ns=raw.total_duration,
            load_duration_ns=raw.load_duration,
            wall_ms=(time.perf_counter() - started) * 1000.0,
            attempts=attempts,
        ), attempts

    def generate_text(self, prompt: str, options: OllamaOptions, *, system: str | None = None,
                      affinity: str | None = None) -> OllamaTextResponse:
        """A text-only completion; calls with the same affinity (a media item) go to the same host."""
        response, _ = self._generate(prompt, options, None, system, affinity)
        return response

    def analyze_image(self, image_b64: str | Sequence[str], prompt: str, options: OllamaOptions, *,
                      system: str | None = None, affinity: str | None = None) -> OllamaVisionResponse:
        """A completion about one image (or several, e.g. a duplicate pair) sent as base64."""
        images = [image_b64] if isinstance(image_b64, str) else list(image_b64)
        if not self.supports_vision(options.model):
            # Ollama would refuse the images (v0.32: HTTP 400) or, in older releases, answer without them
            raise ValidationError(f"model {options.model!r} cannot see images: its /api/show capabilities lack "
                                  "'vision'; set ollama.vision_model to a vision model", code="validation.model_not_vision")
        response, _ = self._generate(prompt, options, images, system, affinity)
        data = response.model_dump() | {"images": len(images), "image_bytes": sum(len(i) for i in images)}
        return OllamaVisionResponse(**data)

    def _host_health(self, host: Host) -> HostHealth:
        started = time.perf_counter()
        try:
            client = self._client(min(self.config.timeout_ms, 5000), host)
            version = client._request_raw("GET", "/api/version").json().get("version")
            return HostHealth(ok=True, base_url=host.label, version=version,
                              latency_ms=(time.perf_counter() - started) * 1000.0)
        except Exception as exc:
            try:
                error = self._map_error(exc, None, host)
            except Exception as other:  # anything unexpected still means "not healthy"
                return HostHealth(ok=False, base_url=host.label, error_code="network.connect",
                                  error=type(other).__name__)
            return HostHealth(ok=False, base_url=host.label, error_code=error.code, error=error.message)

    def health(self) -> OllamaHealthResponse:
        """Is Ollama reachable? Never raises; one attempt per host with a short timeout. ok when any host
        answers; the first host's answer fills the top-level fields, every host's is in `hosts`."""
        checks = [self._host_health(h) for h in self.pool.hosts]
        hosts = [check.model_copy(update={
            "weight": row["weight"], "slots": row["slots"], "models": row["models"], "calls": row["calls"],
            "ok_calls": row["ok"], "failed": row["failed"], "calls_per_s": row["calls_per_s"]})
            for check, row in zip(checks, self.pool.snapshot(), strict=True)]
        best = next((c for c in checks if c.ok), checks[0])
        first = checks[0]
        return OllamaHealthResponse(ok=best.ok, base_url=first.base_url, version=best.version,
                                    latency_ms=best.latency_ms, error_code=None if best.ok else first.error_code,
                                    error=None if best.ok else first.error, hosts=hosts)

    def warm_up(self, options: OllamaOptions) -> list[str]:
        """Load the model with the run's runner options on every up host that serves it and has not loaded
        it with them in this process (an empty prompt only loads, server/routes.go). Concurrent callers
        wait for the one load. Never raises: the first real call reports a host that is down. Returns the
        hosts it loaded."""
        loaded = []
        with self._warm_lock:
            for host in self.pool.hosts:
                key = (host.index, model_key(options.model), options.num_ctx)
                if not host.up or not host.serves(options.model) or key in self._warm:
                    continue
                self._warm.add(key)
                try:
                    self._client(options.timeout_ms, host).generate(
                        model=options.model, prompt="", options=options.request_options(),
                        keep_alive=options.keep_alive)
                except Exception:  # reported by the first real call
                    continue
                loaded.append(host.label)
        return loaded

    def host_stats(self) -> list[dict[str, Any]]:
        """Per-host calls, failures, busy and model time of this process (for run metadata)."""
        return self.pool.snapshot()

    def list_models(self) -> OllamaModelsResponse:
        """Installed models with their digests (from /api/tags)."""
        raw, _ = self._call(lambda c: c.list(), model=None, metered=False)
        models = []
        for m in raw.models:
            details = m.details
            models.append(OllamaModel(
                name=m.model or "", digest=m.digest, size=m.size,
                family=getattr(details, "family", None), parameter_size=getattr(details, "parameter_size", None),
                quantization_level=getattr(details, "quantization_level", None)))
        with self._lock:
            self._digests.update({m.name: m.digest for m in models})
        return OllamaModelsResponse(models=models)

    def model_digest(self, model: str) -> str | None:
        """The digest of an installed model (cached per process); None when Ollama does not list it."""
        with self._lock:
            if model in self._digests:
                return self._digests[model]
        self.list_models()
        with self._lock:
            if model not in self._digests and f"{model}:latest" in self._digests:
                self._digests[model] = self._digests[f"{model}:latest"]
            return self._digests.setdefault(model, None)

    def capabilities(self, model: str) -> list[str]:
        """The model's /api/show capabilities (cached per process; empty when Ollama does not report them)."""
        with self._lock:
            caps = self._capabilities.get(model)
        if caps is None:
            raw, _ = self._call(lambda c: c.show(model), model=model, metered=False)
            caps = list(getattr(raw, "capabilities", None) or [])
            with self._lock:
                self._capabilities[model] = caps
        return caps

    def supports_thinking(self, model: str) -> bool:
        """Whether /api/show lists the `thinking` capability (only then is `think` sent)."""
        return "thinking" in self.capabilities(model)

    def supports_vision(self, model: str) -> bool:
        """Whether the model can see images (/api/show lists `vision`; an Ollama that reports no capabilities
        at all is given the benefit of the doubt)."""
        caps = self.capabilities(model)
        return not caps or "vision" in caps

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client._client.close()
            self._clients.clear()
