"""Stage `ollama_duplicate_assist` (vision): cheap candidates first, then the model compares each pair.

Candidates of an item are other media items with the same generation seed and prompt, or whose 64-bit
dHash (computed by the `media` asset into `ollama_media_index`) is within `DHASH_THRESHOLD` bits; the
closest `pipeline.duplicate_candidates` of them are sent to the model, one request per pair with both
images, asking duplicate / variant / different with a confidence. An item without candidates costs no
model call and stores an empty candidate list.

`ollama.duplicate_assist` = {"candidates": [{media_id, relation, confidence, reason, found_by,
dhash_distance}], "best": the most confident duplicate/variant or null, "checked": n, "method": {...}}.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.errors import OllamaPipelineError
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
    """The library-wide arrays the cheap search runs over (numpy: one XOR + popcount per item)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.ids = np.array([r["media_id"] for r in rows], dtype=np.int64)
        self.paths = {r["media_id"]: r["path"] for r in rows}
        hashes = [int(r["dhash"], 16) if r["dhash"] else 0 for r in rows]
        self.has_hash = np.array([bool(r["dhash"]) for r in rows], dtype=bool)
        self.hashes = np.array(hashes, dtype=np.uint64)
        self.by_generation: dict[tuple[int, str], list[int]] = {}
        for r in rows:
            if r["seed"] is not None and r["prompt"]:
                self.by_generation.setdefault((int(r["seed"]), r["prompt"].strip()), []).append(r["media_id"])
        self.hash_of = {r["media_id"]: r["dhash"] for r in rows}
        self.generation_of = {r["media_id"]: (int(r["seed"]), r["prompt"].strip()) for r in rows
                              if r["seed"] is not None and r["prompt"]}

    def candidates(self, media_id: int, limit: int) -> list[DuplicateCandidate]:
        found: dict[int, DuplicateCandidate] = {}
        own_hash = self.hash_of.get(media_id)
        distances: dict[int, int] = {}
        if own_hash and len(self.ids):
            xor = np.bitwise_xor(self.hashes, np.uint64(int(own_hash, 16)))
            dist = np.bitwise_count(xor)
            near = np.nonzero(self.has_hash & (dist <= DHASH_THRESHOLD) & (self.ids != media_id))[0]
            for i in near:
                other = int(self.ids[i])
                distances[other] = int(dist[i])
                found[other] = DuplicateCandidate(media_id=other, path=self.paths[other], found_by=["dhash"],
                                                  distance=int(dist[i]))
        generation = self.generation_of.get(media_id)
        for other in self.by_generation.get(generation, []) if generation else []:
            if other == media_id:
                continue
            if other in found:
                found[other].found_by.append("seed_prompt")
            else:
                other_hash = self.hash_of.get(other)
                distance = bin(int(own_hash, 16) ^ int(other_hash, 16)).count("1") if own_hash and other_hash else None
                found[other] = DuplicateCandidate(media_id=other, path=self.paths[other], found_by=["seed_prompt"],
                                                  distance=distance)
        ranked = sorted(found.values(), key=lambda c: (-len(c.found_by), 65 if c.distance is None else c.distance,
                                                       c.media_id))
        return ranked[:limit]


def _universe(pipeline: Any) -> _Universe:
    from ollama_pipeline.core.db import repository

    cached = pipeline._cache.get("duplicate_universe")
    if cached is None or time.monotonic() - cached[0] > UNIVERSE_TTL_S:
        cached = (time.monotonic(), _Universe(repository.duplicate_universe(pipeline.engine)))
        pipeline._cache["duplicate_universe"] = cached
    return cached[1]


def _file_present(media_root: Path, path: str) -> bool:
    try:
        return resolve_media_path(media_root, path).is_file()
    except OllamaPipelineError:
        return False


def enrich_duplicates(pipeline: Any, inputs: dict[int, StageInputs]) -> None:
    """The closest candidates of each item; a candidate whose file is gone (deleted since it was indexed,
    or outside the media root) cannot be compared and is passed over, so the item does not fail for it."""
    universe = _universe(pipeline)
    limit = pipeline.settings.pipeline.duplicate_candidates
    root = pipeline.settings.media_root
    for media_id, item in inputs.items():
        if not limit:
            item.duplicate_candidates = []
            continue
        found = universe.candidates(media_id, limit * 2)
        item.duplicate_candidates = [c for c in found if _file_present(root, c.path)][:limit]


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
    best = max(related, key=lambda r: (r["relation"] == "duplicate", r["confidence"], -r["media_id"]),
               default=None)
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
    prompt_version="duplicates-v2",
    template=PAIR_TEMPLATE,
    output_schema=PairAnswer,
    writes=("ollama.duplicate_assist",),
    plan=plan_duplicates,
    combine=combine_duplicates,
    enrich=enrich_duplicates,
    group="ollama_judge",
)
