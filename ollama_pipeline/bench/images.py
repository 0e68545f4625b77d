"""The image measurement of the bench: what downscaling to the pixel budget saves per model call.

Large PNGs (default four of 4096×4096, like the biggest files of a generator's output folder) are sent
to the emulator (no latency, so only the pipeline's own cost shows) twice: as the file's bytes in base64
(what a naive client does) and prepared the way the pipeline sends every image (decoded, downscaled to
`pipeline.max_pixels`, JPEG within `ollama.max_image_bytes`). Reported per call: bytes sent and
milliseconds, preparation included.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from ollama_pipeline.bench.harness import EmulatorProcess, bench_settings
from ollama_pipeline.core.images import prepare_image_bytes
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import STAGES


def large_png(path: Path, side: int, seed: int) -> bytes:
    """A generator-like picture: gradients, shapes and fine grain (so PNG cannot squeeze it to nothing)."""
    base = Image.linear_gradient("L").resize((side, side))
    img = Image.merge("RGB", (base, base.rotate(90 + seed), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x, y = (seed * 97 + i * 331) % side, (seed * 53 + i * 211) % side
        draw.ellipse((x, y, x + side // 5, y + side // 6), fill=((i * 40) % 256, (seed * 70) % 256, (i * 90) % 256))
    grain = Image.effect_noise((side, side), 24).convert("RGB").filter(ImageFilter.SMOOTH)
    img = Image.blend(img, grain, 0.12)
    img.save(path, format="PNG")
    return path.read_bytes()


def image_effect(workdir: Path, *, count: int = 4, side: int = 4096) -> dict[str, Any]:
    """Per call: bytes and ms for the original file in base64 vs the prepared image."""
    folder = workdir / "large_images"
    folder.mkdir(parents=True, exist_ok=True)
    files = [large_png(folder / f"large_{i}.png", side, i) for i in range(count)]
    with EmulatorProcess(latency_ms=0, parallel=4) as emulator:
        settings = bench_settings(workdir, emulator.base_url)
        pipeline = Pipeline.from_settings(settings)
        stage = STAGES["ollama_caption"]
        options = pipeline.options_for(stage)
        pipeline.client.health()
        raw_ms, prepared_ms, raw_bytes, sent_bytes = [], [], [], []
        for data in files:
            started = time.perf_counter()
            b64 = base64.b64encode(data).decode()
            pipeline.client.analyze_image(b64, "Describe this image.", options)
            raw_ms.append((time.perf_counter() - started) * 1000)
            raw_bytes.append(len(data))
            started = time.perf_counter()
            image = prepare_image_bytes(data, "large.png", max_image_bytes=settings.ollama.max_image_bytes,
                                        max_pixels=settings.pipeline.max_pixels)
            pipeline.client.analyze_image(image.b64, "Describe this image.", options)
            prepared_ms.append((time.perf_counter() - started) * 1000)
            sent_bytes.append(image.sent_bytes)
        pipeline.client.close()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"images": count, "side_px": side, "source_bytes_mean": round(mean(raw_bytes)),
            "sent_bytes_mean": round(mean(sent_bytes)), "bytes_ratio": round(mean(raw_bytes) / mean(sent_bytes), 1),
            "original_ms_per_call": round(mean(raw_ms), 1), "prepared_ms_per_call": round(mean(prepared_ms), 1),
            "time_ratio": round(mean(raw_ms) / mean(prepared_ms), 2), "max_pixels": settings.pipeline.max_pixels}
