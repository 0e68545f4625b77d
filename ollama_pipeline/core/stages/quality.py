"""Stages `ollama_quality` (technical defects and a verdict) and `ollama_score_multi` (named scores).

`ollama.quality` = {"score": 0..1, "verdict": ok|needs_review|rejected, "issues": [{kind, severity}],
"summary"}. With `pipeline.write_quality_status` the verdict and score also go to `media.quality_status`
/ `media.quality_score`; only a real change writes one `media_lifecycle_events` row and one `audit_log` row
(old value, new value, model, version) — see `repository.persist_result`.

`ollama.scores` = {"scale": {"min": 0, "max": 10}, "scores": {aesthetic, technical, prompt_adherence,
originality}, "overall"}: overall is the pipeline's mean of the named scores, not the model's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.stages.base import (
    QualityUpdate,
    RunSkip,
    Stage,
    StageInputs,
    StageOutput,
    pipeline_succeeded,
    round3,
    single_request,
)

IssueKind = Literal["blur", "artifacts", "malformed_hands", "malformed_anatomy", "text", "watermark", "noise",
                    "overexposed", "underexposed", "cropped", "low_resolution", "other"]
Verdict = Literal["ok", "needs_review", "rejected"]


class QualityIssue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: IssueKind = Field(description="The kind of defect.")
    severity: float = Field(ge=0.0, le=1.0, description="0 = barely visible, 1 = ruins the image.")


class QualityAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: float = Field(ge=0.0, le=1.0, description="Overall technical quality, 0 = unusable, 1 = flawless.")
    verdict: Verdict = Field(description="ok, needs_review (a person should look) or rejected (unusable).")
    issues: list[QualityIssue] = Field(default_factory=list, max_length=12, description="Defects found.")
    summary: str = Field(min_length=1, max_length=300, description="One sentence on the quality.")


QUALITY_TEMPLATE = """Judge the technical quality of this AI-generated image for a media library.
Return JSON with "score" (0..1), "verdict" ("ok", "needs_review" or "rejected"), "issues" (a list of
{{"kind", "severity"}} with kind one of blur, artifacts, malformed_hands, malformed_anatomy, text,
watermark, noise, overexposed, underexposed, cropped, low_resolution, other; empty when there are none) and
"summary" (one sentence). Judge only what is visible."""


def plan_quality(stage: Stage, inputs: StageInputs) -> list:
    return single_request(stage, inputs)


def combine_quality(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, QualityAnswer)
    worst: dict[str, float] = {}
    for issue in answer.issues:
        worst[issue.kind] = max(worst.get(issue.kind, 0.0), round3(issue.severity))
    issues = [{"kind": kind, "severity": severity} for kind, severity in sorted(worst.items())]
    score = round3(answer.score)
    value = {"score": score, "verdict": answer.verdict, "issues": issues, "summary": answer.summary.strip()}
    return StageOutput(meta={"ollama.quality": value}, quality=QualityUpdate(status=answer.verdict, score=score))


ScoreName = Literal["aesthetic", "technical", "prompt_adherence", "originality"]
SCORE_NAMES: tuple[str, ...] = ("aesthetic", "technical", "prompt_adherence", "originality")
SCALE = {"min": 0, "max": 10}


class ScoresAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aesthetic: float = Field(ge=0, le=10, description="Beauty, composition, colour (0..10).")
    technical: float = Field(ge=0, le=10, description="Sharpness, no artifacts, correct anatomy (0..10).")
    prompt_adherence: float = Field(ge=0, le=10, description="How well the image matches its prompt (0..10).")
    originality: float = Field(ge=0, le=10, description="How fresh and unusual the image is (0..10).")


SCORES_TEMPLATE = """Score this AI-generated image on four scales from 0 (worst) to 10 (best).
Return JSON with "aesthetic", "technical", "prompt_adherence" (how well it matches the generation prompt
below; 5 when there is no prompt) and "originality", each a number from 0 to 10.
Generation prompt:
{prompt}"""


def plan_scores(stage: Stage, inputs: StageInputs) -> list:
    p = inputs.prompt
    return single_request(stage, inputs, prompt=p.prompt if p else None)


def combine_scores(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, ScoresAnswer)
    scores = {name: round(float(getattr(answer, name)), 2) for name in SCORE_NAMES}
    overall = round(sum(scores.values()) / len(scores), 2)
    return StageOutput(meta={"ollama.scores": {"scale": SCALE, "scores": scores, "overall": overall,
                                               "has_prompt": bool(inputs.prompt and inputs.prompt.prompt)}})


UNSET_QUALITY = (None, "", "unknown")


def quality_run_condition(inputs: StageInputs, state: dict[str, Any] | None) -> RunSkip | None:
    """The data contract's stage 3: only while `media.quality_status` is unknown, or forced. A status the
    pipeline set itself (its stored verdict) is its own result and may be evaluated again; one a person or
    another tool set is left alone."""
    status = inputs.media.quality_status
    if status in UNSET_QUALITY:
        return None
    stored = inputs.meta.get("ollama.quality")
    ours = pipeline_succeeded(state) or "ollama.quality" in inputs.written_keys
    if ours and isinstance(stored, dict) and stored.get("verdict") == status:
        return None
    return RunSkip(reason="quality_status_set",
                   message=f"media {inputs.media.id} has quality_status {status!r}, not set by the pipeline; "
                           "the quality stage runs only while it is unknown (force to re-evaluate)")


QUALITY = Stage(
    job_type="ollama_quality",
    title="Quality",
    description="Technical quality from the vision model: a 0..1 score, defects found (blur, artifacts, "
    "malformed hands, text, watermark …) and a verdict; with `pipeline.write_quality_status` also "
    "media.quality_status/quality_score, with a lifecycle event and an audit_log row when they change.",
    model_kind="vision",
    inputs=("image", "media"),
    prompt_version="quality-v2",
    template=QUALITY_TEMPLATE,
    output_schema=QualityAnswer,
    writes=("ollama.quality",),
    run_condition=quality_run_condition,
    writes_tables=("media.quality_status", "media.quality_score", "media_lifecycle_events", "audit_log"),
    plan=plan_quality,
    combine=combine_quality,
    group="ollama_judge",
    extra={"check_categorical_keys": frozenset({"ollama.quality"}), "check_may_be_empty_keys": frozenset()},
)

SCORES = Stage(
    job_type="ollama_score_multi",
    title="Scores",
    description="Four named scores on a 0..10 scale (aesthetic, technical, prompt adherence, originality) "
    "from the vision model, and their mean as `overall`.",
    model_kind="vision",
    inputs=("image", "prompt"),
    prompt_version="scores-v2",
    template=SCORES_TEMPLATE,
    output_schema=ScoresAnswer,
    writes=("ollama.scores",),
    plan=plan_scores,
    combine=combine_scores,
    group="ollama_judge",
    extra={"check_categorical_keys": frozenset({"ollama.scores"}), "check_may_be_empty_keys": frozenset()},
)
