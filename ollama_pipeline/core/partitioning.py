"""Which partition a media item belongs to: blocks of consecutive integer ids, or hash buckets of text ids.

One Dagster partition per item does not scale (Dagster advises at most 100,000 partitions per asset, and
its UI slows down far below that), so a partition holds a group of items: integer ids in fixed blocks of
`pipeline.partition_size` (`1-1000`, `1001-2000`, ...; a block never changes its members), text or UUID ids
in `HASH_BUCKETS` buckets chosen by a stable hash of the id's text (`h0042`; a UUID in its canonical
lower-case form). Which ids a partition holds is read from the gallery's media table as discovered
(core.db.gallery: prefix, schema, column names). Per-item state stays in
`ollama_stage_results`; a partition only groups items for runs and for Dagster's bookkeeping.
This module must not import Dagster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, select

from ollama_pipeline.core.db.engine import read_connection
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.ids import MediaId

HASH_BUCKETS = 1024


@dataclass(frozen=True)
class Partitioning:
    """The grouping of one library: block size for integer ids, bucket count for text ids."""

    size: int = 1000
    buckets: int = HASH_BUCKETS

    def key_of(self, media_id: MediaId) -> str:
        """The partition key of one media id."""
        if isinstance(media_id, int) and not isinstance(media_id, bool) and media_id >= 1:
            start = (media_id - 1) // self.size * self.size + 1
            return f"{start}-{start + self.size - 1}"
        digest = hashlib.sha256(str(media_id).encode()).digest()
        return f"h{int.from_bytes(digest[:8], 'big') % self.buckets:04d}"

    def keys_of(self, media_ids: Iterable[MediaId]) -> list[str]:
        """The distinct partition keys of media ids, in the order of their first item (blocks ascending
        when the ids are)."""
        return list(dict.fromkeys(self.key_of(i) for i in media_ids))

    def group(self, media_ids: Iterable[MediaId]) -> dict[str, list[MediaId]]:
        """Partition key -> its media ids, in the given order."""
        out: dict[str, list[MediaId]] = {}
        for media_id in media_ids:
            out.setdefault(self.key_of(media_id), []).append(media_id)
        return out

    @staticmethod
    def block_range(key: str) -> tuple[int, int] | None:
        """(first id, last id) of a block key; None for a hash bucket. A malformed key is a typed error."""
        if key.startswith("h"):
            return None
        try:
            start, end = (int(part) for part in key.split("-", 1))
        except ValueError:
            raise ValidationError(f"partition key {key!r} is neither a block 'first-last' nor a bucket 'hNNNN'",
                                  code="validation.payload") from None
        return start, end

    def media_ids(self, engine: Engine, keys: Iterable[str], *, page: int = 10_000) -> Iterator[MediaId]:
        """The media ids of the given partitions, read from the library (blocks by id range, buckets by
        hashing the non-integer ids page by page)."""
        blocks: list[tuple[int, int]] = []
        buckets: set[str] = set()
        for key in dict.fromkeys(keys):
            span = self.block_range(key)
            if span is None:
                buckets.add(key)
            else:
                blocks.append(span)
        from ollama_pipeline.core.db.gallery import require_gallery

        media_id = require_gallery(engine)["media"].c("id")
        with read_connection(engine) as conn:
            for start, end in sorted(blocks):
                yield from conn.execute(select(media_id).where(media_id.between(start, end))
                                        .order_by(media_id)).scalars()
            if buckets:
                after = None
                while True:
                    q = select(media_id).order_by(media_id).limit(page)
                    if after is not None:
                        q = q.where(media_id > after)
                    chunk = conn.execute(q).scalars().all()
                    if not chunk:
                        break
                    after = chunk[-1]
                    yield from (i for i in chunk if not isinstance(i, int) and self.key_of(i) in buckets)


def partitioning_for(size: int) -> Partitioning:
    return Partitioning(size=size)
