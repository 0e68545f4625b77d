"""Stage `ollama_duplicate_assist` (vision): cheap candidates first, then the model compares each pair.

Candidates of an item are other media items with the same generation seed and prompt, or whose 64-bit
dHash (computed by the `media` asset into `ollama_media_index`) is within `DHASH_THRESHOLD` bits; the
closest `pipeline.duplicate_candidates` of them are sent to the model, one request per pair with both
images, asking duplicate / variant / different with a confidence. An item without candidates costs no
model call and stores an empty candidate list.

`ollama.duplicate_assist` = {"candidates": [{media_id, relation, confidence, reason, found_by,
dhash_distance}], "best": the most confident duplicate/variant or null, "checked": n, "method": {...}}.
A candidate's `media_id` has the gallery's id type: an integer, or a string for text and UUID ids
(prompt version duplicates-v3, export format v2; docs/export_format.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.errors import OllamaPipelineError
from ollama_pipeline.core.ids import MediaId
from ollama_pipeline.core.images import resolve_media_path
from ollama_pipeline.core.stages.base import (
    DuplicateCandidate,
    ImageRef,
    ModelRequest,
    Stage,
    StageInputs,
    StageOutput,
    round3,
    vision_prompt,
)

DHASH_THRESHOLD = 10  # of 64 bits: near-identical crops, re-encodes and small edits
UNIVERSE_TTL_S = 30.0  # how long one process reuses the library-wide candidate index


class PairAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    relation: Literal["duplicate", "variant", "different"] = Field(
        description="duplicate = the same image (maybe resized/re-encoded), variant = same scene or "
        "generation with changes, different = unrelated images.")
    confidence: float = Field(ge=0.0, le=1.0, description="How sure you are (0..1).")
    reason: str = Field(min_length=1, max_length=200, description="A short reason.")


PAIR_TEMPLATE = """You see two images from a media library: the first is the item, the second a candidate that
a cheap similarity search found. Are they the same image (duplicate), variants of one scene or generation
(variant), or different? Return JSON with "relation", "confidence" (0..1) and "reason" (a few words).
Search facts:
{facts}"""


class _Universe:
    """The dHash index the cheap search runs over, held compactly: the id and 64-bit dHash of every indexed
    item (16 bytes per item, read page by page from ollama_media_index) and nothing else; paths and
    generations are asked of the database per batch, by primary key. numpy: one XOR + popcount per item."""

    def __init__(self, pages: Iterable[list[tuple[Any, str]]]) -> None:
        ids: list[Any] = []
        hashes: list[np.ndarray] = []
        for rows in pages:
            ids.extend(r[0] for r in rows)
            hashes.append(np.fromiter((int(r[1], 16) for r in rows), dtype=np.uint64, count=len(rows)))
        integer = all(isinstance(i, int) for i in ids)
        self.ids: Any = np.array(ids, dtype=np.int64) if integer else ids
        self.hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)

    def near(self, media_id: Any, own_hash: str) -> dict[Any, int]:
        """The indexed items within DHASH_THRESHOLD bits of own_hash (not media_id itself): id -> distance."""
        if not len(self.hashes):
            return {}
        dist = np.bitwise_count(np.bitwise_xor(self.hashes, np.uint64(int(own_hash, 16))))
        out = {}
        for i in np.nonzero(dist <= DHASH_THRESHOLD)[0]:
            other = self.ids[int(i)]
            other = int(other) if isinstance(other, np.integer) else other
            if other != media_id:
                out[other] = int(dist[i])
        return out


def _index_stamp(engine: Any) -> tuple[Any, ...]:
    """Rows and newest change of ollama_media_index: differs as soon as the media asset indexed a file."""
    from sqlalchemy import func, select

    from ollama_pipeline.core.db.models import OllamaMediaIndex

    with engine.connect() as conn:
        return tuple(conn.execute(select(func.count(), func.max(OllamaMediaIndex.updated_at))).one())


def _universe(pipeline: Any) -> _Universe:
    """The candidate index, reused by one process for UNIVERSE_TTL_S while the media index is unchanged
    (a run right after another one in the same process sees the files its own media asset indexed)."""
    from ollama_pipeline.core.db import repository

    stamp = _index_stamp(pipeline.engine)
    cached = pipeline._cache.get("duplicate_universe")
    if cached is None or time.monotonic() - cached[0] > UNIVERSE_TTL_S or cached[2] != stamp:
        cached = (time.monotonic(), _Universe(repository.iter_dhash_pages(pipeline.engine)), stamp)
        pipeline._cache["duplicate_universe"] = cached
    return cached[1]


def _file_present(media_root: Path, path: str) -> bool:
    try:
        return resolve_media_path(media_root, path).is_file()
    except OllamaPipelineError:
        return False


def batch_candidates(pipeline: Any, media_ids: list[Any], limit: int) -> dict[Any, list[DuplicateCandidate]]:
    """The closest `limit` candidates of each item of a batch, ranked (found by both searches first, then by
    distance, then id), each with its path (an item gone from the gallery is no candidate)."""
    from ollama_pipeline.core.db import repository

    engine = pipeline.engine
    universe = _universe(pipeline)
    own = repository.dhashes_of(engine, media_ids)  # fresh: the media asset may just have indexed them
    peers = repository.generation_peers(engine, media_ids)
    found: dict[Any, dict[Any, tuple[list[str], int | None]]] = {}
    peer_hashes = repository.dhashes_of(engine, {o for others in peers.values() for o in others})
    for media_id in media_ids:
        mine: dict[Any, tuple[list[str], int | None]] = {}
        own_hash = own.get(media_id)
        if own_hash:
            for other, distance in universe.near(media_id, own_hash).items():
                mine[other] = (["dhash"], distance)
        for other in peers.get(media_id, []):
            if other in mine:
                mine[other][0].append("seed_prompt")
            else:
                other_hash = peer_hashes.get(other)
                distance = (bin(int(own_hash, 16) ^ int(other_hash, 16)).count("1")
                            if own_hash and other_hash else None)
                mine[other] = (["seed_prompt"], distance)
        ranked = sorted(mine.items(), key=lambda kv: (-len(kv[1][0]), 65 if kv[1][1] is None else kv[1][1],
                                                      str(kv[0]) if not isinstance(kv[0], int) else kv[0]))
        found[media_id] = dict(ranked[:limit])
    paths = repository.media_paths(engine, {o for mine in found.values() for o in mine})
    return {media_id: [DuplicateCandidate(media_id=o, path=paths[o], found_by=by, distance=d)
                       for o, (by, d) in mine.items() if o in paths]
            for media_id, mine in found.items()}


def enrich_duplicates(pipeline: Any, inputs: dict[MediaId, StageInputs]) -> None:
    """The closest candidates of each item; a candidate whose file is gone (deleted since it was indexed,
    or outside the media root) cannot be compared and is passed over, so the item does not fail for it."""
    limit = pipeline.settings.pipeline.duplicate_candidates
    root = pipeline.settings.media_root
    if not limit:
        for item in inputs.values():
            item.duplicate_candidates = []
        return
    found = batch_candidates(pipeline, list(inputs), limit * 2)
    for media_id, item in inputs.items():
        item.duplicate_candidates = [c for c in found.get(media_id, []) if _file_present(root, c.path)][:limit]


def plan_duplicates(stage: Stage, inputs: StageInputs) -> list[ModelRequest]:
    me = ImageRef(inputs.media.id, inputs.media.path)
    requests = []
    for cand in inputs.duplicate_candidates:
        facts = {"found_by": cand.found_by, "dhash_distance_bits": cand.distance, "dhash_bits": 64}
        requests.append(ModelRequest(prompt=vision_prompt(stage, inputs, facts=facts),
                                     images=(me, ImageRef(cand.media_id, cand.path)), key=str(cand.media_id)))
    return requests


def combine_duplicates(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    rows = []
    for cand in inputs.duplicate_candidates:
        answer = answers[str(cand.media_id)]
        assert isinstance(answer, PairAnswer)
        rows.append({"media_id": cand.media_id, "relation": answer.relation,
                     "confidence": round3(answer.confidence), "reason": answer.reason.strip(),
                     "found_by": sorted(cand.found_by), "dhash_distance": cand.distance})
    rows.sort(key=lambda r: r["media_id"])
    related = [r for r in rows if r["relation"] != "different"]
    # ties: the lowest id wins (max keeps the first of the rows, which are in ascending id order)
    best = max(related, key=lambda r: (r["relation"] == "duplicate", r["confidence"]), default=None)
    value = {"candidates": rows, "best": None if best is None else {k: best[k] for k in
                                                                       ("media_id", "relation", "confidence")},
             "checked": len(rows),
             "method": {"dhash_threshold_bits": DHASH_THRESHOLD, "same_seed_and_prompt": True}}
    return StageOutput(meta={"ollama.duplicate_assist": value})


DUPLICATES = Stage(
    job_type="ollama_duplicate_assist",
    title="Duplicate assist",
    description="Near-duplicate candidates found cheaply (perceptual hash within 10 bits, same generation "
    "seed and prompt), each pair then compared by the vision model (two images in one request): "
    "duplicate / variant / different with confidence. No candidates, no model call.",
    model_kind="vision",
    inputs=("image", "prompt"),
    prompt_version="duplicates-v3",  # v3: candidate media_id is the gallery's id (integer, or text/UUID string)
    template=PAIR_TEMPLATE,
    output_schema=PairAnswer,
    writes=("ollama.duplicate_assist",),
    plan=plan_duplicates,
    combine=combine_duplicates,
    enrich=enrich_duplicates,
    group="ollama_judge",
)
