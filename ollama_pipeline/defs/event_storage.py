"""Dagster event log storages that write a batch of asset events at once (configured in dagster.yaml).

A run over N media items makes Dagster store one "materialization planned" event per item and asset
before the run starts, and our step one materialization per item (see defs.events). Dagster hands such
events to `store_event_batch` when `DAGSTER_EVENT_BATCH_SIZE` is set, but its SQLite storage then stores
them one by one (two databases, a new connection and a commit each: ~25 ms per event measured), and its
PostgreSQL storage batches materializations only (planned events: ~10 ms each). These subclasses store a
batch of materializations or planned events in one transaction per database, exactly the rows Dagster's
own `store_event` writes, and update the asset's row once per asset key with the batch's last event (as
Dagster's PostgreSQL batch write does). Every other event goes through the parent class unchanged.

- `BatchedSqliteEventLogStorage`: the shipped default (dagster.yaml); `base_dir` defaults to
  `$DAGSTER_HOME/history/runs`, where Dagster's default SQLite storage keeps its files, so an existing
  instance keeps its history.
- `BatchedPostgresEventLogStorage`: for a PostgreSQL instance (see dagster.yaml and README).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dagster import DagsterEventType, Field, StringSource
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._serdes import ConfigurableClassData
from dagster_postgres.event_log.event_log import PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

BATCHED_TYPES = frozenset({DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_MATERIALIZATION_PLANNED})


def _split(events: Sequence[EventLogEntry]) -> tuple[dict[str, list[EventLogEntry]], list[EventLogEntry]]:
    """Batchable asset events grouped by run (in order), and the rest."""
    by_run: dict[str, list[EventLogEntry]] = {}
    rest: list[EventLogEntry] = []
    for event in events:
        dagster_event = event.dagster_event
        if dagster_event is not None and dagster_event.event_type in BATCHED_TYPES and dagster_event.asset_key:
            by_run.setdefault(event.run_id, []).append(event)
        else:
            rest.append(event)
    return by_run, rest


def _last_per_asset(events: Sequence[EventLogEntry], ids: Sequence[int]) -> list[tuple[EventLogEntry, int]]:
    last: dict[Any, tuple[EventLogEntry, int]] = {}
    for event, event_id in zip(events, ids, strict=True):
        last[(event.dagster_event.asset_key, event.dagster_event.event_type)] = (event, event_id)  # type: ignore[union-attr]
    return list(last.values())


def default_sqlite_base_dir() -> str:
    home = os.environ.get("DAGSTER_HOME") or os.path.join(os.getcwd(), ".dagster_home")
    return os.path.join(home, "history", "runs", "")


class BatchedSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log storage, with batches of asset events written in one transaction."""

    def __init__(self, base_dir: str | None = None, inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir or default_sqlite_base_dir(), inst_data=inst_data)

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # type: ignore[override]
                          config_value: dict[str, Any]) -> BatchedSqliteEventLogStorage:
        return cls(inst_data=inst_data, base_dir=config_value.get("base_dir"))

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        by_run, rest = _split(events)
        for run_id, group in by_run.items():
            with self.run_connection(run_id) as conn:
                conn.execute(self.prepare_insert_event_batch(group))
            with self.index_transaction() as conn:
                ids = [int(conn.execute(self.prepare_insert_event(event)).inserted_primary_key[0])
                       for event in group]
                self._store_asset_event_tags(conn, group, ids)
                for event, event_id in _last_per_asset(group, ids):
                    self._store_asset_event(conn, event, event_id)
        for event in rest:
            self.store_event(event)


class BatchedPostgresEventLogStorage(PostgresEventLogStorage):
    """dagster-postgres' event log storage, with batches of planned events written at once too."""

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # type: ignore[override]
                          config_value: dict[str, Any]) -> BatchedPostgresEventLogStorage:
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value))

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        from dagster._core.storage.event_log.schema import SqlEventLogStorageTable

        by_run, rest = _split(events)
        for group in by_run.values():
            with self._connect() as conn:
                result = conn.execute(self.prepare_insert_event_batch(group)
                                      .returning(SqlEventLogStorageTable.c.id))
                ids = [int(row[0]) for row in result.fetchall()]
            with self.index_transaction() as conn:
                self._store_asset_event_tags(conn, group, ids)
                for event, event_id in _last_per_asset(group, ids):
                    self._store_asset_event(conn, event, event_id)
        for event in rest:
            self.store_event(event)
