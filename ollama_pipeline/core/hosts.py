"""The pool of Ollama hosts a process calls: which host serves a call, how many calls each host takes at
once, which hosts are up, and what each has done.

- **Stickiness.** A call names an affinity key (the media item); rendezvous hashing (weighted highest
  random weight) ranks the hosts that serve the model for that key, so an item's calls meet the same host
  and its prompt cache, and a host that leaves moves only its own items (to their second choice).
- **Bounded loads.** Hashing alone shares a run's items unevenly (64 items over 2 hosts can split 28/36),
  and the busiest host sets the run's wall time. A runner that knows its run's items calls `assign`
  once per run: each item goes to its first rendezvous choice unless that host already holds
  ceil((1 + ε) × its weighted fair share) of the run's items, then to its next choice ("consistent hashing
  with bounded loads", Mirrokni, Thorup, Zadimoghaddam 2016). The assignment is decided once per item
  and run; calls of an item without one (a queue job) use plain rendezvous. Failover is unchanged: the
  assigned host comes first, then the others in rendezvous order.
- **Slots.** A host serves at most `parallel` calls at once (Ollama does not report OLLAMA_NUM_PARALLEL, so
  it comes from the config). A call waits for a slot on its own host rather than spill to another (which
  would lose the prompt cache); runners keep about two calls per slot in flight, and hashing shares items
  in proportion to the weights.
- **Health.** A host whose call failed with a network error is probed (`GET /api/version`); when the probe
  fails it is down: calls go elsewhere, and it is probed again after `recheck_s`. With every host down,
  calls still go to their first choice, so one host behaves as one URL always did.

The transport (the `ollama` package) stays in core/client.py; this module only decides and counts. A
limiter shared by several processes can wrap `acquire`/`release` (core/limiter.py). Never imports Dagster.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ollama_pipeline.core.errors import NetworkError
from ollama_pipeline.core.logs import redact_text

RECHECK_S = 5.0
# ε of the bounded loads: no host gets more than ceil((1 + ε) × its weighted share) of a run's items
BALANCE_EPSILON = 0.05
# assignments a pool remembers (a few runs' items); beyond it the table starts afresh
MAX_ASSIGNED = 1_000_000


def model_key(name: str) -> str:
    """Ollama's model name rule: case-insensitive, `:latest` implied."""
    name = name.strip().lower()
    return name if ":" in name else f"{name}:latest"


@dataclass
class HostStats:
    """What one host did for this process."""

    calls: int = 0
    ok: int = 0
    failed: int = 0
    busy_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    model_s: float = 0.0
    downs: int = 0
    last_error: str | None = None


@dataclass
class Host:
    """One Ollama server as the pool sees it."""

    index: int
    base_url: str
    weight: float
    slots: int
    models: frozenset[str] | None
    in_flight: int = 0
    waiting: int = 0
    up: bool = True
    suspect: bool = False  # a call just failed with a network error: no new calls until it is probed
    checked_at: float = 0.0
    probing: bool = False
    stats: HostStats = field(default_factory=HostStats)

    @property
    def label(self) -> str:
        return redact_text(self.base_url)

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model_key(model) in self.models


def _score(key: str, host: Host) -> float:
    """Weighted rendezvous score: the host with the highest score is the key's first choice."""
    digest = hashlib.blake2b(f"{host.base_url}\x00{key}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -host.weight / math.log(unit)


class SlotGate(Protocol):
    """A limit on calls at once per host that more than one process shares (core/limiter.py)."""

    def try_acquire(self, host: Host) -> object | None: ...

    def release(self, host: Host, token: object) -> None: ...


class HostPool:
    """The hosts of one process, their slots, health and counters. Thread-safe."""

    def __init__(self, hosts: Sequence[Host], probe: Callable[[Host], bool], *, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic, gate: SlotGate | None = None) -> None:
        if not hosts:
            raise ValueError("a host pool needs at least one host")
        self.hosts = list(hosts)
        self._probe = probe
        self._recheck_s = recheck_s
        self._clock = clock
        self._cond = threading.Condition()
        self.started = clock()
        self.gate = gate
        self._assigned: dict[tuple[tuple[int, ...], str], int] = {}

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.hosts)

    def ranked(self, model: str | None, affinity: str | None) -> list[Host]:
        """Hosts serving the model, the affinity key's host first: its assigned host (`assign`), else its
        first rendezvous choice; then the others in rendezvous order (config order without a key)."""
        serving = [h for h in self.hosts if h.serves(model)]
        if affinity is None or len(serving) < 2:
            return serving
        order = sorted(serving, key=lambda h: _score(affinity, h), reverse=True)
        assigned = self._assigned.get((tuple(h.index for h in serving), affinity))
        if assigned is not None and order[0].index != assigned:
            order.sort(key=lambda h: h.index != assigned)  # stable: the rest keep their rendezvous order
        return order

    def assign(self, keys: Sequence[str], model: str | None = None, *,
               epsilon: float = BALANCE_EPSILON) -> dict[str, Host]:
        """Decide the host of each of a run's affinity keys, in order, with bounded loads: a key goes to
        the first host in its rendezvous order (among the hosts serving the model, the up ones when any)
        that holds fewer than ceil((1 + epsilon) × m × weight / total weight) keys, m counting this key.
        Later calls with these keys go to that host first. Returns key -> host."""
        serving = [h for h in self.hosts if h.serves(model)]
        if len(serving) < 2:
            return {k: serving[0] for k in keys} if serving else {}
        group = tuple(h.index for h in serving)
        with self._cond:
            candidates = [h for h in serving if h.up] or serving
        weights = {h.index: max(h.weight, 0.0) for h in candidates}
        if not sum(weights.values()):
            weights = dict.fromkeys(weights, 1.0)
        share = {i: w / sum(weights.values()) for i, w in weights.items()}
        load = dict.fromkeys(share, 0)
        plan: dict[str, Host] = {}
        for key in dict.fromkeys(keys):
            m = len(plan) + 1
            order = sorted(candidates, key=lambda h: _score(key, h), reverse=True)
            host = next((h for h in order if load[h.index] < math.ceil((1 + epsilon) * m * share[h.index])),
                        order[0])
            load[host.index] += 1
            plan[key] = host
        with self._cond:
            if len(self._assigned) + len(plan) > MAX_ASSIGNED:
                self._assigned.clear()
            self._assigned.update(((group, k), h.index) for k, h in plan.items())
        return plan

    def pick(self, model: str | None) -> Host:
        """A host for a call that takes no slot (model lists, /api/show): the first up host serving it."""
        ranked = self.ranked(model, None) or self.hosts
        with self._cond:
            return next((h for h in ranked if h.up), ranked[0])

    def _due_probe(self, now: float) -> Host | None:
        for host in self.hosts:
            if not host.up and not host.probing and now - host.checked_at >= self._recheck_s:
                host.probing = True
                return host
        return None

    def _run_probe(self, host: Host) -> bool:
        try:
            ok = bool(self._probe(host))
        except Exception:  # a probe that breaks means the host is not usable
            ok = False
        with self._cond:
            host.probing = False
            host.suspect = False
            host.checked_at = self._clock()
            if ok and not host.up:
                host.up = True
            elif not ok and host.up:
                host.up = False
                host.stats.downs += 1
            self._cond.notify_all()
        return ok

    def acquire(self, model: str | None, affinity: str | None, *, deadline_s: float | None = None
                ) -> tuple[Host, object | None]:
        """Wait for a slot on the best host for this call; return the host and a release token."""
        ranked = self.ranked(model, affinity)
        if not ranked:
            raise NetworkError(f"no configured Ollama host serves model {model!r}", code="network.connect",
                               details={"model": model})
        give_up = None if deadline_s is None else self._clock() + deadline_s
        with self._cond:
            while True:
                now = self._clock()
                probe = self._due_probe(now)
                if probe is not None:
                    self._cond.release()
                    try:
                        self._run_probe(probe)
                    finally:
                        self._cond.acquire()
                    continue
                candidates = [h for h in ranked if h.up] or ranked[:1]
                first = candidates[0]
                choice = first if first.in_flight < first.slots and not first.suspect else None
                if choice is not None:
                    token = self.gate.try_acquire(choice) if self.gate is not None else True
                    if token is not None:
                        choice.in_flight += 1
                        choice.stats.calls += 1
                        return choice, token
                if give_up is not None and now >= give_up:
                    raise NetworkError("no Ollama slot became free in time", code="network.busy")
                first.waiting += 1
                try:
                    # a shared gate frees slots in other processes without notifying us: poll it
                    self._cond.wait(0.05 if self.gate is not None else 1.0)
                finally:
                    first.waiting -= 1

    def count_call(self, host: Host) -> None:
        """A call on a slot already held (core/client.py `hold`)."""
        with self._cond:
            host.stats.calls += 1

    def record(self, host: Host, *, ok: bool, busy_s: float, error: str | None = None, suspect: bool = False,
               prompt_tokens: int = 0, output_tokens: int = 0, model_s: float = 0.0) -> None:
        """Count a finished call without giving its slot back."""
        with self._cond:
            self._count(host, ok=ok, busy_s=busy_s, error=error, suspect=suspect, prompt_tokens=prompt_tokens,
                        output_tokens=output_tokens, model_s=model_s)

    def release(self, host: Host, token: object | None, *, ok: bool, busy_s: float, error: str | None = None,
                suspect: bool = False, prompt_tokens: int = 0, output_tokens: int = 0, model_s: float = 0.0,
                count: bool = True) -> None:
        """Give the slot back and count the call; `suspect` holds new calls off the host until `check`."""
        if self.gate is not None and token is not None:
            self.gate.release(host, token)
        with self._cond:
            host.in_flight -= 1
            if count:
                self._count(host, ok=ok, busy_s=busy_s, error=error, suspect=suspect,
                            prompt_tokens=prompt_tokens, output_tokens=output_tokens, model_s=model_s)
            self._cond.notify_all()

    def _count(self, host: Host, *, ok: bool, busy_s: float, error: str | None, suspect: bool,
               prompt_tokens: int, output_tokens: int, model_s: float) -> None:
        s = host.stats
        s.busy_s += busy_s
        if ok:
            s.ok += 1
            s.prompt_tokens += prompt_tokens
            s.output_tokens += output_tokens
            s.model_s += model_s
            return
        s.failed += 1
        s.last_error = error
        if suspect and host.up and len(self.hosts) > 1:
            host.suspect = True

    def check(self, host: Host) -> bool:
        """Probe a host after a failed call; False marks it down (calls then go to other hosts)."""
        with self._cond:
            while host.probing:
                self._cond.wait(1.0)
            if not host.up or not host.suspect:
                return host.up  # another call's probe already decided
            host.probing = True
        return self._run_probe(host)

    def has_alternative(self, host: Host, model: str | None) -> bool:
        with self._cond:
            return any(h is not host and h.up and h.serves(model) for h in self.hosts)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-host state and counters, for run metadata and `ollama-pipeline health`."""
        elapsed = max(self._clock() - self.started, 1e-9)
        with self._cond:
            return [{
                "host": h.label, "up": h.up, "weight": h.weight, "slots": h.slots,
                "models": sorted(h.models) if h.models is not None else None,
                "in_flight": h.in_flight, "calls": h.stats.calls, "ok": h.stats.ok, "failed": h.stats.failed,
                "downs": h.stats.downs, "busy_s": round(h.stats.busy_s, 3),
                "model_s": round(h.stats.model_s, 3), "prompt_tokens": h.stats.prompt_tokens,
                "output_tokens": h.stats.output_tokens,
                "calls_per_s": round(h.stats.ok / elapsed, 3), "last_error": h.stats.last_error,
            } for h in self.hosts]
