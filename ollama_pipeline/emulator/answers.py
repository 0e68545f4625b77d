"""Deterministic answers: JSON that conforms to a JSON schema, derived from a hash of the request.

The same request (model, prompt, images, format, seed) always gives the same bytes; different prompts or
images give different content. Standard library only; must not import the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ollama_pipeline.emulator.gullible import injected_payload

SUBJECTS = ["a red fox", "a lighthouse", "a cyberpunk city street", "a mountain lake", "a sleeping cat",
            "an old sailing ship", "a robot gardener", "a dragon over a castle", "a field of sunflowers",
            "a woman in a raincoat", "a neon diner", "a snowy forest", "a vintage car", "an astronaut",
            "a koi pond", "a desert caravan", "a waterfall", "a jazz musician", "a glass greenhouse",
            "a market at dusk"]
STYLES = ["in watercolor", "as a photorealistic render", "in anime style", "as an oil painting",
          "in soft pastel tones", "with dramatic lighting", "in a minimalist style", "as a pencil sketch"]
COLOURS = ["warm orange", "deep blue", "emerald green", "muted grey", "golden", "violet", "crimson", "teal"]
MOODS = ["calm", "mysterious", "joyful", "melancholic", "energetic", "dreamy"]
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


def answer_for(seed_material: str, fmt: Any, prompt: str = "") -> str:
    """The text of an answer: schema-conforming JSON, JSON in the shape the prompt asks for, or prose."""
    rng = Rng(seed_material, injected_payload(prompt))
    if isinstance(fmt, dict):
        return json.dumps(generate(fmt, rng), separators=(",", ":"))
    shape = requested_shape(prompt)
    if shape is not None and (fmt == "json" or "json" in prompt.lower()):
        return json.dumps(_fill(shape, rng, prompt), ensure_ascii=False)
    if fmt == "json":
        return json.dumps({"response": prose(rng)}, ensure_ascii=False)
    return prose(rng)


def thinking_for(seed_material: str, tokens: int) -> str:
    """Reasoning text of about `tokens` tokens (4 characters each) that a thinking model emits first."""
    rng = Rng(seed_material + ":think")
    target = max(0, rng.randint(tokens // 2, tokens + tokens // 2)) * 4
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(f"Let me consider {rng.choice(SUBJECTS)} and {rng.choice(MOODS)} details.")
    return " ".join(parts)[:target] if target else ""
