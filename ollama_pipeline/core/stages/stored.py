"""Schemas of the values stored in `media_meta` (§2): one pydantic model per `ollama.*` key.

A stage's combine step builds its values, the runner validates them against these models before anything
is written, the `<stage>_schema_valid` asset checks validate what is stored, and the export feed documents
them (`ollama-pipeline docs` renders their JSON Schemas).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from ollama_pipeline.core.ids import MediaId


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextValue(_Value):
    """`ollama.caption`, `ollama.description`, `ollama.title`."""

    text: str = Field(min_length=1)


class RawTag(_Value):
    name: str
    confidence: float = Field(ge=0, le=1)


class TagsRawValue(_Value):
    """`ollama.tags_raw`: the tags as the model said them, in its order."""

    tags: list[RawTag]


class NormalizedTag(_Value):
    name: str = Field(min_length=2, pattern=r"^[a-z0-9][a-z0-9 \-]*$")
    confidence: float = Field(ge=0, le=1)
    weight: float = Field(ge=0, le=1)
    in_vocabulary: bool = Field(description="The library already used this tag (people or imports).")
    from_: list[str] = Field(alias="from", description="The raw names merged into this tag.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TagsNormalizedValue(_Value):
    """`ollama.tags_normalized`: lower case, singular, synonyms mapped, deduplicated, best first, capped."""

    tags: list[NormalizedTag]
    max_tags: int = Field(ge=1)
    normalizer: str


class QualityIssueValue(_Value):
    kind: str
    severity: float = Field(ge=0, le=1)


class QualityValue(_Value):
    """`ollama.quality`."""

    score: float = Field(ge=0, le=1)
    verdict: Literal["ok", "needs_review", "rejected"]
    issues: list[QualityIssueValue]
    summary: str


class DuplicateCandidateValue(_Value):
    media_id: MediaId = Field(description="The candidate's media id: an integer, or a string for a gallery "
                              "with text or UUID ids (since duplicates-v3; export format v2).")
    relation: Literal["duplicate", "variant", "different"]
    confidence: float = Field(ge=0, le=1)
    reason: str
    found_by: list[Literal["dhash", "seed_prompt"]]
    dhash_distance: int | None = Field(ge=0, le=64)


class DuplicateBest(_Value):
    media_id: MediaId
    relation: Literal["duplicate", "variant"]
    confidence: float = Field(ge=0, le=1)


class DuplicateMethod(_Value):
    dhash_threshold_bits: int
    same_seed_and_prompt: bool


class DuplicateAssistValue(_Value):
    """`ollama.duplicate_assist`: an empty candidate list means the cheap search found nothing."""

    candidates: list[DuplicateCandidateValue]
    best: DuplicateBest | None
    checked: int = Field(ge=0)
    method: DuplicateMethod


class Similarity(_Value):
    prompt: float | None = Field(ge=0, le=1)
    negative_prompt: float | None = Field(ge=0, le=1)
    method: Literal["token_jaccard"]


class PromptReconstructionValue(_Value):
    """`ollama.prompt_reconstruction`."""

    prompt: str = Field(min_length=1)
    negative_prompt: str
    similarity: Similarity
    stored_prompt: bool
    generator: str | None


class Scale(_Value):
    min: float
    max: float


class ScoresValue(_Value):
    """`ollama.scores`: named scores on the stated scale, and their mean."""

    scale: Scale
    scores: dict[Literal["aesthetic", "technical", "prompt_adherence", "originality"], float]
    overall: float
    has_prompt: bool


class PolicyFlagValue(_Value):
    name: str
    confidence: float = Field(ge=0, le=1)
    source: Literal["model", "scan"]


class PolicyFlagsValue(_Value):
    """`ollama.policy_flags`: model and scanner flags, the combined NSFW score and the outcome."""

    flags: list[PolicyFlagValue]
    nsfw_score: float = Field(ge=0, le=1)
    model_nsfw_score: float = Field(ge=0, le=1)
    scan_nsfw_score: float | None = Field(ge=0, le=1)
    rating: Literal["safe", "questionable", "explicit"]
    outcome: Literal["allow", "review", "block"]
    reasons: list[str]


class StageMap(RootModel[dict[str, str]]):
    """`ollama.model`, `ollama.version`, `ollama.last_run_at`: one entry per stage (job type) that ran."""


STORED_SCHEMAS: dict[str, type[BaseModel]] = {
    "ollama.caption": TextValue,
    "ollama.description": TextValue,
    "ollama.title": TextValue,
    "ollama.tags_raw": TagsRawValue,
    "ollama.tags_normalized": TagsNormalizedValue,
    "ollama.quality": QualityValue,
    "ollama.duplicate_assist": DuplicateAssistValue,
    "ollama.prompt_reconstruction": PromptReconstructionValue,
    "ollama.scores": ScoresValue,
    "ollama.policy_flags": PolicyFlagsValue,
    "ollama.model": StageMap,
    "ollama.version": StageMap,
    "ollama.last_run_at": StageMap,
}
