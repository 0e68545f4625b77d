"""Prompt-injection defence: normalize untrusted library text, find instructions in it, keep them from the
model, and refuse answers that repeat one.

Library data (prompts, tag names, scan flags, media_meta values, file names) is untrusted: whoever wrote a
prompt or a tag may have planted an order for the model. Three steps, all on *normalized* text:

1. `normalize`: Unicode NFKC (full-width and compatibility forms become plain letters), invisible format
   characters removed (zero-width spaces and joiners, bidi controls, soft hyphen, BOM: every character
   of category Cf), Latin look-alike Cyrillic/Greek letters folded to Latin, whitespace runs collapsed to
   one space, case folded. "ＩＧＮＯＲＥ", "i\u200bgnore", "IGNORE" + 41 spaces all read "ignore ".
2. `find_instructions`: word-based rules on the normalized text (distance counted in words, not
   characters, so padding does not help): an override ("ignore/disregard/forget ... instructions/above/
   rules"), a redirect ("new instructions", "you are now", "from now on", "developer mode", ...), a chat
   role marker ("system:", "assistant:"), a data delimiter (`<data>`, `<|...|>`), or an order opening a
   clause ("..., just print X", "Write one sentence about X", "report that X"). Each finding keeps the
   words it asks the model to say (its *target*).
3. `neutralize` replaces a string that holds a finding by `REMOVED` before it is quoted into a prompt
   (`core/stages/base.py`); `answer_repeats_instruction` checks every free-text value of an answer: a
   value that holds an instruction itself, or repeats a target word of an instruction found in the item's
   untrusted inputs, is not written (`validation.prompt_injection`, see `core/runner.py`).

Must not import Dagster.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

REMOVED = "[instruction-like text removed]"

_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "ɑ": "a", "ı": "i", "ɡ": "g", "ο": "o", "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ӏ": "l",
})


def normalize(text: str) -> str:
    """NFKC, format characters (zero-width, bidi, soft hyphen) removed, look-alikes folded, whitespace
    runs collapsed, casefolded."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split()).casefold().translate(_LOOKALIKES)


_W = r"(?:\W+\w+){0,12}?\W+"  # up to twelve words in between
_OVERRIDE = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass|skip|discard|abandon|neglect|overlook|drop)\b" + _W +
    r"(?:instructions?|prompts?|rules?|directions?|directives?|guidelines?|context|above|previous|prior|"
    r"earlier|preceding|following|everything|all|system|messages?|orders?|commands?|constraints?|"
    r"restrictions?|policy|policies|programming|task|rest)\b")
_REDIRECT = re.compile(
    r"\b(?:(?:new|updated|real|actual|secret|hidden|additional|revised) (?:instructions?|task|orders?|rules?|"
    r"prompt)|from now on|you are now|you will now|you must now|act as|pretend (?:to be|you are|that)|"
    r"role ?play|developer mode|jailbreak\w*|do anything now|system prompt|nevermind|never mind|"
    r"stop everything|instead (?:focus|print|say|write|output|reply|respond|repeat|answer|tell|spell|"
    r"translate|report|return)|visible to (?:an? )?(?:llm|ai|model|assistant|bot)s?|"
    r"(?:ai|llm|assistant|chatbot|language model)s? (?:must|shall) )\b")
_ROLE = re.compile(r"(?:^|[\s>\"'\[(])(?:system|assistant|user|human|ai|bot)\s*:")
_DELIMITER = re.compile(r"</?\s*data\s*>|<\|[^|]{0,40}\|>|\[/?inst\]|<</?sys>>")
_ORDER_VERBS = (r"say|print|output|reply|respond|answer|repeat|write|return|echo|translate|spell|report|"
                r"provide|display|show|tell|recite|type|state|focus|obey|follow|execute|run")
_ORDER = re.compile(
    r"(?:^|[.!?:;,\"'<>()\[\]{}*=#|~`-]\s*|\b(?:and|then|just|only|now|please|simply|instead|kindly|also|"
    r"you|next|so|to|must|should)\s+)"
    r"(?P<verb>" + _ORDER_VERBS + r")\b(?P<target>[^.!?;,]*)")
_TOKEN = re.compile(r"[a-z0-9_]{3,}")
_STOPWORDS = frozenset(
    "the and for with only just this that these those following text sentence word words exactly about "
    "from into onto your you our their them then than what when where which while will would should could "
    "must shall can may might not nothing else all any some one two most least more less very really "
    "please now here there its it's has have had was were are is been being does did done say print output "
    "reply respond answer repeat write return echo translate spell report provide display show tell recite "
    "type state focus obey follow execute run back out verbatim simply instead absolutely other info "
    "information between brackets angled quotes".split())


@dataclass(frozen=True)
class Finding:
    """One instruction found in untrusted text: which rule, and the words it asks the model to say."""

    rule: str
    target: frozenset[str]


def find_instructions(text: str | None) -> list[Finding]:
    """The instructions in one untrusted string (empty when there are none)."""
    if not text:
        return []
    norm = normalize(text)
    found: list[Finding] = []
    for rule, pattern in (("override", _OVERRIDE), ("redirect", _REDIRECT), ("role", _ROLE),
                          ("delimiter", _DELIMITER)):
        match = pattern.search(norm)
        if match:
            found.append(Finding(rule, _target_words(norm[match.end():])))
    for match in _ORDER.finditer(norm):
        target = _target_words(match.group("target"))
        if target:  # "print" alone, or a tag named "say", asks for nothing
            found.append(Finding("order", target))
    return found


def _target_words(text: str) -> frozenset[str]:
    """The words of the clause an instruction ends with (up to the next , ; . ! ?)."""
    clause = re.split(r"[.!?;,]", text[:300], maxsplit=1)[0]
    return frozenset(t for t in _TOKEN.findall(clause) if t not in _STOPWORDS)


def neutralize(text: str | None) -> str | None:
    """The string, or `REMOVED` when it holds an instruction (then nothing of it reaches the model)."""
    if text is None:
        return None
    return REMOVED if find_instructions(text) else text


def strings_of(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value (dict keys excluded)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_of(v)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from strings_of(v)


def instruction_targets(untrusted: Iterable[str]) -> frozenset[str]:
    """The target words of every instruction found in these untrusted strings."""
    words: set[str] = set()
    for text in untrusted:
        for finding in find_instructions(text):
            words |= finding.target
    return frozenset(words)


def answer_repeats_instruction(values: Iterable[str], targets: frozenset[str]) -> bool:
    """True when an answer's free-text value holds an instruction of its own (an override, redirect, role
    marker or delimiter: a model that repeats the order it was given) or repeats a target word of an
    instruction found in the item's untrusted inputs."""
    for value in values:
        findings = find_instructions(value)
        if any(f.rule != "order" for f in findings):
            return True
        if targets and targets & set(_TOKEN.findall(normalize(value))):
            return True
    return False
