"""Stage `ollama_policy_flags` (vision): named content flags with confidence, combined with the library's
NSFW scanner (`scan_results`) into one outcome.

`ollama.policy_flags` = {"flags": [{name, confidence, source: model|scan}], "nsfw_score": combined,
"model_nsfw_score", "scan_nsfw_score", "rating": the model's safe|questionable|explicit, "outcome":
allow|review|block, "reasons": [...]}. The outcome is the pipeline's rule, not the model's:

- block:  combined NSFW score >= 0.9 together with a `minor` flag >= 0.3, or `minor` >= 0.7, or
          gore/self_harm >= 0.9;
- review: combined NSFW score >= 0.6, or any flag (model or scan) of a policy kind >= 0.6, or the
          media row says has_nsfw while the rating is safe;
- allow:  otherwise.

The combined NSFW score is max(scanner nsfw_score, model's strongest nudity/sexual/suggestive flag).
A change of outcome writes one `media_lifecycle_events` row and one `audit_log` row.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.injection import find_instructions
from ollama_pipeline.core.stages.base import (
    PolicyUpdate,
    Stage,
    StageInputs,
    StageOutput,
    round3,
    single_request,
)

FlagName = Literal["nudity", "sexual", "suggestive", "violence", "gore", "minor", "hate_symbol", "drugs",
                   "weapon", "self_harm", "disturbing"]
NSFW_FLAGS = frozenset({"nudity", "sexual", "suggestive"})
REVIEW_AT = 0.6
NSFW_BLOCK_AT = 0.9


class PolicyFlag(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FlagName = Field(description="The kind of content.")
    confidence: float = Field(ge=0.0, le=1.0, description="How sure you are that it is present (0..1).")


class PolicyAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flags: list[PolicyFlag] = Field(default_factory=list, max_length=11,
                                    description="Content present in the image; empty when none.")
    rating: Literal["safe", "questionable", "explicit"] = Field(description="Overall content rating.")


POLICY_TEMPLATE = """Flag sensitive content in this image for a media library's content policy.
Return JSON with "flags" (a list of {{"name", "confidence"}}, name one of nudity, sexual, suggestive,
violence, gore, minor, hate_symbol, drugs, weapon, self_harm, disturbing; only what is visible; empty list
when none) and "rating" ("safe", "questionable" or "explicit").
Facts from the library (an automatic scanner may be wrong):
{facts}"""


def plan_policy(stage: Stage, inputs: StageInputs) -> list:
    m = inputs.media
    facts = {"rating": m.rating, "has_nsfw": m.has_nsfw,
             "scanner": [{"nsfw_score": s.nsfw_score, "flags": sorted(s.flags)} for s in inputs.scans]}
    return single_request(stage, inputs, facts=facts)


_FLAG_NAME = re.compile(r"[\w][\w .:/()+-]{0,63}")


def is_flag_name(name: str) -> bool:
    """A scanner flag is copied into ollama.policy_flags only when it looks like one: at most 64 characters
    and 4 words of letters, digits and a little punctuation, and no instruction (library data is untrusted:
    a scanner's flag list must not carry free text into what the pipeline stores)."""
    return bool(_FLAG_NAME.fullmatch(name)) and len(name.split()) <= 4 and not find_instructions(name)


def outcome_for(flags: dict[str, float], combined_nsfw: float, has_nsfw: bool | None,
                rating: str) -> tuple[str, list[str]]:
    """The policy outcome and its reasons (see the module docstring)."""
    minor = flags.get("minor", 0.0)
    if (combined_nsfw >= NSFW_BLOCK_AT and minor >= 0.3) or minor >= 0.7:
        return "block", ["minor"]
    severe = [f for f in ("gore", "self_harm") if flags.get(f, 0.0) >= NSFW_BLOCK_AT]
    if severe:
        return "block", severe
    reasons = []
    if combined_nsfw >= REVIEW_AT:
        reasons.append("nsfw_score")
    reasons.extend(sorted(name for name, conf in flags.items() if conf >= REVIEW_AT and name not in NSFW_FLAGS))
    if has_nsfw and rating == "safe":
        reasons.append("has_nsfw_but_rated_safe")
    return ("review" if reasons else "allow"), reasons


def combine_policy(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, PolicyAnswer)
    model_flags: dict[str, float] = {}
    for flag in answer.flags:
        model_flags[flag.name] = max(model_flags.get(flag.name, 0.0), round3(flag.confidence))
    scan_scores = [s.nsfw_score for s in inputs.scans if s.nsfw_score is not None]
    scan_nsfw = round3(max(scan_scores)) if scan_scores else None
    scan_flags: dict[str, float] = {}
    for scan in inputs.scans:
        for name in filter(is_flag_name, scan.flags):
            scan_flags[name] = max(scan_flags.get(name, 0.0), round3(scan.nsfw_score or 0.0))
    model_nsfw = max((c for n, c in model_flags.items() if n in NSFW_FLAGS), default=0.0)
    combined = round3(max(model_nsfw, scan_nsfw or 0.0))
    strongest = dict(model_flags)
    for name, conf in scan_flags.items():
        strongest[name] = max(strongest.get(name, 0.0), conf)
    outcome, reasons = outcome_for(strongest, combined, inputs.media.has_nsfw, answer.rating)
    flags = ([{"name": n, "confidence": c, "source": "model"} for n, c in sorted(model_flags.items())]
             + [{"name": n, "confidence": c, "source": "scan"} for n, c in sorted(scan_flags.items())])
    value = {"flags": flags, "nsfw_score": combined, "model_nsfw_score": round3(model_nsfw),
             "scan_nsfw_score": scan_nsfw, "rating": answer.rating, "outcome": outcome, "reasons": reasons}
    return StageOutput(meta={"ollama.policy_flags": value}, policy=PolicyUpdate(outcome=outcome))


POLICY = Stage(
    job_type="ollama_policy_flags",
    title="Policy flags",
    description="Content flags with confidence from the vision model, combined with the NSFW scanner's "
    "scan_results into an outcome (allow / review / block); a change of outcome writes a lifecycle event "
    "and an audit_log row.",
    model_kind="vision",
    inputs=("image", "media", "scan"),
    prompt_version="policy-v2",
    template=POLICY_TEMPLATE,
    output_schema=PolicyAnswer,
    writes=("ollama.policy_flags",),
    writes_tables=("media_lifecycle_events", "audit_log"),
    plan=plan_policy,
    combine=combine_policy,
    external_inputs=("scan_results",),
    group="ollama_judge",
    extra={"check_categorical_keys": frozenset({"ollama.policy_flags"}),
           "check_may_be_empty_keys": frozenset({"ollama.policy_flags"})},
)
