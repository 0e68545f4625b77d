"""The emulated Ollama scheduler and runners: loads, reloads, evictions, keep-alive, slots, prefix cache, cost.

It follows Ollama v0.32.15's server/sched.go: a request for a loaded model whose runner options are
unchanged goes straight to that runner and waits for one of its OLLAMA_NUM_PARALLEL slots (llm/llama_server.go
holds a semaphore of that size); any other request joins the pending queue of OLLAMA_MAX_QUEUE entries (full:
503), which one loop works off: it reloads a runner whose options changed (`needsReload`), evicts one when
OLLAMA_MAX_LOADED_MODELS or memory is exhausted (`findRunnerToUnload`: idle first, then the shortest
keep-alive), and loads the model, blocking the queue for the whole load. A runner whose last request ends
unloads after its keep-alive. Each slot remembers its last prompt and output; the longest common prefix
(images compared by hash, as llama.cpp's `cache_prompt` does) is not prefilled again.

Time: the modeled durations (what `*_duration` fields report) are in model seconds; the emulator waits
`model seconds / time_scale` of wall time. Must not import the pipeline.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ollama_pipeline.emulator.profiles import HostProfile, ModelProfile
from ollama_pipeline.emulator.protocol import RUNNER_OPTIONS, RequestError

BUSY = "server busy, please try again.  maximum pending requests exceeded"
# llama.cpp server's slot selection: a slot whose cached prompt is at least this similar is reused
# (server `--slot-prompt-similarity`, default 0.1); otherwise the least recently used idle slot.
SLOT_SIMILARITY = 0.1


@dataclass(frozen=True)
class Unit:
    """One piece of a prompt: a text token (4 characters) or a whole image (hash, token count)."""

    key: str
    tokens: int = 1


def text_units(text: str) -> list[Unit]:
    """Text as tokens of 4 characters (the usual rule of thumb for English BPE vocabularies)."""
    return [Unit("t" + text[i : i + 4]) for i in range(0, len(text), 4)]


def count_tokens(units: list[Unit]) -> int:
    return sum(u.tokens for u in units)


def common_prefix_tokens(a: list[Unit], b: list[Unit]) -> int:
    """Tokens of the longest common prefix; an image matches only whole."""
    total = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        total += x.tokens
    return total


@dataclass
class Slot:
    index: int
    units: list[Unit] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


@dataclass
class ModelCounters:
    requests: int = 0
    loads: int = 0
    reloads: int = 0
    evictions: int = 0
    unloads: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    cache_hits: int = 0
    image_tokens: int = 0
    image_tokens_cached: int = 0
    distinct_images: int = 0  # images (by hash) this model saw at least once
    distinct_image_tokens: int = 0  # their tokens: what prefilling each image once would cost
    output_tokens: int = 0
    thinking_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    load_s: float = 0.0
    loaded_s: float = 0.0  # model seconds the model was resident (closed intervals)
    slot_s: float = 0.0  # loaded seconds × slots (closed intervals)
    max_concurrent: int = 0


class Runner:
    """One loaded model: its runner options, slots and keep-alive."""

    def __init__(self, model: ModelProfile, options: dict[str, Any], parallel: int, session_s: float,
                 num_ctx_auto: bool, num_batch_auto: bool, memory: int, clock: Clock) -> None:
        self.model = model
        self.options = options
        self.parallel = parallel
        self.session_s = session_s
        self.num_ctx_auto = num_ctx_auto
        self.num_batch_auto = num_batch_auto
        self.memory = memory
        self.slots = [Slot(i) for i in range(parallel)]
        self.sem = asyncio.Semaphore(parallel)
        self.ref_count = 0
        self.active = 0
        self.timer: asyncio.TimerHandle | None = None
        self.expires_at = time.time() + clock.wall(session_s)
        self.loaded_model_t = clock.model_now()
        self.idle = asyncio.Event()
        self.idle.set()
        self.evicting: str | None = None  # why the scheduler is unloading it (reload, max_loaded_models, memory)

    @property
    def num_ctx(self) -> int:
        return int(self.options["num_ctx"])


class Clock:
    """Model time against wall time: model seconds = wall seconds × scale."""

    def __init__(self, scale: float) -> None:
        self.scale = max(scale, 1e-9)
        self._t0 = time.perf_counter()

    def wall(self, model_s: float) -> float:
        return model_s / self.scale if math.isfinite(model_s) else math.inf

    def model_now(self) -> float:
        return (time.perf_counter() - self._t0) * self.scale

    async def sleep(self, model_s: float) -> None:
        if model_s > 0:
            await asyncio.sleep(model_s / self.scale)


@dataclass
class Placement:
    """What a request got from the scheduler."""

    runner: Runner
    load_s: float = 0.0  # modeled scheduling time (a load, waits for evictions and the queue)


@dataclass
class Request:
    model: ModelProfile
    options: dict[str, Any]
    keep_alive_s: float | None
    num_ctx_auto: bool
    num_batch_auto: bool
    future: asyncio.Future[Placement] | None = None
    queued_at: float = 0.0
    queued_behind: bool = False


class Engine:
    """Scheduler, runners and counters of one emulated host (runs on one asyncio loop)."""

    def __init__(self, host: HostProfile) -> None:
        self.host = host
        self.clock = Clock(host.time_scale)
        self.loaded: dict[str, Runner] = {}
        self.pending: asyncio.Queue[Request] | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self.lock = threading.Lock()  # counters are read from other threads
        self.counters: dict[str, ModelCounters] = {}
        self.events: list[dict[str, Any]] = []
        self.seen_images: dict[str, set[str]] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.counters = {}
            self.events = []
            self.seen_images = {}
            now = self.clock.model_now()
            for runner in self.loaded.values():
                runner.loaded_model_t = now
            self.requests = 0
            self.model_calls = 0
            self.by_path: dict[str, int] = {}
            self.by_model: dict[str, int] = {}
            self.inflight = 0
            self.waiting = 0
            self.max_inflight_seen = 0
            self.rejected_busy = 0

    def c(self, model: str) -> ModelCounters:
        if model not in self.counters:
            self.counters[model] = ModelCounters()
        return self.counters[model]

    def add(self, model: str, **deltas: float) -> ModelCounters:
        """Add to a model's counters (under the lock)."""
        with self.lock:
            c = self.c(model)
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)
            return c

    def _event(self, kind: str, model: str, **extra: Any) -> None:
        self.events.append({"event": kind, "model": model, "t": round(self.clock.model_now(), 6), **extra})
        del self.events[:-500]

    async def start(self) -> None:
        self.pending = asyncio.Queue(maxsize=max(1, self.host.max_queue))
        self._task = asyncio.get_running_loop().create_task(self._process_pending())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    # ---- scheduling (server/sched.go) -----------------------------------------------------------------

    def runner_options(self, model: ModelProfile, options: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
        """The runner options a request asks for, with getRunner's adjustments, and whether num_ctx/num_batch
        were left to Ollama."""
        num_ctx_auto = "num_ctx" not in options
        num_batch_auto = "num_batch" not in options
        merged = {k: options.get(k) for k in RUNNER_OPTIONS}
        merged["num_ctx"] = options.get("num_ctx", self.host.default_num_ctx)
        merged["num_batch"] = options.get("num_batch", 512)
        merged["num_gpu"] = options.get("num_gpu", -1)
        if merged["num_ctx"] < 4:
            merged["num_ctx"] = 4
        if "vision" in model.capabilities:
            merged["num_ctx"] = max(merged["num_ctx"], 2048)  # "multimodal models require at least 2048 context"
        merged["num_ctx"] = min(merged["num_ctx"], model.context_length)  # effectiveContext: capped at training
        return merged, num_ctx_auto, num_batch_auto

    def needs_reload(self, runner: Runner, req: Request) -> bool:
        new = dict(req.options)
        old = dict(runner.options)
        if runner.num_ctx_auto and req.num_ctx_auto:
            new["num_ctx"] = old["num_ctx"]
        if runner.num_batch_auto and req.num_batch_auto:
            new["num_batch"] = old["num_batch"]
        if (new.get("num_gpu") or 0) < 0:
            new["num_gpu"] = old["num_gpu"] = -1
        return new != old

    async def get_runner(self, model: ModelProfile, options: dict[str, Any], keep_alive_s: float | None) -> Placement:
        """A runner for model (loading it when needed); raises the 503 when the pending queue is full."""
        runner_opts, ctx_auto, batch_auto = self.runner_options(model, options)
        req = Request(model, runner_opts, keep_alive_s, ctx_auto, batch_auto)
        runner = self.loaded.get(model.name)
        if runner is not None and not self.needs_reload(runner, req):
            self._use(runner, req)
            return Placement(runner)
        assert self.pending is not None
        req.future = asyncio.get_running_loop().create_future()
        req.queued_at = time.perf_counter()
        req.queued_behind = self._busy or not self.pending.empty()
        try:
            self.pending.put_nowait(req)
        except asyncio.QueueFull:
            with self.lock:
                self.rejected_busy += 1
            raise RequestError(503, BUSY) from None
        return await req.future

    def _use(self, runner: Runner, req: Request) -> None:
        runner.ref_count += 1
        runner.idle.clear()
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if req.keep_alive_s is not None:
            runner.session_s = req.keep_alive_s

    def release(self, runner: Runner) -> None:
        """A request is done with runner (processCompleted): start its keep-alive or unload it."""
        runner.ref_count -= 1
        if runner.ref_count > 0:
            return
        runner.idle.set()
        if self.loaded.get(runner.model.name) is not runner:
            return
        if runner.session_s <= 0:
            self._unload(runner, runner.evicting or "keep_alive")
            return
        wall = self.clock.wall(runner.session_s)
        runner.expires_at = time.time() + min(wall, 292 * 365.25 * 86400)
        if math.isfinite(wall):
            runner.timer = asyncio.get_running_loop().call_later(wall, self._expire, runner)

    def _expire(self, runner: Runner) -> None:
        runner.timer = None
        if runner.ref_count <= 0 and self.loaded.get(runner.model.name) is runner:
            self._unload(runner, "keep_alive")

    def expire_now(self, model: ModelProfile) -> None:
        """keep_alive 0 with an empty prompt (sched.go expireRunner): unload once idle."""
        runner = self.loaded.get(model.name)
        if runner is None:
            return
        runner.session_s = 0
        runner.expires_at = time.time()
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        if runner.ref_count <= 0:
            self._unload(runner, "keep_alive")

    def _unload(self, runner: Runner, why: str) -> None:
        if self.loaded.get(runner.model.name) is runner:
            del self.loaded[runner.model.name]
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None
        now = self.clock.model_now()
        with self.lock:
            c = self.c(runner.model.name)
            resident = max(0.0, now - runner.loaded_model_t)
            c.loaded_s += resident
            c.slot_s += resident * runner.parallel
            if why == "keep_alive":
                c.unloads += 1
            self._event("unload", runner.model.name, why=why)

    def _fits(self, model: ModelProfile, options: dict[str, Any]) -> bool:
        if self.host.vram_bytes is None or not self.loaded:
            return True
        used = sum(r.memory for r in self.loaded.values())
        need = model.memory_bytes(options["num_ctx"], self.host.parallel_for(model))
        return need <= (self.host.vram_bytes - used) * 0.8  # sched.go: "Use 80% of free memory as threshold"

    def _runner_to_unload(self) -> Runner | None:
        runners = sorted(self.loaded.values(), key=lambda r: (r.session_s, r.model.name))
        for runner in runners:
            if runner.ref_count == 0:
                return runner
        return runners[0] if runners else None

    async def _process_pending(self) -> None:
        assert self.pending is not None
        while True:
            req = await self.pending.get()
            if req.future is None or req.future.done():
                continue
            # time spent behind other pending requests counts only when the loop was busy with them
            waited = time.perf_counter() - req.queued_at if req.queued_behind else 0.0
            self._busy = True
            try:
                placement = await self._place(req)
            except Exception as exc:  # a failed load answers that request only
                if not req.future.done():
                    req.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            placement.load_s += waited * self.clock.scale
            if req.future.done():  # the client went away while we loaded
                self.release(placement.runner)
            else:
                req.future.set_result(placement)

    async def _place(self, req: Request) -> Placement:
        name = req.model.name
        waited = 0.0
        while True:
            runner = self.loaded.get(name)
            victim: Runner | None = None
            why = ""
            if runner is not None:
                if not self.needs_reload(runner, req):
                    self._use(runner, req)
                    return Placement(runner, load_s=waited * self.clock.scale)
                victim, why = runner, "reload"
            elif len(self.loaded) >= self.host.max_runners:
                victim, why = self._runner_to_unload(), "max_loaded_models"
            elif self._fits(req.model, req.options):
                return Placement(await self._load(req), load_s=self._load_s(req.model) + waited * self.clock.scale)
            else:
                victim, why = self._runner_to_unload(), "memory"
            if victim is None:
                await asyncio.sleep(0)
                continue
            with self.lock:
                if why == "reload":
                    self.c(name).reloads += 1
                else:
                    self.c(victim.model.name).evictions += 1
            victim.session_s = 0
            victim.evicting = why
            if victim.timer is not None:
                victim.timer.cancel()
                victim.timer = None
            if not victim.idle.is_set():  # wait for its requests to finish (modeled as scheduling time)
                t0 = time.perf_counter()
                await victim.idle.wait()
                waited += time.perf_counter() - t0
            if self.loaded.get(victim.model.name) is victim:
                self._unload(victim, why)

    def _load_s(self, model: ModelProfile) -> float:
        if self.host.flat_latency_ms is not None:
            return 0.0
        return model.rates()[2]

    async def _load(self, req: Request) -> Runner:
        model = req.model
        load_s = self._load_s(model)
        await self.clock.sleep(load_s)  # sched.go load(): llama.Load waits for the server to be ready
        parallel = self.host.parallel_for(model)
        session = req.keep_alive_s if req.keep_alive_s is not None else self.host.keep_alive_s
        runner = Runner(model, req.options, parallel, session, req.num_ctx_auto, req.num_batch_auto,
                        model.memory_bytes(req.options["num_ctx"], parallel), self.clock)
        self.loaded[model.name] = runner
        self.add(model.name, loads=1, load_s=load_s)
        with self.lock:
            self._event("load", model.name, num_ctx=runner.num_ctx, parallel=parallel, load_s=load_s)
        self._use(runner, req)
        return runner

    # ---- a completion on a slot (llm/llama_server.go Completion + llama.cpp server slots) --------------

    def pick_slot(self, runner: Runner, units: list[Unit]) -> Slot:
        idle = [s for s in runner.slots if not s.busy]
        total = max(1, count_tokens(units))
        best = max(idle, key=lambda s: common_prefix_tokens(s.units, units))
        if common_prefix_tokens(best.units, units) / total >= SLOT_SIMILARITY:
            return best
        return min(idle, key=lambda s: s.last_used)

    def rates(self, model: ModelProfile) -> tuple[float, float]:
        prefill, decode, _ = model.rates()
        return prefill * self.host.prefill_factor, decode * self.host.decode_factor

    def cost(self, model: ModelProfile, prefill_tokens: int, output_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) in model time."""
        if self.host.flat_latency_ms is not None:
            return 0.0, self.host.flat_latency_ms / 1000.0
        prefill_tps, decode_tps = self.rates(model)
        return prefill_tokens / prefill_tps, output_tokens / decode_tps

    def snapshot(self) -> dict[str, Any]:
        """Counters for /_emulator/stats (host-wide and per model, modeled seconds)."""
        now = self.clock.model_now()
        with self.lock:
            models: dict[str, Any] = {}
            for name, c in self.counters.items():
                row = dict(vars(c))
                runner = self.loaded.get(name)
                if runner is not None:
                    resident = max(0.0, now - runner.loaded_model_t)
                    row["loaded_s"] += resident
                    row["slot_s"] += resident * runner.parallel
                busy = row["prefill_s"] + row["decode_s"]
                row["busy_s"] = busy
                row["idle_slot_s"] = max(0.0, row["slot_s"] - busy)
                models[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            totals = {k: sum(m[k] for m in models.values()) for k in
                      ("loads", "reloads", "evictions", "unloads", "prefill_tokens", "cached_tokens", "cache_hits",
                       "image_tokens", "image_tokens_cached", "output_tokens", "thinking_tokens", "prompt_tokens",
                       "distinct_images", "distinct_image_tokens", "requests")}
            gpu = {k: round(sum(m[k] for m in models.values()), 6) for k in
                   ("prefill_s", "decode_s", "load_s", "busy_s", "idle_slot_s")}
            return {"requests": self.requests, "model_calls": self.model_calls, "served": self.model_calls,
                    "by_path": dict(self.by_path), "by_model": dict(self.by_model), "inflight": self.inflight,
                    "waiting": self.waiting, "max_inflight_seen": self.max_inflight_seen,
                    "rejected_busy": self.rejected_busy, **totals, "gpu_s": gpu, "models": models,
                    "loaded": sorted(self.loaded), "time_scale": self.clock.scale, "model_time_s": round(now, 6),
                    "profile": self.host.name}
