"""The order in which a run's stages meet the models: all vision work first, then text, so that a host
that fits one model at a time swaps models once per block of items, not once per item. (The other
request-shaping rules live where the requests are made: the shared prompt prefix and the combined vision
request in core/stages/base.py, one num_ctx per run and an item's stages back to back (`run_items`) in
core/runner.py, slots held per item in core/client.py.)

Never imports Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable

from ollama_pipeline.core.stages import STAGES


def stage_order(job_types: Iterable[str]) -> list[str]:
    """Vision stages first, then text stages; registry order within each (which respects upstream)."""
    wanted = set(job_types)
    ordered = [j for j in STAGES if j in wanted]
    vision = [j for j in ordered if STAGES[j].model_kind == "vision"]
    text = [j for j in ordered if STAGES[j].model_kind == "text"]
    return vision + text  # no vision stage reads a text stage's output (title is the only text stage)
