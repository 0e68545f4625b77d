"""Stage `ollama_prompt_recon` (vision): the prompt that would generate this image, and how close it is.

The model sees the image and only the style facts of the stored generation (generator model, sampler,
size), never the stored prompt itself, so the reconstruction is a real test of what the image shows. The
pipeline then measures how close the reconstruction is to the stored prompt: token-set Jaccard similarity
of the comma-separated phrases' words (0..1), for prompt and negative prompt.

`ollama.prompt_reconstruction` = {"prompt", "negative_prompt", "similarity": {"prompt", "negative_prompt",
"method"}, "stored_prompt": bool, "generator": model or null}.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from ollama_pipeline.core.stages.base import Stage, StageInputs, StageOutput, round3, single_request


class ReconAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=1000, description="A generation prompt for this image.")
    negative_prompt: str = Field(max_length=500, description="A negative prompt (what to avoid).")


RECON_TEMPLATE = """Write the text-to-image prompt that would produce this image, in the style of the
library's generator: comma-separated phrases, subject first, then setting, style, lighting and quality
words; and a matching negative prompt. Return JSON with "prompt" and "negative_prompt".
Generator facts:
{generator}"""

_WORD = re.compile(r"[a-z0-9]+")
SIMILARITY_METHOD = "token_jaccard"


def token_similarity(a: str | None, b: str | None) -> float | None:
    """Jaccard similarity of the two texts' lower-case word sets; None when one side is missing."""
    if not a or not b:
        return None
    left, right = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    if not left and not right:
        return 1.0
    return round3(len(left & right) / len(left | right))


def plan_recon(stage: Stage, inputs: StageInputs) -> list:
    p = inputs.prompt
    generator = {"model": p.model, "sampler": p.sampler, "size": p.size} if p else {"model": None}
    return single_request(stage, inputs, generator=generator)


def combine_recon(stage: Stage, inputs: StageInputs, answers: dict[str, BaseModel]) -> StageOutput:
    answer = answers["main"]
    assert isinstance(answer, ReconAnswer)
    p = inputs.prompt
    prompt = " ".join(answer.prompt.split())
    negative = " ".join(answer.negative_prompt.split())
    value = {
        "prompt": prompt,
        "negative_prompt": negative,
        "similarity": {"prompt": token_similarity(prompt, p.prompt if p else None),
                       "negative_prompt": token_similarity(negative, p.negative_prompt if p else None),
                       "method": SIMILARITY_METHOD},
        "stored_prompt": bool(p and p.prompt),
        "generator": p.model if p else None,
    }
    return StageOutput(meta={"ollama.prompt_reconstruction": value})


PROMPT_RECON = Stage(
    job_type="ollama_prompt_recon",
    title="Prompt reconstruction",
    description="A generation prompt and negative prompt for the image in the style of the library's "
    "generator (the model never sees the stored prompt), with its token similarity to the stored one.",
    model_kind="vision",
    inputs=("image", "prompt"),
    prompt_version="prompt-recon-v2",
    template=RECON_TEMPLATE,
    output_schema=ReconAnswer,
    writes=("ollama.prompt_reconstruction",),
    plan=plan_recon,
    combine=combine_recon,
    group="ollama_describe",
)
