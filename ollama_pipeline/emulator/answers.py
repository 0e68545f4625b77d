"""Deterministic answers: JSON that conforms to a JSON schema, derived from a hash of the request.

The same request (model, prompt, images, format, seed) always gives the same bytes; different prompts or
images give different content. Standard library only; must not import the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

from ollama_pipeline.emulator.gullible import injected_payload
from ollama_pipeline.emulator.profiles import LENGTH_SIGMA, PROSE, AnswerKind, answer_kind

SUBJECTS = ["a red fox", "a lighthouse", "a cyberpunk city street", "a mountain lake", "a sleeping cat",
            "an old sailing ship", "a robot gardener", "a dragon over a castle", "a field of sunflowers",
            "a woman in a raincoat", "a neon diner", "a snowy forest", "a vintage car", "an astronaut",
            "a koi pond", "a desert caravan", "a waterfall", "a jazz musician", "a glass greenhouse",
            "a market at dusk"]
STYLES = ["in watercolor", "as a photorealistic render", "in anime style", "as an oil painting",
          "in soft pastel tones", "with dramatic lighting", "in a minimalist style", "as a pencil sketch"]
COLOURS = ["warm orange", "deep blue", "emerald green", "muted grey", "golden", "violet", "crimson", "teal"]
MOODS = ["calm", "mysterious", "joyful", "melancholic", "energetic", "dreamy"]
NEGATIVE = ["blurry", "lowres", "bad anatomy", "extra fingers", "watermark", "jpeg artifacts", "text",
            "deformed", "oversaturated", "cropped", "worst quality", "signature"]
PROMPT_WORDS = ["masterpiece", "best quality", "highly detailed", "8k", "sharp focus", "cinematic lighting",
                "volumetric light", "depth of field", "intricate details", "trending on artstation", "soft shadows",
                "wide angle", "bokeh", "golden hour", "concept art", "ultra realistic"]
WORDS = ["portrait", "landscape", "cat", "cats", "sunset", "forest", "city", "night", "mountain", "ocean",
         "flower", "dragon", "robot", "anime", "photorealistic", "watercolor", "car", "woman", "kitty",
         "Automobile", "sea", "boxes", "neon", "castle", "snow", "river", "sky", "light"]


class Rng:
    """A tiny deterministic generator over sha256 blocks."""

    def __init__(self, seed: str, override: str | None = None) -> None:
        self._seed = seed.encode()
        self._counter = 0
        self.override = override  # a gullible model's injected word: every free-text field says it

    def _next(self) -> int:
        self._counter += 1
        return int.from_bytes(hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()[:8], "big")

    def random(self) -> float:
        return self._next() / 2**64

    def choice(self, items: list[Any]) -> Any:
        return items[self._next() % len(items)]

    def randint(self, lo: int, hi: int) -> int:
        return lo + self._next() % (hi - lo + 1)


def sentence(rng: Rng) -> str:
    return (f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(STYLES)}, with {rng.choice(COLOURS)} light "
            f"and a {rng.choice(MOODS)} mood.")


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            node = node.get(part, {})
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _string(name: str, schema: dict[str, Any], rng: Rng) -> str:
    lname = name.lower()
    if rng.override:
        text = rng.override
    elif "title" in lname:
        text = f"{rng.choice(MOODS).capitalize()} {rng.choice(SUBJECTS).split(' ', 1)[1]}"
    elif "tag" in lname or lname in ("name", "label"):
        text = rng.choice(WORDS)
    elif "negative" in lname:
        text = ", ".join(rng.choice(NEGATIVE) for _ in range(3))
    elif "prompt" in lname:
        text = f"{rng.choice(SUBJECTS)}, {rng.choice(STYLES)}, {rng.choice(COLOURS)}, masterpiece, best quality"
    elif "reason" in lname:
        text = f"{rng.choice(MOODS)} composition, {rng.choice(COLOURS)} palette"
    elif "description" in lname:
        text = " ".join(sentence(rng) for _ in range(3))
    else:
        text = sentence(rng)
    min_len = int(schema.get("minLength", 0))
    while len(text) < min_len:
        text += " " + sentence(rng)
    if "maxLength" in schema:
        text = text[: int(schema["maxLength"])].rstrip() or text[:1]
    return text


def _number(schema: dict[str, Any], rng: Rng, integer: bool) -> int | float:
    lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
    hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 1 if lo >= 1 else 1))
    if integer:
        return rng.randint(int(lo), int(max(lo, hi)))
    value = lo + (hi - lo) * rng.random()
    if "exclusiveMaximum" in schema and value >= hi:
        value = hi - 1e-3
    return round(value, 3)


def generate(schema: dict[str, Any], rng: Rng, root: dict[str, Any] | None = None, name: str = "") -> Any:
    """A value conforming to schema (the subset pydantic emits)."""
    root = root or schema
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(list(schema["enum"]))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if _resolve(o, root).get("type") != "null"] or schema[key]
            return generate(options[0], rng, root, name)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part, root))
        return generate(merged, rng, root, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {key: generate(sub, rng, root, key) for key, sub in props.items()}
    if kind == "array":
        lo = int(schema.get("minItems", 1 if name else 0))
        hi = int(schema.get("maxItems", max(lo, 6)))
        count = rng.randint(max(lo, min(2, hi)), max(lo, min(hi, 6)))
        item_schema = schema.get("items", {"type": "string"})
        items = [generate(item_schema, rng, root, name.rstrip("s")) for _ in range(count)]
        if schema.get("uniqueItems"):
            seen: list[Any] = []
            for item in items:
                if item not in seen:
                    seen.append(item)
            items = seen
        return items
    if kind == "string":
        return _string(name, schema, rng)
    if kind == "integer":
        return _number(schema, rng, True)
    if kind == "number":
        return _number(schema, rng, False)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _string(name, schema, rng)


def _balanced_objects(text: str) -> list[str]:
    """Every balanced {...} span of text, outermost first, in order."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc = not esc and ch == "\\"
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"' and depth:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def requested_shape(prompt: str) -> dict[str, Any] | None:
    """The JSON object a prompt shows as the answer's format (`Format: {"caption":"...", ...}`), if any."""
    for span in _balanced_objects(prompt):
        try:
            value = json.loads(span)
        except ValueError:
            continue
        if isinstance(value, dict) and value:
            return value
    return None


_RANGE = re.compile(r"\((\d+)\s*-\s*(\d+)\)")


def _like(example: Any, key: str, rng: Rng, prompt: str) -> Any:
    """A value shaped like the prompt's example value for key."""
    if isinstance(example, bool):
        return rng.random() < 0.5
    if isinstance(example, int):
        match = _RANGE.search(prompt)
        lo, hi = (int(match.group(1)), int(match.group(2))) if match else (0, 10)
        return rng.randint(lo, hi)
    if isinstance(example, float):
        return round(rng.random(), 3)
    if isinstance(example, list):
        if example and isinstance(example[0], dict):
            return [_fill(example[0], rng, prompt) for _ in range(rng.randint(1, 3))]
        return [_string(key.rstrip("s") or "tag", {}, rng) if "tag" in key else rng.choice(WORDS)
                for _ in range(rng.randint(0, 3))]
    if isinstance(example, dict):
        return _fill(example, rng, prompt)
    if isinstance(example, str) and example.strip(" .") and len(example) <= 24 and not rng.override:
        return example  # a literal such as "safe" or "other": keep the value the prompt names
    return _string(key, {}, rng)


def _fill(shape: dict[str, Any], rng: Rng, prompt: str) -> dict[str, Any]:
    return {key: _like(value, key, rng, prompt) for key, value in shape.items()}


def prose(rng: Rng) -> str:
    """A few sentences: an answer to a prompt that asked for no JSON."""
    if rng.override:
        return rng.override
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))


# ---- answer lengths (the kinds and their means: profiles.py ANSWER_KINDS) ------------------------------

def drawn_tokens(seed_material: str, kind: AnswerKind) -> int:
    """Output tokens of this request's answer: log-normal around the kind's mean, the same for the same request."""
    u = min(max(Rng(seed_material + ":length").random(), 1e-6), 1 - 1e-6)
    mu = math.log(kind.mean_tokens) - LENGTH_SIGMA**2 / 2  # so that the mean is mean_tokens
    return max(1, min(4 * kind.mean_tokens, round(math.exp(mu + LENGTH_SIGMA * NormalDist().inv_cdf(u)))))


def _more(name: str, rng: Rng) -> str:
    """A few more plausible words for a field: a phrase for a (negative) prompt, a sentence otherwise."""
    lname = name.lower()
    if "negative" in lname:
        return ", " + rng.choice(NEGATIVE)
    if "prompt" in lname:
        return ", " + rng.choice(PROMPT_WORDS + STYLES + [f"{c} tones" for c in COLOURS])
    return " " + sentence(rng)


def _longer(text: str, name: str, need: int, max_len: int, rng: Rng) -> str:
    """text with whole sentences (phrases for a prompt) added while that brings it nearer to `need` more
    characters, never past max_len."""
    goal = len(text) + need
    if "prompt" not in name.lower() and text and not text.endswith((".", "!", "?")) and len(text) < max_len:
        text += "."  # a phrase such as "calm composition, teal palette" becomes a sentence before the next one
    while len(text) < goal:
        piece = _more(name, rng)
        for _ in range(3):  # a prompt seldom repeats a phrase: draw again a few times
            if piece not in text:
                break
            piece = _more(name, rng)
        longer = len(text) + len(piece)
        if longer > max_len or longer - goal > goal - len(text):
            break
        text += piece
    return text


def _shortest(value: Any, schema: dict[str, Any]) -> Any:
    """The shortest plausible start of a field that will be padded: its first sentence, its first items."""
    if isinstance(value, str):
        head = value.split(". ", 1)[0]
        head = head if head.endswith(".") or head == value else head + "."
        return head if len(head) >= int(schema.get("minLength", 1)) else value
    if isinstance(value, list):
        return value[: max(1, int(schema.get("minItems", 1)))]
    return value


def fit_length(value: Any, kind: AnswerKind | None, tokens: int, rng: Rng, dump: Callable[[Any], str],
               field_schema: Callable[[str], dict[str, Any]], new_item: Callable[[str], Any]) -> Any:
    """value with its kind's fields padded until dump(value) is about `tokens` long (4 characters a token).

    Fields keep their schema's limits (maxLength, maxItems); a kind without such fields keeps its length.
    """
    if kind is None or not isinstance(value, dict) or rng.override:
        return value
    goal = tokens * 4
    by_lower = {str(k).lower(): k for k in value}
    fields = [by_lower[g] for g in kind.grow if g in by_lower and isinstance(value[by_lower[g]], (str, list))]
    for key in fields:
        value[key] = _shortest(value[key], field_schema(key))
    for key in fields:
        schema = field_schema(key)
        need = goal - len(dump(value))
        if need <= 0:
            break
        if isinstance(value[key], str):
            value[key] = _longer(value[key], key, need, int(schema.get("maxLength", 2000)), rng)
            continue
        items = value[key]
        while len(items) < min(int(schema.get("maxItems", kind.max_items)), kind.max_items) and len(dump(value)) < goal:
            item = new_item(key)
            for _ in range(5):  # a model seldom repeats a tag: draw again a few times
                if _label(item) not in {_label(i) for i in items}:
                    break
                item = new_item(key)
            items.append(item)
    return value


def _label(item: Any) -> Any:
    return item.get("name", json.dumps(item, sort_keys=True)) if isinstance(item, dict) else item


def _schema_field(schema: dict[str, Any], root: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    props = _resolve(schema, root).get("properties", {})
    return lambda key: _resolve(props.get(key, {}), root)


def answer_for(seed_material: str, fmt: Any, prompt: str = "") -> str:
    """The text of an answer: schema-conforming JSON, JSON in the shape the prompt asks for, or prose; its
    free-text or tag fields padded to the length drawn for the request (`drawn_tokens`)."""
    rng = Rng(seed_material, injected_payload(prompt))
    if isinstance(fmt, dict):
        def dump(v: Any) -> str:
            return json.dumps(v, separators=(",", ":"))

        value = generate(fmt, rng)
        kind = answer_kind(value) if isinstance(value, dict) else None
        field = _schema_field(fmt, fmt)

        def new_item(key: str) -> Any:
            sub = field(key)
            return generate(sub.get("items", {"type": "string"}), rng, fmt, key.rstrip("s"))

        if kind is not None:
            value = fit_length(value, kind, drawn_tokens(seed_material, kind), rng, dump, field, new_item)
        return dump(value)
    shape = requested_shape(prompt)

    def loose(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    if shape is not None and (fmt == "json" or "json" in prompt.lower()):
        value = _fill(shape, rng, prompt)
        kind = answer_kind(value)

        def like_item(key: str) -> Any:
            example = shape.get(key)
            first = example[0] if isinstance(example, list) and example else ""
            return _fill(first, rng, prompt) if isinstance(first, dict) else _string(key.rstrip("s"), {}, rng)

        if kind is not None:
            value = fit_length(value, kind, drawn_tokens(seed_material, kind), rng, loose, lambda _k: {}, like_item)
        return loose(value)
    text = prose(rng)
    if not rng.override:
        text = _shortest(text, {})
        text = _longer(text, "response", drawn_tokens(seed_material, PROSE) * 4 - len(text), 8000, rng)
    if fmt == "json":
        return loose({"response": text})
    return text


def thinking_for(seed_material: str, tokens: int) -> str:
    """Reasoning text of about `tokens` tokens (4 characters each) that a thinking model emits first."""
    rng = Rng(seed_material + ":think")
    target = max(0, rng.randint(tokens // 2, tokens + tokens // 2)) * 4
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(f"Let me consider {rng.choice(SUBJECTS)} and {rng.choice(MOODS)} details.")
    return " ".join(parts)[:target] if target else ""
