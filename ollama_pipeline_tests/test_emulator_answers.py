"""The emulator's answers have realistic lengths: output tokens drawn per request around the mean of the answer's
kind (profiles.py ANSWER_KINDS), the same for the same request, cut by `num_predict` as Ollama cuts them."""

from __future__ import annotations

import json
import math
import statistics

import httpx
import pytest

from ollama_pipeline.core.stages import STAGES
from ollama_pipeline.emulator.profiles import ANSWER_KINDS, PROSE


@pytest.fixture
def generate(emulator):
    """POST /api/generate (llava:7b, not streamed) on one keep-alive connection; the answer as JSON."""
    with httpx.Client(base_url=emulator.base_url, timeout=30) as client:
        def call(**body: object) -> dict:
            r = client.post("/api/generate", json={"model": "llava:7b", "stream": False, **body})
            assert r.status_code == 200, r.text
            return r.json()

        yield call


def mean_of(kind: str) -> int:
    return next(k.mean_tokens for k in ANSWER_KINDS if k.name == kind)


@pytest.mark.parametrize(("job", "kind"), [("ollama_caption", "description"), ("ollama_tags_normalize", "tags"),
                                           ("ollama_prompt_recon", "prompt")])
def test_output_tokens_vary_around_the_mean_of_the_stage_kind(generate, job: str, kind: str) -> None:
    """50 requests of one stage's schema: mean eval_count within 15 % of the kind's mean, spread > 0, and every
    answer valid for the stage's schema (server/routes.go: eval_count is the tokens the runner decoded)."""
    stage = STAGES[job]
    counts = []
    for i in range(50):
        answer = generate(prompt=f"{stage.template}\nitem {i}", format=stage.schema)
        stage.output_schema.model_validate_json(answer["response"])
        assert answer["eval_count"] == math.ceil(len(answer["response"]) / 4)  # the emulator's 4 characters a token
        counts.append(answer["eval_count"])
    assert abs(statistics.mean(counts) - mean_of(kind)) <= 0.15 * mean_of(kind), statistics.mean(counts)
    assert statistics.pstdev(counts) > 0.1 * mean_of(kind)


def test_prose_answers_vary_around_their_mean(generate) -> None:
    """Without a format, an answer is prose of about PROSE.mean_tokens tokens."""
    counts = [generate(model="llama3.2:3b", prompt=f"Describe harbour number {i}.")["eval_count"]
              for i in range(50)]
    assert abs(statistics.mean(counts) - PROSE.mean_tokens) <= 0.15 * PROSE.mean_tokens
    assert statistics.pstdev(counts) > 0


def test_every_stage_answer_is_valid_for_its_schema(generate) -> None:
    """Padded or not, each stage's answer validates against the stage's own answer model."""
    for stage in STAGES.values():
        for i in range(5):
            answer = generate(prompt=f"{stage.template}\nitem {i}", format=stage.schema)
            stage.output_schema.model_validate_json(answer["response"])


def test_identical_requests_get_identical_lengths_and_seeds_change_them(generate) -> None:
    """The draw is a function of the request (model, prompt, images, format, seed): the same request, the same bytes."""
    stage = STAGES["ollama_caption"]
    body = {"prompt": stage.template, "format": stage.schema, "options": {"seed": 7}}
    first, again = generate(**body), generate(**body)
    assert (first["response"], first["eval_count"]) == (again["response"], again["eval_count"])
    lengths = {generate(**{**body, "options": {"seed": s}})["eval_count"] for s in range(8)}
    assert len(lengths) > 1


def test_num_predict_cuts_the_answer_into_truncated_json(generate) -> None:
    """llm/llama_server.go Completion: decoding stops at num_predict with done_reason "length"; a format:"json" or
    schema answer is then JSON cut off mid-way, as the runner returns it."""
    stage = STAGES["ollama_caption"]
    body = {"prompt": stage.template, "format": stage.schema}
    whole = generate(**body)
    assert whole["done_reason"] == "stop" and whole["eval_count"] > 20
    cut = generate(**body, options={"num_predict": 20})
    assert (cut["done_reason"], cut["eval_count"]) == ("length", 20)
    assert whole["response"].startswith(cut["response"]) and len(cut["response"]) == 80
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut["response"])
    shaped = generate(prompt='Describe it. Format: {"caption":"...","rationale":"..."}', format="json",
                      options={"num_predict": 5})
    assert shaped["done_reason"] == "length" and shaped["response"].startswith('{"caption": ')
