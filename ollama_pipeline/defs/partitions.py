"""The `media_blocks` dynamic partitions: one partition per block of media items (core.partitioning:
`1-1000`, `1001-2000`, ... for integer ids, `h0042` hash buckets for text ids), added as the library grows.

Dagster stores dynamic partition keys in insertion order, and a run over a range of partitions covers the
keys between two keys in that order. The new-media sensor adds blocks in id order, so a range of blocks is a
range of ids. `contiguous_ranges` turns any set of keys into the fewest such ranges. This module must not
touch the library DB.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from dagster import DagsterInstance, DynamicPartitionsDefinition

MEDIA_PARTITIONS_NAME = "media_blocks"

media_partitions = DynamicPartitionsDefinition(name=MEDIA_PARTITIONS_NAME)

# Run tags that make one run cover a range of partitions (what a single-run backfill launches).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def range_tags(start: str, end: str) -> dict[str, str]:
    """Run tags for one run over the partitions start..end (inclusive, in dynamic-partition order)."""
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


KeyOrder = Sequence[str] | Mapping[str, int]  # all keys in partition order, or positions of some keys
SCAN_PAGE = 10_000


def as_positions(ordered: KeyOrder) -> Mapping[str, int]:
    return ordered if isinstance(ordered, Mapping) else {key: index for index, key in enumerate(ordered)}


def contiguous_ranges(ordered_keys: KeyOrder, wanted: Iterable[str]) -> list[tuple[str, str]]:
    """The fewest (start, end) ranges of the partition order that cover exactly the wanted keys.

    ordered_keys: every key in partition order, or (what `register_partitions` returns) the positions of
    at least the wanted keys. Raises KeyError for a wanted key that has no position.
    """
    position = as_positions(ordered_keys)
    key_at = {position[key]: key for key in set(wanted)}
    ranges: list[tuple[str, str]] = []
    run_start = previous = None
    for index in sorted(key_at):
        if run_start is None:
            run_start = previous = index
        elif index == previous + 1:
            previous = index
        else:
            ranges.append((key_at[run_start], key_at[previous]))
            run_start = previous = index
    if run_start is not None:
        ranges.append((key_at[run_start], key_at[previous]))
    return ranges


def _scan_positions(instance: DagsterInstance, wanted: set[str]) -> tuple[dict[str, int], int]:
    """Positions of the wanted keys among all media partitions, and how many there are, read page by
    page so that memory does not grow with the number of partitions."""
    found: dict[str, int] = {}
    cursor: str | None = None
    total = 0
    while True:
        page = instance.get_paginated_dynamic_partitions(MEDIA_PARTITIONS_NAME, limit=SCAN_PAGE, ascending=True,
                                                         cursor=cursor)
        for key in page.results:
            if key in wanted:
                found[key] = total
            total += 1
        if not page.has_more or not page.results:
            return found, total
        cursor = page.cursor


def _existing(instance: DagsterInstance, keys: list[str]) -> set[str]:
    """Which of the keys exist: one bounded query where the instance has it (newer Dagster releases), else
    one lookup per key (a tick's keys are blocks of items: a handful)."""
    bulk = getattr(instance, "get_existing_dynamic_partitions", None)
    if bulk is not None:
        return set(bulk(MEDIA_PARTITIONS_NAME, keys))
    return {key for key in keys if instance.has_dynamic_partition(MEDIA_PARTITIONS_NAME, key)}


class Registered(NamedTuple):
    """What `register_partitions` did: the position of every given key, and the keys it added."""

    positions: dict[str, int]
    added: list[str]


def register_partitions(instance: DagsterInstance, keys: Sequence[str]) -> Registered:
    """Add the keys the instance does not know yet (in the given order, after all others); returns the
    position of every given key in partition order (for `contiguous_ranges` and range sizes) and the keys
    that were added.

    Never loads every partition key: new keys are checked with a bounded query, and only when some keys
    were registered before are positions read, page by page (100,000 partitions: 10 queries)."""
    wanted = list(dict.fromkeys(keys))
    existing = _existing(instance, wanted) if wanted else set()
    missing = [key for key in wanted if key not in existing]
    if existing:
        positions, total = _scan_positions(instance, set(existing))
    else:  # all new: they follow each other at the end, and only their relative order matters
        positions, total = {}, 0
    if missing:
        instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, missing)
        positions.update({key: total + offset for offset, key in enumerate(missing)})
    return Registered(positions, missing)
