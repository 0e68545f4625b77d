"""Stage `ollama_tags_normalize` (vision): tags from the image, normalized onto the library's vocabulary.

The model's answer is kept as it was said (`ollama.tags_raw`). `ollama.tags_normalized` is the pipeline's
work on it: lower case, punctuation folded, singular, synonyms mapped to one canonical word, and that word
replaced by the library's own spelling when the library already uses a synonym of it; digits-only and
empty tags dropped, duplicates merged (highest confidence wins), sorted by confidence, capped at
`pipeline.max_tags`. With `pipeline.write_tags` the normalized tags also go to `tags` + `media_tags`
(source `ollama`; locked and human links are never touched, see `repository.persist_result`).

The vocabulary is the set of tags people or imports use (a tag linked only by ollama is not vocabulary),
so the pipeline's own writes never change what the next run maps onto: re-runs converge.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.stages.base import (
    Stage,
    StageInputs,
    StageOutput,
    TagSuggestion,
    round3,
    single_request,
)


class TagAnswerItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=60, description="One tag: a noun or short noun phrase.")
    confidence: float = Field(ge=0.0, le=1.0, description="How sure you are that the tag applies (0..1).")


class TagsAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[TagAnswerItem] = Field(min_length=1, max_length=40, description="Tags for the image.")


TAGS_TEMPLATE = """List tags for this image for a media library's tag search.
Return JSON with "tags": a list of objects with "name" (a lower-case noun or short noun phrase: subject,
setting, style, medium, lighting, mood) and "confidence" (0..1). At most 25 tags, most important first.
Tags people already gave this image (keep the ones that fit, add what is missing):
{tags}
Generation prompt (context only):
{prompt}"""

# Synonym groups: the first word is the canonical form. Extend here; the prompt version needs no change
# (normalization runs after the model), but stored values change, so bump NORMALIZE_VERSION.
NORMALIZE_VERSION = "norm-v1"
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("cat", "kitty", "kitten", "feline"),
    ("dog", "puppy", "doggy", "hound", "canine"),
    ("car", "automobile", "auto", "motorcar"),
    ("ocean", "sea"),
    ("woman", "lady", "female"),
    ("man", "gentleman", "male"),
    ("photorealistic", "photo realistic", "realistic photo", "photoreal"),
    ("sci-fi", "science fiction", "scifi", "sci fi"),
    ("3d render", "3d rendering", "cgi"),
    ("night", "nighttime", "night time"),
    ("sunset", "dusk"),
    ("sunrise", "dawn"),
    ("flower", "blossom", "bloom"),
    ("city", "cityscape", "urban"),
    ("mountain", "mountains range", "peak"),
    ("fog", "mist", "haze"),
    ("forest", "woods", "woodland"),
    ("box", "crate"),
)
_CANONICAL: dict[str, str] = {word: group[0] for group in SYNONYMS for word in group}
_GROUP: dict[str, tuple[str, ...]] = {group[0]: group for group in SYNONYMS}

_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "leaves": "leaf", "wolves": "wolf",
              "knives": "knife", "lives": "life", "shelves": "shelf", "calves": "calf", "halves": "half",
              "elves": "elf", "dwarves": "dwarf", "oxen": "ox", "cacti": "cactus", "fungi": "fungus"}
_INVARIANT = {"glass", "grass", "dress", "moss", "chess", "boss", "bass", "canvas", "lens", "series",
              "species", "news", "physics", "mathematics", "pants", "jeans", "clothes", "scissors", "sheep",
              "fish", "deer", "aircraft", "anime", "bus", "gas", "iris", "cosmos", "chaos", "atlas",
              "octopus", "cactus", "walrus", "virus", "bonus", "campus", "status", "always", "sunglasses",
              "glasses", "headphones", "stairs", "ruins", "this", "its", "is", "was", "has", "his", "hers"}


def singular(word: str) -> str:
    """English singular of one word (rules plus exceptions; good enough for tags)."""
    if word in _INVARIANT or len(word) <= 3 or not word.isalpha():
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("sses", "shes", "ches", "xes", "zes"):
        if word.endswith(suffix):
            return word[:-2]
    if word.endswith("oes") and len(word) > 4:
        return word[:-2]
    if word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("s"):
        return word[:-1]
    return word


_PUNCT = re.compile(r"[^\w\s-]+")
_SPACE = re.compile(r"[\s_]+")


def canonical_name(raw: str) -> str:
    """Lower case, punctuation folded, singular (last word of a phrase), synonyms to the canonical word."""
    text = _SPACE.sub(" ", _PUNCT.sub(" ", raw.lower())).strip(" -")
    if not text:
        return ""
    if text in _CANONICAL:
        return _CANONICAL[text]
    words = text.split(" ")
    words[-1] = singular(words[-1])
    text = " ".join(words)
    return _CANONICAL.get(text, text)


def library_spelling(name: str, vocabulary: set[str]) -> str:
    """The library's own word for a canonical tag: itself if used, else a used synonym, else itself."""
    if name in vocabulary:
        return name
    for synonym in sorted(_GROUP.get(name, ())):
        if synonym in vocabulary:
            return synonym
    return name


def normalize_tags(raw: list[tuple[str, float]], vocabulary: set[str], max_tags: int) -> list[dict[str, Any]]:
    """The normalized tag list: [{name, confidence, weight, from: [raw names]}], best first, capped."""
    merged: dict[str, dict[str, Any]] = {}
    for name, confidence in raw:
        canon = canonical_name(name)
        if not canon or canon.replace(" ", "").replace("-", "").isdigit() or len(canon) < 2:
            continue
        final = library_spelling(canon, vocabulary)
        entry = merged.setdefault(final, {"name": final, "confidence": 0.0, "from": []})
        entry["confidence"] = max(entry["confidence"], round3(confidence))
        if name not in entry["from"]:
            entry["from"].append(name)
    ordered = sorted(merged.values(), key=lambda e: (-e["confidence"], e["name"]))[:max_tags]
    for entry in ordered:
        entry["weight"] = entry["confidence"]
        entry["in_vocabulary"] = entry["name"] in vocabulary
        entry["from"] = sorted(entry["from"])
    return ordered


VOCABULARY_TTL_S = 30.0  # how long one process reuses the vocabulary between chunks of a run


def enrich_tags(pipeline: Any, inputs: dict[int, StageInputs]) -> None:
    from ollama_pipeline.core.db import repository

    cached = pipeline._cache.get("tag_vocabulary")
    if cached is None or time.monotonic() - cached[0] > VOCABULARY_TTL_S:
        cached = (time.monotonic(), repository.tag_vocabulary(pipeline.engine, exclude_source="ollama"))
        pipeline._cache["tag_vocabulary"] = cached
    vocabulary = cached[1]
    for item in inputs.values():
        item.vocabulary = vocabulary
        item.max_tags = pipeline.settings.pipeline.max_tags


def plan_tags(stage: Stage, inputs: StageInputs) -> list:
    # Only tags people or imports gave: ollama's own earlier tags would change the prompt (and the
    # fingerprint) after every run, and re-runs would never converge.
    given = sorted(t.name for t in inputs.tags if t.source != "ollama")
    p = inputs.prompt
    return single_request(stage, inputs, tags=given, prompt=p.prompt if p else None)


def combine_tags(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, TagsAnswer)
    return _tags_output([(t.name.strip(), t.confidence) for t in answer.tags], inputs)


def refresh_tags(stage: Stage, inputs: StageInputs) -> StageOutput | None:
    """The stored raw tags normalized again onto today's vocabulary, when that changes the result (a
    person added or removed a tag elsewhere); None when it does not. No model call either way."""
    raw_value = inputs.meta.get("ollama.tags_raw")
    stored = inputs.meta.get("ollama.tags_normalized")
    if not isinstance(raw_value, dict) or not isinstance(stored, dict):
        return None
    try:
        raw = [(str(t["name"]), float(t["confidence"])) for t in raw_value.get("tags", [])]
    except (KeyError, TypeError, ValueError):
        return None
    output = _tags_output(raw, inputs)
    return None if output.meta["ollama.tags_normalized"] == stored else output


def _tags_output(raw: list[tuple[str, float]], inputs: StageInputs) -> StageOutput:
    normalized = normalize_tags(raw, set(inputs.vocabulary), inputs.max_tags)
    return StageOutput(
        meta={
            "ollama.tags_raw": {"tags": [{"name": n, "confidence": round3(c)} for n, c in raw]},
            "ollama.tags_normalized": {"tags": normalized, "max_tags": inputs.max_tags,
                                       "normalizer": NORMALIZE_VERSION},
        },
        tags=[TagSuggestion(name=t["name"], confidence=t["confidence"], weight=t["weight"]) for t in normalized],
    )


TAGS = Stage(
    job_type="ollama_tags_normalize",
    title="Tags",
    description="Tags the vision model sees in the image (`ollama.tags_raw`), normalized (lower case, "
    "singular, synonyms mapped onto the library's vocabulary, deduplicated, capped) into "
    "`ollama.tags_normalized` and, with `pipeline.write_tags`, into tags/media_tags (source ollama; "
    "locked and human tags are never changed).",
    model_kind="vision",
    inputs=("image", "prompt", "tags"),
    prompt_version=f"tags-v2.{NORMALIZE_VERSION}",
    template=TAGS_TEMPLATE,
    output_schema=TagsAnswer,
    writes=("ollama.tags_raw", "ollama.tags_normalized"),
    writes_tables=("tags", "media_tags"),
    plan=plan_tags,
    combine=combine_tags,
    enrich=enrich_tags,
    refresh=refresh_tags,
    fingerprint_extra=lambda inputs: {"max_tags": inputs.max_tags},
    group="ollama_describe",
)
