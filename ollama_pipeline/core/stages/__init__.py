"""The stage registry: one entry per job type of the seed (§3), in dependency order.

Adding a stage is adding one `Stage` here; assets, the job processor, checks and docs read this registry.
"""

from __future__ import annotations

from ollama_pipeline.core.stages.base import Stage
from ollama_pipeline.core.stages.caption import CAPTION, TITLE
from ollama_pipeline.core.stages.duplicates import DUPLICATES
from ollama_pipeline.core.stages.policy import POLICY
from ollama_pipeline.core.stages.prompt_recon import PROMPT_RECON
from ollama_pipeline.core.stages.quality import QUALITY, SCORES
from ollama_pipeline.core.stages.tags import TAGS

STAGES: dict[str, Stage] = {s.job_type: s for s in (CAPTION, TITLE, TAGS, QUALITY, DUPLICATES, PROMPT_RECON,
                                                    SCORES, POLICY)}

# Keys every stage writes besides its own (§2): merged maps keyed by job type.
COMMON_KEYS = ("ollama.model", "ollama.version", "ollama.last_run_at")


def get_stage(job_type: str) -> Stage:
    """The stage for a job type, or a validation error naming the known ones."""
    from ollama_pipeline.core.errors import ValidationError

    try:
        return STAGES[job_type]
    except KeyError:
        raise ValidationError(f"unknown job type {job_type!r}; known: {', '.join(STAGES)}",
                              code="validation.job_type") from None


def all_meta_keys() -> list[str]:
    keys: list[str] = []
    for stage in STAGES.values():
        keys.extend(k for k in stage.writes if k not in keys)
    return keys + [k for k in COMMON_KEYS if k not in keys]
