"""The emulator's cost model: modeled durations and counters equal a hand computation from the profiles' constants."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import httpx
from PIL import Image

from ollama_pipeline.emulator import MODELS, EmulatorConfig, EmulatorServer

ROOT = Path(__file__).resolve().parents[1]


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 200)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tokens(text: str) -> int:
    """The documented rule: one token per 4 characters."""
    return math.ceil(len(text) / 4)


def ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def test_durations_and_counters_equal_a_hand_computation() -> None:
    """Prefill, decode, a prefix-cache hit, a reload on a num_ctx change and an eviction under MAX_LOADED_MODELS=1."""
    # constants as docs/emulator_profiles.md states them (the RTX 3090 anchor of llama.cpp PR #4766)
    gemma_prefill, gemma_decode, gemma_load = 3408 * 6.74 / 4.3, 190.0, 9.4 * 3.1 / 4.4
    llama_prefill, llama_decode, llama_load = 3408 * 6.74 / 3.21, 121.8 * 3.56 / 1.9, 9.4 * 1.9 / 4.4
    header, footer = tokens("<|user|>\n"), tokens("<|assistant|>\n")
    image = png(64, 48)  # gemma3: 256 tokens per image, whatever its size
    config = EmulatorConfig(port=0, profile="rtx3090", max_loaded_models=1, time_scale=1000, keep_alive_s=3600)
    with EmulatorServer(config) as server:
        def generate(model: str, prompt: str, **extra: object) -> dict:
            r = httpx.post(server.base_url + "/api/generate", timeout=60,
                           json={"model": model, "prompt": prompt, "stream": False, **extra})
            assert r.status_code == 200, r.text
            return r.json()

        p1, p2 = "Describe the picture briefly.", "Describe the picture in detail."
        first = generate("gemma3:4b", p1, images=[image], options={"num_ctx": 4096})
        n1 = header + 256 + tokens(p1 + "\n") + footer
        assert first["prompt_eval_count"] == n1
        assert first["prompt_eval_duration"] == ns(n1 / gemma_prefill)
        assert first["eval_count"] == tokens(first["response"])  # the answer's own tokens, its length drawn
        assert first["eval_duration"] == ns(tokens(first["response"]) / gemma_decode)
        assert first["load_duration"] == ns(gemma_load)
        assert first["total_duration"] == ns(gemma_load + n1 / gemma_prefill + first["eval_count"] / gemma_decode)

        # same image, same first 20 characters of the question: header + image + 5 text tokens are cached
        second = generate("gemma3:4b", p2, images=[image], options={"num_ctx": 4096})
        n2 = header + 256 + tokens(p2 + "\n") + footer
        cached = header + 256 + 5
        assert second["prompt_eval_count"] == n2  # cached tokens still count (llama-server cache_n + prompt_n)
        assert second["prompt_eval_duration"] == ns((n2 - cached) / gemma_prefill)
        assert second["load_duration"] == 0

        # another num_ctx is another runner: reload (sched.go needsReload), empty cache
        third = generate("gemma3:4b", p2, images=[image], options={"num_ctx": 8192})
        assert third["load_duration"] == ns(gemma_load)
        assert third["prompt_eval_duration"] == ns(n2 / gemma_prefill)

        # MAX_LOADED_MODELS=1: a second model evicts the first
        p4 = "Normalize these tags: cat, kitty."
        fourth = generate("llama3.2:3b", p4)
        n4 = header + tokens(p4 + "\n") + footer
        assert fourth["load_duration"] == ns(llama_load)
        assert fourth["prompt_eval_duration"] == ns(n4 / llama_prefill)
        assert fourth["eval_duration"] == ns(tokens(fourth["response"]) / llama_decode)
        # num_predict cuts decoding: 7 tokens decoded, 7 charged (llm/llama_server.go Completion)
        cut = generate("llama3.2:3b", p4 + " Again.", options={"num_predict": 7})
        assert (cut["done_reason"], cut["eval_count"], len(cut["response"])) == ("length", 7, 28)
        assert cut["eval_duration"] == ns(7 / llama_decode)

        stats = server.stats()
        gemma, llama = stats["models"]["gemma3:4b"], stats["models"]["llama3.2:3b"]
        assert (gemma["loads"], gemma["reloads"], gemma["evictions"], llama["loads"]) == (2, 1, 1, 1)
        assert gemma["cache_hits"] == 1 and gemma["cached_tokens"] == cached
        assert gemma["image_tokens"] == 3 * 256 and gemma["image_tokens_cached"] == 256
        assert gemma["prefill_tokens"] == n1 + (n2 - cached) + n2
        assert math.isclose(stats["gpu_s"]["load_s"], 2 * gemma_load + llama_load, rel_tol=1e-6)
        decoded = sum(r["eval_count"] for r in (first, second, third))
        assert gemma["output_tokens"] == decoded
        assert math.isclose(gemma["decode_s"], decoded / gemma_decode, rel_tol=1e-6)
        assert stats["loaded"] == ["llama3.2:3b"]


def test_forced_parallel_and_memory_follow_sched_go() -> None:
    """sched.go load(): qwen3vl and embedding models get one slot whatever OLLAMA_NUM_PARALLEL says."""
    with EmulatorServer(EmulatorConfig(port=0, profile="rtx3090-parallel4", time_scale=1000)) as server:
        profile = httpx.get(server.base_url + "/_emulator/profile").json()
        assert profile["models"]["qwen3-vl:8b"]["parallel"] == 1
        assert profile["models"]["nomic-embed-text:latest"]["parallel"] == 1
        assert profile["models"]["qwen2.5vl:7b"]["parallel"] == 4
        assert profile["default_num_ctx"] == 32768  # 24 GiB of VRAM: routes.go's 32k tier


def test_every_shipped_model_cites_its_sources_in_the_docs_table() -> None:
    """Each model profile names its source, and docs/emulator_profiles.md has a row for it."""
    table = (ROOT / "docs" / "emulator_profiles.md").read_text()
    for name, model in MODELS.items():
        assert model.source, name
        assert f"`{name}`" in table, name


def test_readme_commands_start_several_emulated_hosts() -> None:
    """The README's `ollama-pipeline emulator --profile ...` lines each start a host with that profile.

    The first line runs through the `ollama-pipeline` entry point as written; the others run the same
    arguments through `python -m ollama_pipeline.emulator` (the same parser, without the CLI's imports).
    """
    import re
    import shutil
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The Ollama emulator", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^ollama-pipeline emulator (.+?) &$", section, flags=re.M)
    assert len(commands) >= 2
    exe = shutil.which("ollama-pipeline", path=str(Path(sys.executable).parent)) or "ollama-pipeline"
    procs = []
    try:
        for i, args in enumerate(commands):
            argv = re.sub(r"--port \d+", "--port 0", args).split()
            head = [exe, "emulator"] if i == 0 else [sys.executable, "-m", "ollama_pipeline.emulator"]
            proc = subprocess.Popen([*head, *argv], stdout=subprocess.PIPE, text=True)
            procs.append((proc, argv[argv.index("--profile") + 1]))
        for proc, profile in procs:
            line = proc.stdout.readline()
            assert f"(profile {profile}) listening on" in line, line
            url = line.rsplit(" ", 1)[1].strip()
            assert httpx.get(url + "/_emulator/profile", timeout=10).json()["profile"] == profile
            assert httpx.get(url + "/api/version", timeout=10).json()["version"] == "0.32.15"
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=20)
