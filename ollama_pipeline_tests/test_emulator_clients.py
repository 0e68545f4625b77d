"""The official clients no one here wrote — Python `ollama` and JS `ollama` (npm) — against the emulator,
through every endpoint the pipeline and those clients use that the emulator serves."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import ollama
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / ".node"  # ignored; `make jsclient` (part of `make test`) installs the package here
SCRIPT = Path(__file__).parent / "js" / "official_client.mjs"


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (30, 90, 160)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_official_python_client_uses_every_endpoint(emulator) -> None:
    """ollama-python: version is not in it; list, show, generate, chat, tools, embed, embeddings, pull, ps, copy, delete."""
    client = ollama.Client(host=emulator.base_url)
    image = png()
    assert "llava:7b" in [m.model for m in client.list().models]
    assert "vision" in client.show("llava:7b").capabilities
    answer = client.generate(model="llava:7b", prompt='Describe. Format: {"caption":"...","tags":[]}',
                             images=[image], format="json", options={"seed": 3, "temperature": 0})
    assert set(json.loads(answer.response)) == {"caption", "tags"}
    parts = list(client.generate(model="llama3.2:3b", prompt="tell me a story", stream=True))
    assert len(parts) > 1 and parts[-1].done and parts[-1].eval_count
    chat = client.chat(model="qwen3:4b", messages=[{"role": "user", "content": "name a colour"}])
    assert chat.message.content and chat.message.thinking
    streamed = list(client.chat(model="llava:7b", stream=True,
                                messages=[{"role": "user", "content": "what is this?", "images": [image]}]))
    assert streamed[-1].done and "".join(p.message.content for p in streamed)
    tool = {"type": "function", "function": {"name": "lookup", "description": "look up", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
    reply = client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "find it"}], tools=[tool])
    assert reply.message.tool_calls[0].function.name == "lookup"
    assert [len(e) for e in client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings] == [768, 768]
    assert len(client.embeddings(model="nomic-embed-text", prompt="a").embedding) == 768
    assert client.pull("gemma3:4b").status == "success"
    assert "llava:7b" in [m.model for m in client.ps().models]
    client.copy("gemma3:4b", "my-gemma")
    assert "my-gemma:latest" in [m.model for m in client.list().models]
    client.delete("my-gemma")
    assert "my-gemma:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model:1b")
    assert err.value.status_code == 404


def test_official_python_async_client_streams(emulator) -> None:
    """ollama-python's AsyncClient: concurrent streamed generate and chat calls all finish."""
    async def main() -> list[int]:
        client = ollama.AsyncClient(host=emulator.base_url)

        async def one(i: int) -> int:
            count = 0
            async for _ in await client.generate(model="llama3.2:3b", prompt=f"story {i}", stream=True):
                count += 1
            return count

        return await asyncio.gather(*(one(i) for i in range(4)))

    assert all(n > 1 for n in asyncio.run(main()))


def _js_client() -> Path:
    module = NODE_DIR / "node_modules" / "ollama" / "dist" / "index.mjs"
    if not module.exists():  # the test set-up installs it when `make jsclient` has not
        npm = shutil.which("npm")
        assert npm, "npm is needed for the JS client test (Debian: apt-get install npm)"
        subprocess.run([npm, "install", "--prefix", str(NODE_DIR), "--no-save", "--no-audit", "--no-fund",
                        "ollama@^0.6"], check=True, capture_output=True, timeout=300)
    return module


def test_official_js_client_uses_every_endpoint(emulator) -> None:
    """ollama-js (npm `ollama`, run by node): version, list, show, generate, chat, tools, embed, pull, ps, copy, delete."""
    node = shutil.which("node")
    assert node, "node is needed for the JS client test"
    done = subprocess.run([node, str(SCRIPT), _js_client().as_uri(), emulator.base_url, png()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["version"] == "0.32.15"
    assert "llava:7b" in out["list"] and "vision" in out["show"]
    assert set(out["generate"]) == {"caption", "tags"}
    assert out["generateStream"]["chunks"] > 1 and out["generateStream"]["done"] is True
    assert out["chat"] == {"content": True, "thinking": True} and out["chatStream"] > 0
    assert out["tools"] == ["get_weather"]
    assert out["embed"] == [768, 768] and out["embeddings"] == 768
    assert out["pull"] == ["pulling manifest", "success"]
    assert "llava:7b" in out["ps"] and out["copied"] and out["deleted"]
    assert out["error"] == {"status": 404, "message": "model 'no-such-model:1b' not found"}
