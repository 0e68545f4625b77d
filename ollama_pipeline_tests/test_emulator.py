"""The emulator speaks Ollama's protocol to the real `ollama` client, with capacity limits and faults."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import ollama
import pytest
from pydantic import BaseModel, Field

from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

IMG = "aGVsbG8gd29ybGQ="


class Item(BaseModel):
    name: str = Field(max_length=20)
    score: float = Field(ge=0, le=1)


class Answer(BaseModel):
    caption: str
    verdict: Literal["good", "poor"]
    count: int = Field(ge=1, le=5)
    items: list[Item] = Field(min_length=1, max_length=3)
    note: str | None = None


def test_metadata_endpoints_answer_like_ollama(emulator) -> None:
    """version, tags with digests, show with capabilities, ps after a call."""
    client = ollama.Client(host=emulator.base_url)
    assert httpx.get(emulator.base_url + "/").text == "Ollama is running"
    assert httpx.get(emulator.base_url + "/api/version").json()["version"]
    models = {m.model: m for m in client.list().models}
    assert "llava:7b" in models and len(models["llava:7b"].digest) == 64
    assert "vision" in client.show("llava:7b").capabilities
    assert "thinking" in client.show("qwen3:4b").capabilities
    client.generate(model="llama3.2:3b", prompt="hi")
    assert any(m.model == "llama3.2:3b" for m in client.ps().models)


def test_schema_answers_conform_and_repeat_byte_for_byte(emulator) -> None:
    """The same request gives the same bytes; a different image gives another answer."""
    client = ollama.Client(host=emulator.base_url)
    kwargs = dict(model="llava:7b", prompt="describe", format=Answer.model_json_schema(),
                  options={"seed": 1, "temperature": 0})
    first = client.generate(images=[IMG], **kwargs).response
    assert client.generate(images=[IMG], **kwargs).response == first
    Answer.model_validate_json(first)
    other = client.generate(images=["b3RoZXIgaW1hZ2U="], **kwargs).response
    assert other != first


def test_chat_and_streaming(emulator) -> None:
    """Chat with an image answers a message; streams end with done and token counts."""
    client = ollama.Client(host=emulator.base_url)
    reply = client.chat(model="llava:7b", messages=[{"role": "user", "content": "hi", "images": [IMG]}])
    assert reply.message.role == "assistant" and reply.message.content
    parts = list(client.generate(model="llama3.2:3b", prompt="x", stream=True))
    assert parts[-1].done and parts[-1].eval_count and parts[-1].done_reason == "stop"


def test_errors_use_ollama_codes(emulator) -> None:
    """404 unknown model, 400 bad body, 400 think on a non-thinking model."""
    client = ollama.Client(host=emulator.base_url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope:1b", prompt="x")
    assert err.value.status_code == 404 and "not found" in err.value.error
    assert httpx.post(emulator.base_url + "/api/generate", content=b"{not json").status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3.2:3b", prompt="x", think=True)
    assert err.value.status_code == 400


@pytest.mark.parametrize("kind", ["prose", "code_fence", "truncated", "reasoning", "bad_schema"])
def test_malformed_answer_faults(emulator, kind: str) -> None:
    """Each malformed-answer fault, chosen by a prompt marker, breaks pure JSON as named."""
    client = ollama.Client(host=emulator.base_url)
    r = client.generate(model="llava:7b", prompt=f"x [[fault:{kind}]]", format=Answer.model_json_schema())
    if kind == "truncated":
        assert r.done_reason == "length"
    if kind == "bad_schema":
        assert json.loads(r.response) == {"unexpected": True}
    else:
        with pytest.raises(ValueError):
            json.loads(r.response)


def test_http_faults_hang_and_stream_error(emulator) -> None:
    """500 and 503 by header and by configured fault; a hang times out; a stream error line raises."""
    client = ollama.Client(host=emulator.base_url, headers={"X-Emulator-Fault": "http_500"})
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llava:7b", prompt="x")
    assert err.value.status_code == 500
    emulator.set_faults([{"kind": "http_503", "count": 1}])
    plain = ollama.Client(host=emulator.base_url)
    with pytest.raises(ollama.ResponseError) as err:
        plain.generate(model="llava:7b", prompt="x")
    assert err.value.status_code == 503
    plain.generate(model="llava:7b", prompt="x")  # count exhausted
    with pytest.raises(httpx.TimeoutException):
        ollama.Client(host=emulator.base_url, timeout=0.5).generate(model="llava:7b", prompt="[[fault:hang]]")
    with pytest.raises(ollama.ResponseError):
        list(plain.generate(model="llava:7b", prompt="[[fault:stream_error]]" + "x" * 200, stream=True))


def test_capacity_limits_parallel_calls_and_rejects_past_the_queue() -> None:
    """parallel=2 serialises 4 calls into two waves; a full queue answers 503 busy."""
    with EmulatorServer(EmulatorConfig(port=0, latency_ms=200, parallel=2, max_queue=1)) as server:
        client = ollama.Client(host=server.base_url)

        def call(_: int) -> int:
            try:
                client.generate(model="llama3.2:3b", prompt="x")
                return 200
            except ollama.ResponseError as exc:
                return exc.status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(call, range(6)))
        assert time.perf_counter() - started >= 0.4
        assert codes.count(503) >= 1 and server.stats()["max_inflight_seen"] == 2
        assert server.stats()["rejected_busy"] == codes.count(503)


def test_no_delayed_ack_stall(emulator) -> None:
    """50 sequential calls average well under the 40 ms delayed-ACK stall."""
    client = ollama.Client(host=emulator.base_url)
    client.generate(model="llama3.2:3b", prompt="warm up")
    started = time.perf_counter()
    for _ in range(50):
        client.generate(model="llama3.2:3b", prompt="x")
    assert (time.perf_counter() - started) / 50 < 0.015
    assert emulator.stats()["model_calls"] == 51
