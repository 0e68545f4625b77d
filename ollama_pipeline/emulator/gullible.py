"""The gullible model: it obeys an instruction planted in the data it is asked to describe.

A weak model reads through tricks a filter may not: it sees "ｉｇｎｏｒｅ", "i\u200bgnore", "IGNORE" and
"ignore" followed by 41 spaces as the same word, and it follows an order given anywhere in its input, not
only one phrased like "ignore previous instructions". This module plays such a model:

1. It reads the prompt as a model does: JSON string escapes decoded (`\\"`, `\\n`, `\\u200b`), Unicode
   NFKC, invisible format characters (zero-width, bidi controls, soft hyphen, BOM) dropped, look-alike
   Cyrillic and Greek letters read as Latin, whitespace runs collapsed, case folded.
2. It reads each string of the quoted JSON data on its own and splits it into clauses (at punctuation
   and at the small words orders start with: "and", "just", "now", "please", "you", ...); it obeys a
   clause that opens with an order: a verb that asks for output ("print", "say", "repeat", "write", "report", "translate", ...; the last one, as an
   injection comes after the task it hijacks) or one that overrides ("ignore", "disregard", "forget",
   "focus", "stop", ...).
3. What it then says in every free-text field is what the order asks for: the first quoted or bracketed
   text after the verb, else the rest of that clause; "PWNED" when an override names nothing to say.

It only looks inside the `<data>` blocks of a prompt when there are any (the task text around them is the
caller's, and obeying that is not gullibility); a prompt without them counts as hijacked only when it
also holds an override ("ignore", "forget", ...). Standard library only; must not import the pipeline.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

# Latin look-alikes a model reads as the Latin letter (a few of Unicode's confusables, lower case after
# casefold).
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɑ": "a", "ı": "i", "ɡ": "g", "ο": "o", "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ӏ": "l",
})
_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[\"\\/bfnrt])")
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": " ", "f": " ", "n": " ", "r": " ", "t": " "}
_DATA = re.compile(r"<data>(.*?)</data>", re.S)

OUTPUT_VERBS = frozenset({"say", "print", "output", "reply", "respond", "answer", "repeat", "write",
                          "return", "echo", "translate", "spell", "report", "provide", "display", "show",
                          "tell", "recite"})
OVERRIDE_VERBS = frozenset({"ignore", "disregard", "forget", "override", "focus", "stop", "nevermind",
                            "pretend", "act", "obey", "follow"})
# Small words an order starts after ("... and just print", "could you repeat", "now say").
_LEADS = frozenset({"and", "then", "just", "only", "now", "please", "simply", "instead", "kindly", "also",
                    "you", "next", "so", "but", "to", "must", "should", "will", "can", "could", "would"})
_BREAK = re.compile(r"[.!?:;,\"'<>()\[\]{}*=#|~`\-]+")
_WORD = re.compile(r"[a-z0-9_]+")
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|<+\"?([^<>\"]{1,200}?)\"?>+|'([^']{1,200})'")
_FILLER = re.compile(r"^(?:(?:with|only|just|exactly|the|following|this|that|text|sentence|word|words|as|"
                     r"back|out|me|it|to|us|verbatim|simply)\b\W*)+")
_OBEYED_MAX = 120


def _decode_json_escapes(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code.startswith("u"):
            char = chr(int(code[1:], 16))
            return "" if 0xD800 <= ord(char) <= 0xDFFF else char
        return _SIMPLE[code]

    return _JSON_ESCAPE.sub(one, text)


def read_like_a_model(text: str) -> str:
    """The text as the gullible model reads it (see the module docstring, step 1)."""
    text = unicodedata.normalize("NFKC", _decode_json_escapes(text))
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split()).casefold().translate(_LOOKALIKES)


def _the_order(text: str) -> tuple[str, int] | None:
    """(verb, end offset) of the order it obeys: the last clause-opening output verb (an injection comes
    after the task it hijacks), else the first clause-opening override."""
    output: tuple[str, int] | None = None
    override: tuple[str, int] | None = None
    at_clause_start = True
    pos = 0
    while pos < len(text):
        brk = _BREAK.match(text, pos)
        if brk:
            at_clause_start = True
            pos = brk.end()
            continue
        word = _WORD.match(text, pos)
        if not word:
            pos += 1
            continue
        token = word.group(0)
        if at_clause_start and token in OUTPUT_VERBS:
            output = (token, word.end())
        elif at_clause_start and token in OVERRIDE_VERBS and override is None:
            override = (token, word.end())
        at_clause_start = token in _LEADS or (at_clause_start and token in OVERRIDE_VERBS)
        pos = word.end()
    return output or override


def _what_it_asks_for(text: str, verb: str, end: int) -> str:
    quoted = _QUOTED.search(text, end, min(len(text), end + 300))
    if quoted:
        return next(g for g in quoted.groups() if g is not None).strip()
    if verb in OVERRIDE_VERBS:
        return "PWNED"
    rest = re.split(r"[.!?,;]", text[end:end + 300], maxsplit=1)[0]
    return _FILLER.sub("", rest.strip()).strip()[:_OBEYED_MAX] or "PWNED"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _texts(prompt: str) -> list[str]:
    """What it reads: each string value of the quoted JSON data (or the block, or the whole prompt)."""
    blocks = _DATA.findall(prompt)
    if not blocks:
        return [prompt]
    texts: list[str] = []
    for block in blocks:
        try:
            texts.extend(_strings(json.loads(block)))
        except ValueError:
            texts.append(block)
    return texts


def _overrides(text: str) -> bool:
    return any(w in OVERRIDE_VERBS for w in _WORD.findall(text))


def injected_payload(prompt: str) -> str | None:
    """What the gullible model says instead of doing its task, or None when the data holds no order.

    A prompt without `<data>` blocks is the caller's own task ("Write a caption"): it counts as hijacked
    only when it also tells the model to ignore, forget, disregard (... ) something."""
    quoted = bool(_DATA.search(prompt))
    for raw in _texts(prompt):
        text = read_like_a_model(raw)
        if not quoted and not _overrides(text):
            continue
        order = _the_order(text)
        if order is not None:
            return _what_it_asks_for(text, *order)[:_OBEYED_MAX].strip() or "PWNED"
    return None
