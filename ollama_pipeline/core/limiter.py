"""A per-host slot limit shared by every process that calls the same Ollama hosts (several Dagster or
Celery workers, several machines): PostgreSQL session advisory locks, one lock per (host, slot).

Dagster's pools and run queue limits count steps or runs, not model calls; a worker does not know how
many calls the others have in flight. Here a call holds the advisory lock `(host key, slot n)` on a
connection of its own for as long as the call runs: at most `parallel` calls per host hold one, across
all processes. A process that dies loses its connections, and PostgreSQL frees their locks at once (no
lease to expire). The host key is derived from the host's URL without credentials, so every worker that
names a host the same way shares its slots.

Plugs into core/hosts.py as its `SlotGate`. Never imports Dagster.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine

from ollama_pipeline.core.errors import ConfigError
from ollama_pipeline.core.hosts import Host
from ollama_pipeline.core.logs import redact_text

# First key of every lock: keeps these locks apart from other advisory locks of the same database.
LOCK_SPACE = "ollama_pipeline.host_slots"


def host_key(base_url: str) -> int:
    """A signed 32-bit key for a host (pg_try_advisory_lock(int4, int4) takes two)."""
    digest = hashlib.blake2b(f"{LOCK_SPACE}\x00{base_url.rstrip('/')}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresSlotGate:
    """`SlotGate` on PostgreSQL advisory locks; one pooled connection per slot this process holds."""

    def __init__(self, url: str, *, max_connections: int = 64) -> None:
        if not url.startswith(("postgresql", "postgres")):
            raise ConfigError(f"pipeline.slot_limiter_url must be a PostgreSQL URL, got {redact_text(url)!r}")
        self.engine: Engine = create_engine(url, pool_size=max_connections, max_overflow=0, pool_pre_ping=True)
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._open = 0
        self._max = max_connections

    def _connection(self) -> Connection | None:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._open >= self._max:
                return None
            self._open += 1
        try:
            return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception:
            with self._lock:
                self._open -= 1
            raise

    def try_acquire(self, host: Host) -> Any:
        """The first free slot of the host across all processes, or None when all are held."""
        conn = self._connection()
        if conn is None:
            return None
        key = host_key(host.base_url)
        try:
            for slot in range(host.slots):  # one lock per statement: a set-returning query could take several
                if conn.execute(text("SELECT pg_try_advisory_lock(:key, :slot)"), {"key": key, "slot": slot}).scalar():
                    return (conn, key, slot)
        except Exception:
            conn.invalidate()
            conn.close()
            with self._lock:
                self._open -= 1
            raise
        self._idle.put(conn)
        return None

    def release(self, host: Host, token: Any) -> None:
        conn, key, slot = token
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key, :slot)"), {"key": key, "slot": slot})
        except Exception:  # a broken connection has lost its locks already
            conn.invalidate()
            conn.close()
            with self._lock:
                self._open -= 1
            return
        self._idle.put(conn)

    def held(self, host: Host) -> int:
        """Slots of the host held right now by any process (for health output and tests)."""
        with self.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = (:key)::oid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ), {"key": host_key(host.base_url) & 0xFFFFFFFF}).scalar() or 0)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self.engine.dispose()
