"""Per-item materialization events, stored by the instance in batches.

Every media item a run materializes gets its own `AssetMaterialization(partition=...)`. Yielded as they
are, Dagster stores each one on its own (a new database connection, an insert and the asset index
update: ~25-30 ms on the instance storages measured), which in a run over 1,000 items costs more than the
model calls it reports. Dagster stores *batches* of events in one write when the event carries batch
metadata and `DAGSTER_EVENT_BATCH_SIZE` is set, but it attaches batch metadata only to the events of an
`Output`. `EventBatcher` therefore turns the per-item materializations into the very `DagsterEvent`s the
step would have made of them (`DagsterEvent.asset_materialization`), with batch metadata: a batch ends
after `max_items` items or `max_seconds`, whichever comes first, so the UI still shows progress.

With batching off (`DAGSTER_EVENT_BATCH_SIZE` unset or 0), or on an event log storage that stores a batch
event by event (SQLite), the materializations pass through unchanged.
`ollama_pipeline.defs` sets the shipped defaults (see `INSTANCE_ENV_DEFAULTS` there).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from dagster import AssetExecutionContext, AssetMaterialization
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata, generate_event_batch_id
from dagster._core.storage.event_log.base import EventLogStorage

BATCH_SIZE_ENV = "DAGSTER_EVENT_BATCH_SIZE"


def batch_size() -> int:
    """Dagster's event batch size (0: batching off). Read at each run, as Dagster does."""
    try:
        return max(0, int(os.environ.get(BATCH_SIZE_ENV, "0")))
    except ValueError:
        return 0


def stores_batches(storage: EventLogStorage) -> bool:
    """Whether the storage writes a batch at once (PostgreSQL); SQLite's stores event by event, so
    buffering would only delay the events and stall the step while a batch is written."""
    return type(storage).store_event_batch is not EventLogStorage.store_event_batch


class EventBatcher:
    """Buffers per-item materializations and yields them as one batch of Dagster events."""

    def __init__(self, context: AssetExecutionContext, *, max_items: int = 256, max_seconds: float = 2.0) -> None:
        size = batch_size()
        self.enabled = size > 0 and stores_batches(context.instance.event_log_storage)
        self.max_items = max(1, min(max_items, size)) if self.enabled else 1
        self.max_seconds = max_seconds
        self._step = context.get_step_execution_context() if self.enabled else None
        self._buffer: list[AssetMaterialization] = []
        self._first_at = 0.0

    def add(self, materialization: AssetMaterialization) -> Iterator[AssetMaterialization | DagsterEvent]:
        """Buffer one materialization; yields a batch when it is full or old enough."""
        if not self.enabled:
            yield materialization
            return
        if not self._buffer:
            self._first_at = time.monotonic()
        self._buffer.append(materialization)
        if len(self._buffer) >= self.max_items or time.monotonic() - self._first_at >= self.max_seconds:
            yield from self.flush()

    def flush(self) -> Iterator[DagsterEvent]:
        """Yield what is buffered as one batch (the last event closes it)."""
        if not self._buffer:
            return
        batch_id = generate_event_batch_id()
        last = len(self._buffer) - 1
        buffered, self._buffer = self._buffer, []
        for index, materialization in enumerate(buffered):
            yield DagsterEvent.asset_materialization(self._step, materialization,
                                                     DagsterEventBatchMetadata(batch_id, index == last))
