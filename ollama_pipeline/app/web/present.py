"""Turns stored `ollama.*` values into small view models the templates can show without guessing.

Each known key has a reader that accepts the documented shape (and the plausible variants: a bare
string instead of {"text": ...}, a list of names instead of tag objects, a 0..10 score scale) and returns
a view of one `kind`; anything it does not recognise falls back to the `generic` kind, which the templates
render recursively. No reader raises on odd data: the item page must render whatever a stage stored.
Nothing here touches the database or HTML; escaping is the templates' (autoescape) job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ollama_pipeline.core.stages import all_meta_keys

KNOWN_KEYS: tuple[str, ...] = (
    "ollama.caption", "ollama.title", "ollama.description", "ollama.tags_raw", "ollama.tags_normalized",
    "ollama.quality", "ollama.duplicate_assist", "ollama.prompt_reconstruction", "ollama.scores",
    "ollama.policy_flags", "ollama.model", "ollama.version", "ollama.last_run_at",
)  # fmt: skip


@dataclass(frozen=True)
class MetaView:
    """One `ollama.*` value, ready to render: `kind` picks the template block, `data` feeds it."""

    key: str
    kind: str
    data: Any
    raw: str
    present: bool

    @property
    def label(self) -> str:
        return self.key.removeprefix("ollama.").replace("_", " ")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def text_of(value: Any) -> str | None:
    """The text of a {"text": ...} value (or of a bare string); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("text", "caption", "title", "description", "value"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def _tag_items(value: Any) -> list[dict[str, Any]] | None:
    items = value
    if isinstance(value, dict):
        items = next((value[k] for k in ("tags", "items", "normalized", "raw") if isinstance(value.get(k), list)),
                     None)
    if not isinstance(items, list):
        return None
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            out.append({"name": item, "confidence": None, "weight": None, "extra": {}})
        elif isinstance(item, dict) and isinstance(item.get("name", item.get("tag")), str):
            name = item.get("name", item.get("tag"))
            extra = {k: v for k, v in item.items() if k not in ("name", "tag", "confidence", "weight")}
            out.append({"name": name, "confidence": _num(item.get("confidence")), "weight": _num(item.get("weight")),
                        "extra": extra})
        else:
            return None
    return out


def _quality(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or _num(value.get("score")) is None:
        return None
    score = _num(value.get("score")) or 0.0
    top = 1.0 if score <= 1.0 else (10.0 if score <= 10 else 100.0)
    issues = []
    for issue in value.get("issues") or []:
        if isinstance(issue, dict):
            issues.append({"name": str(issue.get("kind", issue.get("name", issue.get("issue", "?")))),
                           "severity": issue.get("severity"),
                           "extra": {k: v for k, v in issue.items() if k not in ("kind", "name", "issue", "severity")}})
        else:
            issues.append({"name": str(issue), "severity": None, "extra": {}})
    rest = {k: v for k, v in value.items() if k not in ("score", "verdict", "issues", "status")}
    return {"score": score, "max": top, "verdict": value.get("verdict", value.get("status")), "issues": issues,
            "rest": rest}


def _scores(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    scores = value.get("scores") if isinstance(value.get("scores"), dict) else value
    numbers = {str(k): _num(v) for k, v in scores.items() if _num(v) is not None}
    if not numbers:
        return None
    scale = value.get("scale") if isinstance(value.get("scale"), dict) else {}
    low = _num(scale.get("min"))
    high = _num(scale.get("max"))
    every = list(numbers.values()) + ([v] if (v := _num(value.get("overall"))) is not None else [])
    low = 0.0 if low is None else low
    if high is None or high <= low:
        high = 1.0 if max(every) <= 1.0 else (10.0 if max(every) <= 10 else 100.0)
    rows = [{"name": k, "value": v} for k, v in numbers.items() if k != "overall"]
    rest = {k: v for k, v in value.items() if k not in ("scores", "scale", "overall")} if scores is not value else {}
    return {"min": low, "max": high, "rows": rows, "overall": _num(value.get("overall")), "rest": rest}


def _policy(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    flags_in = value.get("flags", [])
    if not isinstance(flags_in, list):
        return None
    flags = []
    for flag in flags_in:
        if isinstance(flag, str):
            flags.append({"name": flag, "confidence": None, "source": None})
        elif isinstance(flag, dict):
            flags.append({"name": str(flag.get("name", "?")), "confidence": _num(flag.get("confidence")),
                          "source": flag.get("source")})
        else:
            return None
    rest = {k: v for k, v in value.items() if k not in ("flags", "nsfw_score", "outcome")}
    return {"flags": flags, "nsfw_score": _num(value.get("nsfw_score")), "outcome": value.get("outcome"),
            "rest": rest}


def _media_id_or_none(value: Any) -> Any:
    """A duplicate candidate's media id (an integer, or a text/UUID id of a text-id gallery), else None."""
    if isinstance(value, bool):
        return None
    return value if isinstance(value, int) or (isinstance(value, str) and value) else None


def _duplicates(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("candidates", []), list):
        return None
    candidates = []
    for cand in value.get("candidates", []):
        if isinstance(cand, dict):
            mid = cand.get("media_id")
            candidates.append({"media_id": _media_id_or_none(mid),
                               "fields": {k: v for k, v in cand.items() if k != "media_id"}})
        else:
            mid = _media_id_or_none(cand)
            candidates.append({"media_id": mid, "fields": {} if mid is not None else {"value": cand}})
    rest = {k: v for k, v in value.items() if k != "candidates"}
    return {"candidates": candidates, "rest": rest}


def _prompt(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        return {"prompt": value, "negative_prompt": None, "style": None, "similarity": None, "rest": {}}
    if not isinstance(value, dict) or not isinstance(value.get("prompt", ""), str):
        return None
    rest = {k: v for k, v in value.items() if k not in ("prompt", "negative_prompt", "style", "similarity")}
    similarity = value.get("similarity")
    if isinstance(similarity, dict):  # {"prompt": x, "negative_prompt": y, "method": ...}
        similarity = similarity.get("prompt")
    return {"prompt": value.get("prompt"), "negative_prompt": value.get("negative_prompt"),
            "style": value.get("style"), "similarity": _num(similarity), "rest": rest}


def _stage_map(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not all(not isinstance(v, dict | list) for v in value.values()):
        return None
    return {"rows": [{"stage": str(k), "value": v} for k, v in value.items()]}


def _text(value: Any) -> dict[str, Any] | None:
    text = text_of(value)
    if text is None:
        return None
    rest = {k: v for k, v in value.items() if k != "text"} if isinstance(value, dict) and "text" in value else {}
    return {"text": text, "rest": rest}


_READERS: dict[str, tuple[str, Any]] = {
    "ollama.caption": ("text", _text), "ollama.title": ("text", _text), "ollama.description": ("text", _text),
    "ollama.tags_raw": ("tags", _tag_items), "ollama.tags_normalized": ("tags", _tag_items),
    "ollama.quality": ("quality", _quality), "ollama.scores": ("scores", _scores),
    "ollama.policy_flags": ("policy", _policy), "ollama.duplicate_assist": ("duplicates", _duplicates),
    "ollama.prompt_reconstruction": ("prompt", _prompt), "ollama.model": ("stage_map", _stage_map),
    "ollama.version": ("stage_map", _stage_map), "ollama.last_run_at": ("stage_map", _stage_map),
}  # fmt: skip


def pretty_json(value: Any) -> str:
    """Indented JSON text for the 'raw value' boxes (non-JSON values shown with repr)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def view_of(key: str, value: Any, present: bool = True) -> MetaView:
    """The view of one stored value; unknown keys and unexpected shapes get the generic view."""
    raw = pretty_json(value) if present else ""
    if not present:
        return MetaView(key=key, kind="missing", data=None, raw=raw, present=False)
    kind, reader = _READERS.get(key, ("generic", None))
    data = None
    if reader is not None:
        try:
            data = reader(value)
        except (TypeError, ValueError, AttributeError, KeyError):
            data = None
    if data is None:
        return MetaView(key=key, kind="generic", data=value, raw=raw, present=True)
    return MetaView(key=key, kind=kind, data=data, raw=raw, present=True)


def meta_views(meta: dict[str, Any]) -> list[MetaView]:
    """Every known `ollama.*` key in a fixed order (missing ones marked), then any other stored ollama.* key."""
    keys = list(KNOWN_KEYS)
    keys += [k for k in all_meta_keys() if k not in keys]
    keys += sorted(k for k in meta if k.startswith("ollama.") and k not in keys)
    return [view_of(k, meta.get(k), k in meta) for k in keys]


def card_values(meta: dict[str, Any], quality_status: str | None) -> dict[str, Any]:
    """Title, caption, quality and policy outcome of a gallery card, whatever shape the values have."""
    quality = meta.get("ollama.quality")
    policy = meta.get("ollama.policy_flags")
    verdict = quality.get("verdict") if isinstance(quality, dict) else None
    outcome = policy.get("outcome") if isinstance(policy, dict) else None
    return {
        "title": text_of(meta.get("ollama.title")),
        "caption": text_of(meta.get("ollama.caption")),
        "quality": quality_status or (verdict if isinstance(verdict, str) else None),
        "policy": outcome if isinstance(outcome, str) else None,
    }
