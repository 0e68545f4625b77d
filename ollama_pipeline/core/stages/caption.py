"""Stages `ollama_caption` (vision) and `ollama_title` (text, from caption + generation prompt)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.stages.base import (
    RunSkip,
    Stage,
    StageInputs,
    StageOutput,
    foreign_value,
    single_request,
)


class CaptionAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caption: str = Field(min_length=1, max_length=300, description="One sentence describing the image.")
    description: str = Field(min_length=1, max_length=2000, description="Two to four sentences of detail.")


class TitleAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=120, description="A short title, at most ten words.")


CAPTION_TEMPLATE = """Describe this image for a media library.
Return JSON with "caption" (one sentence, at most 300 characters) and "description" (two to four sentences
about subject, setting, style, colours and mood). Describe only what is visible."""

TITLE_TEMPLATE = """Write a short, specific title (at most ten words, no quotes) for a library image.
Return JSON with "title". Use the caption and, as context only, the generation prompt.
Caption:
{caption}
Generation prompt:
{prompt}"""


def _text(value: object) -> str | None:
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else None
    return value if isinstance(value, str) else None


def _only_when_missing(key: str, what: str):
    """Run condition of the data contract's stage 1: only when no caption/title exists, or forced. A value the
    pipeline wrote itself is its own result (refreshed by the usual rules); one from elsewhere is kept."""

    def condition(inputs: StageInputs, state: dict[str, Any] | None) -> RunSkip | None:
        if not _text(inputs.meta.get(key)) or not foreign_value(inputs, key, state):
            return None
        return RunSkip(reason=f"{what}_present",
                       message=f"media {inputs.media.id} already has {key} that the pipeline did not write; "
                               f"the {what} stage runs only when it is missing (force to replace it)")

    return condition


def plan_caption(stage: Stage, inputs: StageInputs) -> list:
    return single_request(stage, inputs)


def combine_caption(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, CaptionAnswer)
    return StageOutput(meta={
        "ollama.caption": {"text": answer.caption.strip()},
        "ollama.description": {"text": answer.description.strip()},
    })


def plan_title(stage: Stage, inputs: StageInputs) -> list:
    p = inputs.prompt
    return single_request(stage, inputs, caption=_text(inputs.meta.get("ollama.caption")),
                          prompt=p.prompt if p else None)


def combine_title(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, TitleAnswer)
    return StageOutput(meta={"ollama.title": {"text": " ".join(answer.title.split()).strip(" \"'")}})


CAPTION = Stage(
    job_type="ollama_caption",
    title="Caption",
    description="A one-sentence caption and a longer description of the image, from the vision model.",
    model_kind="vision",
    inputs=("image", "media"),
    prompt_version="caption-v2",
    template=CAPTION_TEMPLATE,
    output_schema=CaptionAnswer,
    writes=("ollama.caption", "ollama.description"),
    run_condition=_only_when_missing("ollama.caption", "caption"),
    plan=plan_caption,
    combine=combine_caption,
    group="ollama_describe",
)

TITLE = Stage(
    job_type="ollama_title",
    title="Title",
    description="A short title written by the text model from the caption and the generation prompt.",
    model_kind="text",
    inputs=("prompt", "meta"),
    prompt_version="title-v1",
    template=TITLE_TEMPLATE,
    output_schema=TitleAnswer,
    writes=("ollama.title",),
    run_condition=_only_when_missing("ollama.title", "title"),
    plan=plan_title,
    combine=combine_title,
    upstream=("ollama_caption",),
    group="ollama_describe",
)
