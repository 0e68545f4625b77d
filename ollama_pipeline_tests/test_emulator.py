"""The emulator speaks Ollama v0.32.15's protocol to the real `ollama` client; each behaviour row of the
emulator issue has a test naming the Ollama source file (at tag v0.32.15) it follows."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import ollama
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMG = png()
OTHER = png(colour=(10, 200, 10))
NOT_AN_IMAGE = base64.b64encode(b"hello world").decode()


class Item(BaseModel):
    name: str = Field(max_length=20)
    score: float = Field(ge=0, le=1)


class Answer(BaseModel):
    caption: str
    verdict: Literal["good", "poor"]
    count: int = Field(ge=1, le=5)
    items: list[Item] = Field(min_length=1, max_length=3)
    note: str | None = None


def post(server: EmulatorServer, path: str, body: object) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=30)


def wait_for(predicate, what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_metadata_endpoints_answer_like_ollama(emulator) -> None:
    """version 0.32.15, tags with digests, show with capabilities, ps after a call (server/routes.go)."""
    client = ollama.Client(host=emulator.base_url)
    assert httpx.get(emulator.base_url + "/").text == "Ollama is running"
    assert httpx.get(emulator.base_url + "/api/version").json()["version"] == "0.32.15"
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
    assert client.generate(images=[OTHER], **kwargs).response != first


def test_chat_and_streaming(emulator) -> None:
    """Chat with an image answers a message; streams end with done and token counts."""
    client = ollama.Client(host=emulator.base_url)
    reply = client.chat(model="llava:7b", messages=[{"role": "user", "content": "hi", "images": [IMG]}])
    assert reply.message.role == "assistant" and reply.message.content
    parts = list(client.generate(model="llama3.2:3b", prompt="x", stream=True))
    assert parts[-1].done and parts[-1].eval_count and parts[-1].done_reason == "stop"


# ---- one test per behaviour row -------------------------------------------------------------------------

def test_503_only_when_the_queue_of_requests_waiting_for_a_load_is_full() -> None:
    """server/sched.go getRunner: a loaded model's requests wait on the runner; only loads queue (MAX_QUEUE)."""
    config = EmulatorConfig(port=0, profile="rtx3090", time_scale=10, max_queue=1)
    with EmulatorServer(config) as server:
        body = {"model": "llama3.2:3b", "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
        with ThreadPoolExecutor(6) as pool:  # six calls while llama3.2 loads (about 0.4 s here)
            codes = [r.status_code for r in pool.map(lambda _: post(server, "/api/generate", body), range(6))]
        assert 503 in codes and 200 in codes
        assert server.stats()["rejected_busy"] == codes.count(503)
        with ThreadPoolExecutor(6) as pool:  # loaded now: NUM_PARALLEL=1, yet all six wait and succeed
            codes = [r.status_code for r in pool.map(lambda _: post(server, "/api/generate", body), range(6))]
        assert codes == [200] * 6
        assert server.stats()["models"]["llama3.2:3b"]["max_concurrent"] == 1


def test_stream_sends_each_chunk_while_the_answer_is_still_decoding() -> None:
    """server/routes.go streamResponse: chunks are written as the runner produces them."""
    with EmulatorServer(EmulatorConfig(port=0, profile="rtx3090", time_scale=1)) as server:
        post(server, "/api/generate", {"model": "llama3.2:3b", "prompt": "", "stream": False})  # load first
        body = {"model": "llama3.2:3b", "prompt": "describe a long scene " * 5, "options": {"num_predict": 60}}
        with httpx.stream("POST", server.base_url + "/api/generate", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = json.loads(next(lines))
            assert first["done"] is False
            assert server.stats()["inflight"] == 1  # the first chunk arrived before the call finished
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done"] is True and rest[-1]["eval_count"] <= 60


def test_invalid_format_option_types_field_types_and_num_predict(emulator) -> None:
    """llm/llama_server.go Completion (format), api/types.go Options.FromMap (options), encoding/json (fields)."""
    r = post(emulator, "/api/generate", {"model": "llama3.2:3b", "prompt": "x", "format": "yaml", "stream": False})
    assert r.status_code == 500
    assert r.json()["error"] == 'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object'
    r = post(emulator, "/api/generate", {"model": "llama3.2:3b", "prompt": "x", "options": {"temperature": "hot"}})
    assert (r.status_code, r.json()["error"]) == (500, 'option "temperature" must be of type float32')
    r = post(emulator, "/api/generate", {"model": "llama3.2:3b", "prompt": 3})
    assert r.status_code == 400
    assert r.json()["error"] == "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"
    client = ollama.Client(host=emulator.base_url)
    cut = client.generate(model="llama3.2:3b", prompt="Describe a harbour at dawn in detail.", options={"num_predict": 3})
    assert cut.done_reason == "length" and cut.eval_count == 3


def test_thinking_model_thinks_by_default_and_spends_the_tokens(emulator) -> None:
    """server/routes.go GenerateHandler/ChatHandler: think defaults to true for models that can think."""
    client = ollama.Client(host=emulator.base_url)
    thought = client.generate(model="qwen3:4b", prompt="name a colour")
    assert thought.thinking and thought.eval_count > len(thought.response) / 4 + 50
    chat = client.chat(model="qwen3:4b", messages=[{"role": "user", "content": "name a colour"}])
    assert chat.message.thinking
    plain = client.generate(model="qwen3:4b", prompt="name a colour", think=False)
    assert not plain.thinking and plain.eval_count < thought.eval_count
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3.2:3b", prompt="x", think=True)
    assert err.value.status_code == 400 and err.value.error == '"llama3.2:3b" does not support thinking'


def test_images_to_a_text_model_and_non_image_bytes_are_refused(emulator) -> None:
    """llm/llama_server.go Completion passes media to llama-server, which refuses both (400, its error body)."""
    client = ollama.Client(host=emulator.base_url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3.2:3b", prompt="what is this?", images=[IMG])
    assert err.value.status_code == 400 and "does not support multimodal requests" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llava:7b", prompt="what is this?", images=[NOT_AN_IMAGE])
    assert err.value.status_code == 400 and "Failed to load image or audio file" in err.value.error


def test_empty_prompt_loads_keep_alive_zero_unloads_and_keep_alive_expires() -> None:
    """server/routes.go (done_reason load/unload), server/sched.go (expires_at, unload after keep_alive)."""
    with EmulatorServer(EmulatorConfig(port=0, profile="rtx3090", time_scale=100)) as server:
        client = ollama.Client(host=server.base_url)
        assert client.generate(model="gemma3:4b", prompt="").done_reason == "load"
        assert [m.model for m in client.ps().models] == ["gemma3:4b"]
        assert client.generate(model="gemma3:4b", prompt="", keep_alive=0).done_reason == "unload"
        wait_for(lambda: not client.ps().models, "the unload")
        client.generate(model="gemma3:4b", prompt="hi", keep_alive="30s", options={"num_predict": 2})
        ps = client.ps().models
        assert ps and ps[0].expires_at is not None
        wait_for(lambda: not client.ps().models, "keep_alive 30s (0.3 s at time scale 100) to pass")
        assert server.stats()["models"]["gemma3:4b"]["unloads"] == 2
        r = post(server, "/api/generate", {"model": "gemma3:4b", "prompt": "", "keep_alive": "abc"})
        assert (r.status_code, r.json()["error"]) == (400, 'time: invalid duration "abc"')


def test_model_names_durations_and_context(emulator) -> None:
    """server/routes.go GenerateHandler and types/model ParseName: names, total ⊇ load, final `context`."""
    r = post(emulator, "/api/generate", {"model": "", "prompt": "x"})
    assert (r.status_code, r.json()["error"]) == (404, "model '' not found")
    client = ollama.Client(host=emulator.base_url)
    assert client.generate(model="LLaVA:7B", prompt="hi").done  # case-insensitive
    assert client.generate(model="llama3.2", prompt="hi").done  # :latest implied
    final = client.generate(model="llama3.2:3b", prompt="hi", keep_alive=0)
    assert final.total_duration >= final.load_duration and final.context


def test_embed_embeddings_pull_show_and_tools(emulator) -> None:
    """server/routes.go EmbedHandler, EmbeddingsHandler, PullHandler, ShowHandler and ChatHandler (tools)."""
    client = ollama.Client(host=emulator.base_url)
    out = client.embed(model="nomic-embed-text", input=["a cat", "a dog"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 768 and out.prompt_eval_count
    assert len(client.embeddings(model="nomic-embed-text", prompt="a cat").embedding) == 768
    statuses = [p.status for p in client.pull("gemma3:4b", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    with pytest.raises(ollama.ResponseError):
        client.pull("no-such-model:1b")
    info = client.show("qwen2.5vl:7b")
    assert info.modelinfo["qwen25vl.context_length"] == 128000 and "vision" in info.capabilities
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    reply = client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "weather?"}], tools=[tool])
    assert reply.message.tool_calls and reply.message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llava:7b", messages=[{"role": "user", "content": "weather?"}], tools=[tool])
    assert err.value.status_code == 400 and err.value.error.endswith("llava:7b does not support tools")


def test_format_json_answers_follow_the_shape_the_prompt_asks_for(emulator) -> None:
    """A model told `Format: {...}` answers with those keys (as the caption prompts of real clients expect)."""
    client = ollama.Client(host=emulator.base_url)
    prompt = ('Beschreibe das Bild. Gib nur das JSON-Objekt aus. Format: '
              '{"caption":"...","contradictions":[],"missing":[],"rationale":"..."}')
    answer = json.loads(client.generate(model="llava:7b", prompt=prompt, images=[IMG], format="json").response)
    assert set(answer) == {"caption", "contradictions", "missing", "rationale"} and isinstance(answer["missing"], list)
    scored = json.loads(client.generate(model="llava:7b", prompt='Bewerte (0-100). Format: {"quality_score":0}',
                                        images=[IMG], format="json").response)
    assert 0 <= scored["quality_score"] <= 100


# ---- faults and capacity (the emulator's own) -----------------------------------------------------------

def test_errors_use_ollama_codes(emulator) -> None:
    """404 unknown model, 400 bad body, 400 missing body."""
    client = ollama.Client(host=emulator.base_url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope:1b", prompt="x")
    assert err.value.status_code == 404 and err.value.error == "model 'nope:1b' not found"
    r = httpx.post(emulator.base_url + "/api/generate", content=b"{not json")
    assert (r.status_code, r.json()["error"]) == (400, "invalid character 'n' looking for beginning of object key string")
    assert httpx.post(emulator.base_url + "/api/generate", content=b"").json()["error"] == "missing request body"


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


def test_parallel_slots_serialise_calls_on_a_loaded_model() -> None:
    """parallel=2 on the flat host: at most two calls of a model run at once; the others wait, none fails."""
    with EmulatorServer(EmulatorConfig(port=0, latency_ms=100, parallel=2)) as server:
        client = ollama.Client(host=server.base_url)
        client.generate(model="llama3.2:3b", prompt="")  # loaded

        def call(_: int) -> int:
            try:
                client.generate(model="llama3.2:3b", prompt="x")
                return 200
            except ollama.ResponseError as exc:
                return exc.status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(call, range(6)))
        assert codes == [200] * 6 and server.stats()["max_inflight_seen"] == 2


def test_every_accepted_connection_has_tcp_nodelay(emulator) -> None:
    """Responses never wait ~40 ms for a delayed ACK: each socket the server accepted has TCP_NODELAY set, so
    a small write goes out at once (asyncio sets it on IPPROTO_TCP sockets, base_events._set_nodelay; the
    effect in ms is measured by `python -m ollama_pipeline.bench.emulator_calls`, not here)."""
    with httpx.Client(base_url=emulator.base_url, timeout=30) as client:  # keep-alive: the connection stays open
        for _ in range(3):
            answer = client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "x", "stream": False})
            assert answer.status_code == 200
        connections = list(emulator._server.server_state.connections)
        assert connections, "the client's keep-alive connection is open on the server"
        for protocol in connections:
            accepted = protocol.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert emulator.stats()["model_calls"] == 3


def test_a_client_that_goes_away_frees_its_slot() -> None:
    """server/sched.go useLoadedRunner: a request ends when its context is done (the client disconnected)."""
    with EmulatorServer(EmulatorConfig(port=0, parallel=1)) as server:
        with pytest.raises(httpx.TimeoutException):
            ollama.Client(host=server.base_url, timeout=0.5).generate(model="llava:7b", prompt="[[fault:hang]]")
        # the one slot is free again: without the disconnect this call would wait the 120 s hang out
        assert ollama.Client(host=server.base_url, timeout=20).generate(model="llava:7b", prompt="hi").done
