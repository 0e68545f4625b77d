"""The `media` dynamic partitions: one partition per `media.id` (as a string), in the order ids were added.

Dagster stores dynamic partition keys in insertion order, and a run over a range of partitions covers the
keys between two keys in that order. `contiguous_ranges` turns any set of keys into the fewest such ranges,
so a run over "these media items" materializes exactly them. This module must not touch the library DB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dagster import DynamicPartitionsDefinition

MEDIA_PARTITIONS_NAME = "media"

media_partitions = DynamicPartitionsDefinition(name=MEDIA_PARTITIONS_NAME)

# Run tags that make one run cover a range of partitions (what a single-run backfill launches).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def media_key(media_id: int) -> str:
    """The partition key of a media item."""
    return str(int(media_id))


def range_tags(start: str, end: str) -> dict[str, str]:
    """Run tags for one run over the partitions start..end (inclusive, in dynamic-partition order)."""
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


def contiguous_ranges(ordered_keys: Sequence[str], wanted: Iterable[str]) -> list[tuple[str, str]]:
    """The fewest (start, end) ranges of ordered_keys that cover exactly the wanted keys.

    Raises KeyError for a wanted key that is not in ordered_keys.
    """
    position = {key: index for index, key in enumerate(ordered_keys)}
    indexes = sorted({position[key] for key in wanted})
    ranges: list[tuple[str, str]] = []
    run_start = previous = None
    for index in indexes:
        if run_start is None:
            run_start = previous = index
        elif index == previous + 1:
            previous = index
        else:
            ranges.append((ordered_keys[run_start], ordered_keys[previous]))
            run_start = previous = index
    if run_start is not None:
        ranges.append((ordered_keys[run_start], ordered_keys[previous]))
    return ranges
