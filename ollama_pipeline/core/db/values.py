"""How a stage's values are written into a gallery's `media_meta`: one readable mapping table per format.

The pipeline's own format (`json`) stores each `ollama.*` value as canonical JSON text of its stored schema
(`stages.stored`). LocalSupervisor's web UI reads other forms (`WWW/media_view.php`, `WWW/mediadb.php` and
`WWW/ollama.php` of github noliv3/LocalSupervisor): plain text for caption, title and description, JSON lists
of strings for tags, and a few panel keys that carry the same facts in its own shape (`ollama.quality.score`
0-100, `ollama.quality.flags`, `ollama.prompt_recon.*`, `ollama.prompt_eval.score`, `ollama.dupe_hints.top`,
`ollama.stage_version`). `LOCALSUPERVISOR_KEYS` below is that mapping: one stage output, each key written
once, from one table. The full values also stay in the pipeline's own table `ollama_values`, which the
export, report and web UI of this project read for galleries whose format is not `json`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ollama_pipeline.core.jsontext import canonical_json, loads_or_none
from ollama_pipeline.core.stages.base import PIPELINE_VERSION

STAGE_VERSION = f"ollama_pipeline.{PIPELINE_VERSION}"


def _plain(value: Any) -> Any:
    return value["text"]


def _names(value: Any) -> Any:
    return [t["name"] for t in value["tags"]]


def _same(value: Any) -> Any:
    return value


def _quality_score(value: Any) -> Any:
    return round(float(value["score"]) * 100)


def _quality_flags(value: Any) -> Any:
    return [i["kind"] for i in value["issues"]]


def _dupe_top(value: Any) -> Any:
    hints = [{"media_id": c["media_id"], "score": c["confidence"], "reason": f"{c['relation']}: {c['reason']}"}
             for c in value["candidates"] if c["relation"] != "different"]
    return hints or None  # written only where the duplicate stage has candidates


def _recon_prompt(value: Any) -> Any:
    return value["prompt"]


def _recon_negative(value: Any) -> Any:
    return value["negative_prompt"] or None


def _prompt_eval(value: Any) -> Any:
    if not value.get("has_prompt"):
        return None
    scale = value["scale"]
    span = float(scale["max"]) - float(scale["min"]) or 1.0
    return round((float(value["scores"]["prompt_adherence"]) - float(scale["min"])) / span * 100)


def _policy_contract(value: Any) -> Any:
    # DATA_CONTRACTS_OLLAMA.md §5: policy_flags = {publishable, needs_review, blocked_reason}
    outcome = value["outcome"]
    return {"publishable": outcome == "allow", "needs_review": outcome == "review",
            "blocked_reason": "; ".join(value["reasons"]) or "blocked" if outcome == "block" else None}


@dataclass(frozen=True)
class KeyRule:
    source_key: str  # the pipeline's key (stages.stored)
    gallery_key: str  # the key written into media_meta
    form: str  # what the UI reads, in words
    encode: Callable[[Any], Any]  # value -> str (written as is) or another value (written as JSON) or None (skip)


# The LocalSupervisor mapping table (see the module docstring for the files it was read from).
LOCALSUPERVISOR_KEYS: tuple[KeyRule, ...] = (
    KeyRule("ollama.caption", "ollama.caption", "plain text", _plain),
    KeyRule("ollama.description", "ollama.description", "plain text", _plain),
    KeyRule("ollama.title", "ollama.title", "plain text", _plain),
    KeyRule("ollama.tags_raw", "ollama.tags_raw", "JSON list of strings", _names),
    KeyRule("ollama.tags_normalized", "ollama.tags_normalized", "JSON list of strings", _names),
    KeyRule("ollama.quality", "ollama.quality", "JSON (score 0..1, verdict, issues, summary)", _same),
    KeyRule("ollama.quality", "ollama.quality.score", "integer 0-100 as text", _quality_score),
    KeyRule("ollama.quality", "ollama.quality.flags", "JSON list of strings (issue kinds)", _quality_flags),
    KeyRule("ollama.duplicate_assist", "ollama.duplicate_assist", "JSON (candidates, best, method)", _same),
    KeyRule("ollama.duplicate_assist", "ollama.dupe_hints.top", "JSON list of {media_id, score, reason}; only "
            "when there are candidates", _dupe_top),
    KeyRule("ollama.prompt_reconstruction", "ollama.prompt_reconstruction", "JSON (prompt, negative_prompt, "
            "similarity)", _same),
    KeyRule("ollama.prompt_reconstruction", "ollama.prompt_recon.prompt", "plain text", _recon_prompt),
    KeyRule("ollama.prompt_reconstruction", "ollama.prompt_recon.negative", "plain text", _recon_negative),
    KeyRule("ollama.scores", "ollama.scores", "JSON (scale, scores, overall)", _same),
    KeyRule("ollama.scores", "ollama.prompt_eval.score", "integer 0-100 as text (prompt adherence; only with "
            "a stored prompt)", _prompt_eval),
    KeyRule("ollama.policy_flags", "ollama.policy_flags", "JSON {publishable, needs_review, blocked_reason}",
            _policy_contract),
)
# Provenance in LocalSupervisor's form: ollama.model / ollama.version as JSON maps per job type (the seed's
# keys), ollama.last_run_at as ISO text of the newest run, ollama.stage_version as text.
LOCALSUPERVISOR_PROVENANCE = ("ollama.model", "ollama.version", "ollama.last_run_at", "ollama.stage_version")
# Keys of LocalSupervisor's panel this pipeline does not write, because no stage has those facts:
# ollama.caption.meta (contradictions, missing), ollama.domain.type/.confidence, ollama.prompt_recon.confidence,
# ollama.embed.*, ollama.nsfw.*.


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else canonical_json(value)


def encode_values(value_format: str, text_keys: frozenset[str], meta: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(pipeline key, gallery key, text) for every value of one stage output, in this gallery's format."""
    out: list[tuple[str, str, str]] = []
    if value_format == "localsupervisor":
        for rule in LOCALSUPERVISOR_KEYS:
            if rule.source_key in meta:
                encoded = rule.encode(meta[rule.source_key])
                if encoded is not None:
                    out.append((rule.source_key, rule.gallery_key, text_of(encoded)))
        return out
    for key, value in sorted(meta.items()):
        if key in text_keys and isinstance(value, dict) and isinstance(value.get("text"), str):
            out.append((key, key, value["text"]))
        else:
            out.append((key, key, canonical_json(value)))
    return out


def decode_text(text: str | None) -> Any:
    """A gallery value as a stage input: JSON when it parses, else the plain text."""
    if text is None:
        return None
    parsed = loads_or_none(text)
    return text if parsed is None and text.strip() not in ("null",) else parsed
