"""Image preparation (§1 media file): read `media.path` inside the media root, check, downscale, encode.

Paths are resolved (symlinks included) and must stay inside the configured media root. Images are
downscaled to the pixel budget and re-encoded until they fit `ollama.max_image_bytes`, so the bytes sent
per image stay bounded whatever the source size. Output is deterministic for the same file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel

from ollama_pipeline.core.errors import ValidationError

# Anything larger than this many source pixels is refused as a decompression bomb.
MAX_SOURCE_PIXELS = 120_000_000


class PreparedImage(BaseModel):
    """An image ready to send: base64 JPEG plus what it was made from."""

    b64: str
    source_sha256: str
    source_bytes: int
    source_width: int
    source_height: int
    width: int
    height: int
    sent_bytes: int

    def __repr__(self) -> str:  # never print the base64
        return f"PreparedImage({self.width}x{self.height}, {self.sent_bytes} bytes, sha256={self.source_sha256[:12]})"

    __str__ = __repr__


def resolve_media_path(media_root: Path, media_path: str) -> Path:
    """The file for media.path, refused when it escapes the media root (.., absolute, symlink out)."""
    if not media_path or "\x00" in media_path:
        raise ValidationError("media.path is empty or invalid", code="validation.path_outside_root")
    root = Path(media_root).resolve()
    candidate = Path(media_path)
    full = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = full.resolve()
    except (OSError, RuntimeError) as exc:
        raise ValidationError(f"media.path cannot be resolved: {exc}", code="validation.path_outside_root") from None
    if resolved != root and root not in resolved.parents:
        raise ValidationError(f"media.path {media_path!r} points outside the media root",
                              code="validation.path_outside_root")
    return resolved


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_media_file(media_root: Path, media_path: str) -> tuple[Path, bytes]:
    """Resolve and read the media file, with typed errors for missing files."""
    path = resolve_media_path(media_root, media_path)
    if not path.is_file():
        raise ValidationError(f"media file {media_path!r} does not exist", code="validation.file_missing")
    return path, path.read_bytes()


def open_image(data: bytes, label: str) -> Image.Image:
    """Decode bytes into a loaded RGB image or raise validation.image_corrupt."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_SOURCE_PIXELS:
                raise ValidationError(f"{label} has {img.width}x{img.height} pixels, more than allowed",
                                      code="validation.image_too_large")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ValidationError(f"{label} cannot be decoded as an image: {type(exc).__name__}",
                              code="validation.image_corrupt") from None
    if img.mode != "RGB":
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.split()[-1])
        img = background
    return img


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / float(width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def prepare_image(media_root: Path, media_path: str, *, max_image_bytes: int, max_pixels: int) -> PreparedImage:
    """Read, decode, downscale to the pixel budget and JPEG-encode until it fits max_image_bytes."""
    _, data = read_media_file(media_root, media_path)
    return prepare_image_bytes(data, media_path, max_image_bytes=max_image_bytes, max_pixels=max_pixels)


def prepare_image_bytes(data: bytes, media_path: str, *, max_image_bytes: int, max_pixels: int) -> PreparedImage:
    """Decode bytes already read, downscale to the pixel budget and JPEG-encode to fit max_image_bytes."""
    img = open_image(data, f"media file {media_path!r}")
    src_w, src_h = img.size
    width, height = fit_pixels(src_w, src_h, max_pixels)
    quality = 90
    while True:
        scaled = img if (width, height) == img.size else img.resize((width, height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        scaled.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
        encoded = buffer.getvalue()
        if len(encoded) <= max_image_bytes:
            break
        if quality > 60:
            quality -= 15
        elif width > 64 and height > 64:
            width, height = max(1, int(width * 0.75)), max(1, int(height * 0.75))
        else:
            raise ValidationError(
                f"media file {media_path!r} cannot be made to fit ollama.max_image_bytes={max_image_bytes}",
                code="validation.image_too_large")
    return PreparedImage(
        b64=base64.b64encode(encoded).decode("ascii"),
        source_sha256=hashlib.sha256(data).hexdigest(),
        source_bytes=len(data), source_width=src_w, source_height=src_h,
        width=width, height=height, sent_bytes=len(encoded),
    )


def dhash(img: Image.Image, size: int = 8) -> str:
    """A 64-bit difference hash (hex) for finding near-duplicates cheaply."""
    small = img.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    bits = 0
    for row in range(size):
        for col in range(size):
            left = pixels[row * (size + 1) + col]
            right = pixels[row * (size + 1) + col + 1]
            bits = (bits << 1) | (1 if left > right else 0)
    return f"{bits:016x}"


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")
