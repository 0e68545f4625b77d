"""Model and host profiles: what an emulated Ollama serves and what each call costs.

A model profile holds what Ollama would report for the model (architecture, capabilities, context length,
size) and what the cost model needs (image tokens per image, prefill and decode tokens per second, load
seconds, memory). A host profile holds the server's environment (OLLAMA_NUM_PARALLEL, MAX_LOADED_MODELS,
MAX_QUEUE, KEEP_ALIVE, the GPU memory) and the models it has pulled. Every shipped constant names its source
in a comment; docs/emulator_profiles.md has the same table for readers. Must not import the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

GIB = 1024**3

# Decode is bound by memory bandwidth, prefill by compute. The anchor is llama.cpp's own CUDA measurement of
# a 7B Q4_0 model on an RTX 3090 (ggml-org/llama.cpp PR #4766: pp512 3408 t/s, tg128 121.8 t/s, 3.56 GiB of
# weights). Other sizes scale from it: decode by weight bytes, prefill by parameter count. Checked against
# one direct measurement: gemma3 4B Q4_K_M tg ~190 t/s on an RTX 3090 (calebcoffie.com/benchmarks).
ANCHOR_PREFILL_TPS = 3408.0
ANCHOR_DECODE_TPS = 121.8
ANCHOR_WEIGHTS_GIB = 3.56
ANCHOR_PARAMS_B = 6.74
# One logged load of a 7B-class vision model took 9.4 s (ollama issue #12027); loads scale with file size.
ANCHOR_LOAD_S = 9.4
ANCHOR_LOAD_GIB = 4.4


@dataclass(frozen=True)
class ImageRule:
    """How many prompt tokens one image costs (per family; see docs/emulator_profiles.md)."""

    kind: str  # "fixed" | "tiles" | "patches"
    tokens: int = 0  # fixed: tokens per image; tiles: tokens of the first tile
    patch: int = 0  # patches: pixels per token side
    per_tile: int = 0  # tiles: tokens of each further tile
    tile: int = 0  # tiles: tile side in pixels
    max_tiles: int = 1
    min_tokens: int = 0
    max_tokens: int = 0

    def tokens_for(self, width: int, height: int) -> int:
        """Prompt tokens for one width×height image."""
        if self.kind == "fixed":
            return self.tokens
        if self.kind == "tiles":
            tiles = min(self.max_tiles, math.ceil(width / self.tile) * math.ceil(height / self.tile))
            return self.tokens + self.per_tile * (max(1, tiles) - 1)
        count = math.ceil(width / self.patch) * math.ceil(height / self.patch)
        if self.min_tokens:
            count = max(count, self.min_tokens)
        if self.max_tokens:
            count = min(count, self.max_tokens)
        return count


@dataclass(frozen=True)
class ModelProfile:
    """One model as an Ollama host reports and runs it."""

    name: str
    architecture: str  # general.architecture; also what sched.go's forced-parallel list matches
    families: tuple[str, ...]
    parameter_size: str
    params_b: float
    weights_gib: float  # file size (the model's memory before its KV cache)
    capabilities: tuple[str, ...]
    context_length: int  # <arch>.context_length (the training context)
    embedding_length: int = 0
    image: ImageRule | None = None
    kv_bytes_per_token: int = 0  # KV cache per context token (memory = weights + kv × num_ctx × parallel)
    thinking_tokens: int = 0  # mean thinking tokens when thinking is on
    quantization: str = "Q4_K_M"
    aliases: tuple[str, ...] = ()
    prefill_tps: float = 0.0  # 0: derived from the anchor (see module top)
    decode_tps: float = 0.0
    load_s: float = -1.0
    source: str = ""

    @property
    def family(self) -> str:
        return self.families[0] if self.families else self.architecture

    def rates(self) -> tuple[float, float, float]:
        """(prefill tokens/s, decode tokens/s, load seconds), derived from the anchor unless set."""
        prefill = self.prefill_tps or ANCHOR_PREFILL_TPS * ANCHOR_PARAMS_B / self.params_b
        decode = self.decode_tps or ANCHOR_DECODE_TPS * ANCHOR_WEIGHTS_GIB / self.weights_gib
        load = self.load_s if self.load_s >= 0 else ANCHOR_LOAD_S * self.weights_gib / ANCHOR_LOAD_GIB
        return prefill, decode, load

    def memory_bytes(self, num_ctx: int, parallel: int) -> int:
        return int(self.weights_gib * GIB) + self.kv_bytes_per_token * num_ctx * max(1, parallel)


# ---- shipped models ------------------------------------------------------------------------------------
# Sizes, context lengths and capabilities are those the Ollama library lists for the tag
# (ollama.com/library/<name>); image-token rules are the families' own (model cards, Ollama's runner).
MODELS: dict[str, ModelProfile] = {m.name: m for m in [
    ModelProfile(
        name="llava:7b", architecture="llama", families=("llama", "clip"), parameter_size="7B", params_b=7.24,
        weights_gib=4.4, capabilities=("completion", "vision"), context_length=32768,
        # LLaVA 1.6 "anyres": 576 tokens for the base view plus tiles of 336 px; the range 1,277–2,943 tokens
        # is the measured one (docs/emulator_profiles.md); linear in tiles between those bounds.
        image=ImageRule(kind="tiles", tokens=1277, per_tile=555, tile=336, max_tiles=4),
        kv_bytes_per_token=131072, aliases=("llava:latest", "llava"),
        source="ollama.com/library/llava (7b, 4.7 GB, llava 1.6)"),
    ModelProfile(
        name="qwen2.5vl:7b", architecture="qwen25vl", families=("qwen25vl",), parameter_size="8.3B",
        params_b=8.29, weights_gib=5.6, capabilities=("completion", "vision"), context_length=128000,
        # one token per 28×28 pixels (Qwen2.5-VL model card); Ollama starts llama-server with
        # --image-min-tokens 1024 for qwen25vl (llm/llama_server.go qwenVLServerArgs); the card's default
        # max_pixels is 16384·28·28.
        image=ImageRule(kind="patches", patch=28, min_tokens=1024, max_tokens=16384),
        kv_bytes_per_token=57344, aliases=("qwen2.5vl:latest", "qwen2.5vl"),
        source="ollama.com/library/qwen2.5vl (7b, 6.0 GB, 125K context)"),
    ModelProfile(
        name="gemma3:4b", architecture="gemma3", families=("gemma3",), parameter_size="4.3B", params_b=4.3,
        weights_gib=3.1, capabilities=("completion", "vision"), context_length=131072,
        # Gemma 3 model card: images are normalized to 896×896 and encoded to 256 tokens each.
        image=ImageRule(kind="fixed", tokens=256), kv_bytes_per_token=139264,
        decode_tps=190.0,  # measured tg on an RTX 3090, Q4_K_M (calebcoffie.com/benchmarks/gemma-3-4b-it-gguf)
        aliases=("gemma3:latest", "gemma3"), source="ollama.com/library/gemma3 (4b, 3.3 GB, 128K context)"),
    ModelProfile(
        name="qwen3-vl:8b", architecture="qwen3vl", families=("qwen3vl",), parameter_size="8.8B", params_b=8.77,
        weights_gib=5.7, capabilities=("completion", "vision", "tools", "thinking"), context_length=262144,
        # 16 px patches merged 2×2 → one token per 32×32 pixels (Qwen3-VL model card), --image-min-tokens 1024
        # (llm/llama_server.go); sched.go forces OLLAMA_NUM_PARALLEL to 1 for qwen3vl.
        image=ImageRule(kind="patches", patch=32, min_tokens=1024, max_tokens=16384),
        kv_bytes_per_token=147456, thinking_tokens=350,
        aliases=("qwen3-vl:latest", "qwen3-vl"), source="ollama.com/library/qwen3-vl (8b, 6.1 GB, 256K context)"),
    ModelProfile(
        name="llama3.2:3b", architecture="llama", families=("llama",), parameter_size="3.2B", params_b=3.21,
        weights_gib=1.9, capabilities=("completion", "tools"), context_length=131072, kv_bytes_per_token=114688,
        aliases=("llama3.2:latest", "llama3.2"), source="ollama.com/library/llama3.2 (3b, 2.0 GB, 128K context)"),
    ModelProfile(
        name="qwen3:4b", architecture="qwen3", families=("qwen3",), parameter_size="4.0B", params_b=4.02,
        weights_gib=2.4, capabilities=("completion", "tools", "thinking"), context_length=40960,
        # qwen3 thinks by default (routes.go sets think=true for models with the thinking capability); its
        # reasoning runs to hundreds of tokens before the answer (mean assumed, docs/emulator_profiles.md).
        kv_bytes_per_token=147456, thinking_tokens=350,
        aliases=("qwen3:latest", "qwen3"), source="ollama.com/library/qwen3 (4b, 2.6 GB, 40K context)"),
    ModelProfile(
        name="nomic-embed-text:latest", architecture="nomic-bert", families=("nomic-bert",), parameter_size="137M",
        params_b=0.137, weights_gib=0.26, capabilities=("embedding",), context_length=2048, embedding_length=768,
        kv_bytes_per_token=0, aliases=("nomic-embed-text",),
        source="ollama.com/library/nomic-embed-text (274 MB, 2K context, 768 dimensions)"),
]}

# ---- answer lengths -----------------------------------------------------------------------------------
# A model's answer is not a fixed length: each request draws its output tokens around the mean of its kind
# (log-normal, LENGTH_SIGMA; deterministic from the request), and the kind's free-text or tag-list fields are
# padded with plausible words to that length. The kind is recognised from the top-level keys of the JSON the
# request asks for (a schema's properties or the shape a prompt shows), so the emulator needs nothing of the
# pipeline. Tokens are the emulator's 4 characters ("1 token ~= 4 chars in English ~= 3/4 word", OpenAI,
# help.openai.com "What are tokens and how to count them"). A sentence of ~20 words is ~27 tokens (assumed
# sentence length). Every mean is a stated assumption derived from what the prompt asks for; the derivation
# is in docs/emulator_profiles.md ("Answer lengths").


@dataclass(frozen=True)
class AnswerKind:
    """One kind of answer: how to recognise it, which fields carry its length, its mean output tokens."""

    name: str
    keys: tuple[str, ...]  # an answer object with any of these top-level keys is of this kind (first match)
    grow: tuple[str, ...]  # the fields padded to the drawn length, in order (free text, or a list of tags)
    mean_tokens: int
    source: str
    max_items: int = 25  # a list grows to at most this many items (the tag prompts ask for at most 25)


SENTENCE_TOKENS = 27  # assumption: ~20 words a sentence × 4/3 tokens a word (OpenAI's rule of thumb)
LENGTH_SIGMA = 0.3  # assumption: σ of the log-normal draw (coefficient of variation ≈ 0.31, right-skewed)
ANSWER_KINDS: tuple[AnswerKind, ...] = (
    # "caption" (one sentence) + "description" (two to four sentences): 1 + 3 sentences and the JSON keys
    AnswerKind("description", ("description",), ("description",), 4 * SENTENCE_TOKENS + 7,
               "assumption: 1 caption sentence + 3 description sentences (the prompt asks for two to four)"),
    # a text-to-image prompt fills about CLIP's 77-token window, its negative prompt about a third of that
    AnswerKind("prompt", ("negative_prompt", "prompt"), ("prompt", "negative_prompt"), 95,
               "assumption: positive prompt ~ the 77-token context of the CLIP text encoder (openai/CLIP clip.tokenize) "
               "+ a negative prompt of ~20 tokens"),
    # at most 25 tags are asked for; ~15 given, each {"name": ..., "confidence": ...} ~9 tokens
    AnswerKind("tags", ("tags", "keywords"), ("tags", "keywords"), 140,
               "assumption: 15 tags of ~9 tokens each (the prompt allows at most 25)"),
    # one summary sentence, a few issues with severities, score and verdict
    AnswerKind("quality", ("summary", "issues"), ("summary",), 80,
               "assumption: 1 summary sentence (~27) + 4 issues of ~10 tokens + score and verdict (~13)"),
    AnswerKind("caption", ("caption",), ("caption", "rationale"), 65,
               "assumption: 1 caption sentence (~27) + 1 rationale sentence (~27) + the JSON keys and short lists (~11)"),
    AnswerKind("reason", ("reason", "rationale"), ("reason", "rationale"), 35,
               "assumption: a reason of a few words to one sentence + relation and confidence"),
    AnswerKind("prose", ("response",), ("response",), 150,
               "assumption: an open answer of 5–6 sentences (no JSON asked for)"),
)
# Kinds whose answer has no free text (a title, four scores, a rating with flags) keep the length of their
# structure: their content is the judgement, and padding it would change what they say.


def answer_kind(keys: Any) -> AnswerKind | None:
    """The kind of an answer object with these top-level keys (None: no kind, its natural length)."""
    names = {str(k).lower() for k in keys}
    return next((kind for kind in ANSWER_KINDS if names & set(kind.keys)), None)


PROSE = ANSWER_KINDS[-1]


# sched.go (load): "Some architectures are not safe with num_parallel > 1" (ollama issue #4165).
FORCED_PARALLEL_1 = ("mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2", "lfm2moe",
                     "nemotron_h", "nemotron_h_moe", "nemotron_h_omni")


@dataclass(frozen=True)
class HostProfile:
    """One Ollama server: its environment variables, GPU memory and pulled models."""

    name: str
    models: tuple[str, ...]
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL, default 1 since v0.9.7 (envconfig/config.go)
    max_loaded_models: int = 0  # OLLAMA_MAX_LOADED_MODELS, 0 = 3 per GPU (sched.go defaultModelsPerGPU)
    gpus: int = 1
    vram_bytes: int | None = 24 * GIB  # None: unlimited (no eviction for memory)
    max_queue: int = 512  # OLLAMA_MAX_QUEUE (envconfig/config.go)
    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE, default 5m (envconfig/config.go)
    flat_latency_ms: float | None = None  # flat cost: every call takes this long, nothing else costs
    time_scale: float = 1.0  # wall time = modeled time / time_scale
    # Speed of this host's GPU relative to the anchor card (RTX 3090: 936 GB/s, 35.6 FP32 TFLOPS, NVIDIA's
    # spec sheet). Decode scales with memory bandwidth, prefill with compute.
    decode_factor: float = 1.0
    prefill_factor: float = 1.0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_num_ctx(self) -> int:
        """The VRAM-tier default context (server/routes.go Serve: 4k below 23 GiB, 32k below 47 GiB, else 256k)."""
        total = self.vram_bytes if self.vram_bytes is not None else 0
        if total >= 47 * GIB:
            return 262144
        if total >= 23 * GIB:
            return 32768
        return 4096

    @property
    def max_runners(self) -> int:
        return self.max_loaded_models if self.max_loaded_models > 0 else 3 * max(1, self.gpus)

    def parallel_for(self, model: ModelProfile) -> int:
        """Slots of a model's runner: sched.go load() forces 1 for embeddings and some architectures."""
        if "completion" not in model.capabilities or model.architecture in FORCED_PARALLEL_1:
            return 1
        return max(1, self.num_parallel)


LEGACY_MODELS = ("llava:7b", "qwen2.5vl:7b", "llama3.2:3b", "qwen3:4b", "gemma3:4b", "qwen3-vl:8b",
                 "nomic-embed-text:latest")

HOSTS: dict[str, HostProfile] = {h.name: h for h in [
    HostProfile(
        name="flat", models=LEGACY_MODELS, num_parallel=4, max_loaded_models=len(LEGACY_MODELS), vram_bytes=None,
        flat_latency_ms=0.0,
        description="fixed latency per call, no load, prompt or output cost; for functional tests"),
    HostProfile(
        name="rtx3090", models=LEGACY_MODELS, num_parallel=1, max_loaded_models=0, vram_bytes=24 * GIB,
        description="one 24 GiB GPU with Ollama's defaults (NUM_PARALLEL 1, 3 models, queue 512, keep-alive 5m)"),
    HostProfile(
        name="rtx3090-parallel4", models=LEGACY_MODELS, num_parallel=4, max_loaded_models=0, vram_bytes=24 * GIB,
        description="as rtx3090 with OLLAMA_NUM_PARALLEL=4"),
    HostProfile(
        name="rtx4060-8g", models=LEGACY_MODELS, num_parallel=1, max_loaded_models=1, vram_bytes=8 * GIB,
        # RTX 4060: 272 GB/s and 15.1 FP32 TFLOPS (NVIDIA's spec sheet) against the RTX 3090's 936 and 35.6
        decode_factor=272 / 936, prefill_factor=15.1 / 35.6,
        description="an 8 GiB GPU where one vision model fits at a time (OLLAMA_MAX_LOADED_MODELS=1)"),
]}


def host_profile(name: str, **overrides: Any) -> HostProfile:
    """A shipped host profile by name, with fields overridden (None values are ignored)."""
    if name not in HOSTS:
        raise KeyError(f"unknown emulator profile {name!r}; known: {', '.join(HOSTS)}")
    return replace(HOSTS[name], **{k: v for k, v in overrides.items() if v is not None})
