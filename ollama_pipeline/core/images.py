"""Media preparation (§1 media file): find `media.path` inside the media root, read, check, decode,
downscale, encode.

Paths are resolved (symlinks included) and must stay inside the configured media root; a name stored in
the other Unicode normalization (NFC in the database, NFD on disk, or the reverse) is found too. What is
read: PNG, JPEG (EXIF orientation applied), WebP, GIF (first frame), TIFF, BMP, AVIF (Pillow's own
plugin) and HEIC/HEIF (pillow-heif), and videos through one representative frame decoded with PyAV (the
middle frame, passing over black frames). Anything else is refused with
`validation.unsupported_media_type`, which the runner reports as skipped, not failed. Images are
downscaled to the pixel budget and re-encoded until they fit `ollama.max_image_bytes`, so the bytes sent
per image stay bounded whatever the source size. Output is deterministic for the same file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import unicodedata
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError
from pydantic import BaseModel

from ollama_pipeline.core.errors import ValidationError

try:  # HEIC/HEIF: a declared dependency; kept optional so a broken wheel only loses that format
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - depends on the installation
    HEIF_SUPPORTED = False

# Anything larger than this many source pixels is refused as a decompression bomb (validation.image_too_large).
MAX_SOURCE_PIXELS = 120_000_000

# Pillow formats the pipeline decodes; nothing else is opened (EPS, for one, would start Ghostscript).
# MPO is how Pillow names a JPEG with a second picture (most phone photos).
Image.init()
IMAGE_FORMATS: tuple[str, ...] = tuple(
    name for name in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "TIFF", "BMP", "AVIF", "HEIF") if name in Image.OPEN)
IMAGE_TYPES = frozenset({"", "image", "photo", "picture", "still"})
VIDEO_TYPES = frozenset({"video", "movie", "clip"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".wmv"})
# A frame whose mean luma is below this (0..255) with little spread counts as black (fades, leaders).
BLACK_MEAN = 16.0
BLACK_STDDEV = 10.0
FRAMES_PER_PROBE = 48  # frames looked at after each probe position before the next position is tried
PROBE_POSITIONS = (0.5, 0.35, 0.65, 0.2, 0.8, 0.1, 0.9)


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


def _other_normalization(root: Path, relative: str) -> Path | None:
    """The existing file whose name differs from `relative` only in Unicode normalization (NFC/NFD)."""
    for form in ("NFC", "NFD"):
        candidate = root / unicodedata.normalize(form, relative)
        if os.path.lexists(candidate):
            return candidate
    # Mixed forms (a folder in one, the file in the other): walk the parts, matching names by their NFC.
    current = root
    for part in Path(relative).parts:
        direct = current / part
        if os.path.lexists(direct):
            current = direct
            continue
        wanted = unicodedata.normalize("NFC", part)
        try:
            with os.scandir(current) as entries:
                match = next((e.name for e in entries if unicodedata.normalize("NFC", e.name) == wanted), None)
        except OSError:
            return None
        if match is None:
            return None
        current = current / match
    return current


def resolve_media_path(media_root: Path, media_path: str) -> Path:
    """The file for media.path, refused when it escapes the media root (.., absolute, symlink out).

    A path that does not exist as written is looked up in the other Unicode normalization before the
    caller reports it missing."""
    if not media_path or "\x00" in media_path:
        raise ValidationError("media.path is empty or invalid", code="validation.path_outside_root")
    root = Path(media_root).resolve()
    candidate = Path(media_path)
    full = candidate if candidate.is_absolute() else root / candidate
    if not candidate.is_absolute() and not os.path.lexists(full) and not media_path.isascii():
        full = _other_normalization(root, media_path) or full
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


def media_kind(media_type: str | None, media_path: str) -> str:
    """'image', 'video' or 'unsupported', from media.type (and the file name when the type is empty)."""
    kind = (media_type or "").strip().lower()
    if kind in VIDEO_TYPES or (not kind and Path(media_path).suffix.lower() in VIDEO_EXTENSIONS):
        return "video"
    if kind in IMAGE_TYPES:
        return "image"
    return "unsupported"


def unsupported(label: str, why: str) -> ValidationError:
    return ValidationError(f"{label}: {why}", code="validation.unsupported_media_type")


def check_media_type(media_type: str | None, media_path: str) -> str:
    """The media kind, or validation.unsupported_media_type for a media.type the pipeline does not handle."""
    kind = media_kind(media_type, media_path)
    if kind == "unsupported":
        raise unsupported(f"media file {media_path!r}", f"media.type {media_type!r} is not an image or a video")
    return kind


def read_media_file(media_root: Path, media_path: str) -> tuple[Path, bytes]:
    """Resolve and read the media file, with typed errors for missing files."""
    path = resolve_media_path(media_root, media_path)
    if not path.is_file():
        raise ValidationError(f"media file {media_path!r} does not exist", code="validation.file_missing")
    try:
        return path, path.read_bytes()
    except OSError as exc:  # unreadable (permissions, I/O)
        raise ValidationError(f"media file {media_path!r} cannot be read: {type(exc).__name__}",
                              code="validation.file_missing") from None


def _too_large(label: str, width: int, height: int) -> ValidationError:
    return ValidationError(f"{label} has {width}x{height} pixels, more than the limit of {MAX_SOURCE_PIXELS}",
                           code="validation.image_too_large")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    background = Image.new("RGB", img.size, (255, 255, 255))
    rgba = img.convert("RGBA")
    background.paste(rgba, mask=rgba.split()[-1])
    return background


def open_image(data: bytes, label: str, media_path: str | None = None) -> Image.Image:
    """Decode image bytes into a loaded RGB image (first frame, EXIF orientation applied).

    Raises validation.image_too_large above MAX_SOURCE_PIXELS (a decompression bomb), validation.image_corrupt
    for a broken file of a supported format, validation.unsupported_media_type for any other format."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires at 89 MP; the limit here is MAX_SOURCE_PIXELS, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.width * img.height > MAX_SOURCE_PIXELS:
                raise _too_large(label, img.width, img.height)
            img.seek(0)  # the first frame of a GIF, an animated WebP or a multi-page TIFF
            img.load()
            img = ImageOps.exif_transpose(img)
    except ValidationError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses twice its own limit before reading the size out
        raise ValidationError(f"{label} has more pixels than the limit of {MAX_SOURCE_PIXELS}",
                              code="validation.image_too_large") from None
    except UnidentifiedImageError:
        if _known_image_format(data) or _image_extension(media_path or ""):
            raise ValidationError(f"{label} cannot be decoded as an image", code="validation.image_corrupt") from None
        raise unsupported(label, "not a format the pipeline reads (PNG, JPEG, WebP, GIF, TIFF, BMP, AVIF, "
                          "HEIC or a video)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        raise ValidationError(f"{label} cannot be decoded as an image: {type(exc).__name__}",
                              code="validation.image_corrupt") from None
    return _to_rgb(img)


# Leading bytes of the formats in IMAGE_FORMATS: a file starting like one of them and still unreadable is
# corrupt; anything else (a PDF, a text file, an EPS) is a format the pipeline does not read.
_SIGNATURES: tuple[bytes, ...] = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
                                  b"BM")


def _image_extension(media_path: str) -> bool:
    return Image.registered_extensions().get(Path(media_path).suffix.lower()) in IMAGE_FORMATS


def _known_image_format(data: bytes) -> bool:
    head = data[:16]
    if any(head.startswith(sig) for sig in _SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"hevc")


# ---- video: one representative frame ----------------------------------------------------------------


class VideoFacts(BaseModel):
    """What PyAV read of a video: its representative frame's position and the stream's facts."""

    width: int
    height: int
    duration_s: float | None
    fps: float | None
    frame_time_s: float
    codec: str


def _is_black(img: Image.Image) -> bool:
    stat = ImageStat.Stat(img.convert("L").reduce(4) if min(img.size) >= 16 else img.convert("L"))
    return stat.mean[0] < BLACK_MEAN and stat.stddev[0] < BLACK_STDDEV


def video_frame(source: Path | bytes, label: str) -> tuple[Image.Image, VideoFacts]:
    """The representative frame of a video as RGB: the frame at the middle, or after it the first that is
    not black; when the middle is black for FRAMES_PER_PROBE frames, other positions are tried in a fixed
    order. Deterministic for the same file. Raises validation.unsupported_media_type when the file has no
    decodable video stream, validation.image_corrupt when it cannot be read."""
    import av  # PyAV ships FFmpeg in its wheels; imported here because it is slow to import

    opened: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        container = av.open(opened, mode="r")
    except av.error.InvalidDataError:
        raise ValidationError(f"{label} cannot be read as a video", code="validation.image_corrupt") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise unsupported(label, f"not a readable video ({type(exc).__name__})") from None
    with container:
        streams = container.streams.video
        if not streams:
            raise unsupported(label, "has no video stream")
        stream = streams[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise unsupported(label, "its video codec cannot be decoded")
        if stream.width * stream.height > MAX_SOURCE_PIXELS:
            raise _too_large(label, stream.width, stream.height)
        stream.thread_type = "SLICE"  # frame threading would make decoding order-dependent on slow machines
        base = stream.time_base or Fraction(1, 1_000_000)
        duration = (float(stream.duration * base) if stream.duration
                    else container.duration / 1_000_000 if container.duration else None)
        fps = float(stream.average_rate) if stream.average_rate else None
        start = float(stream.start_time * base) if stream.start_time is not None else 0.0
        try:
            frame, at = _pick_frame(container, stream, base, start, duration)
        except av.error.DecoderNotFoundError:
            raise unsupported(label, "its video codec cannot be decoded") from None
        except av.error.FFmpegError as exc:
            raise ValidationError(f"{label} cannot be decoded as a video: {type(exc).__name__}",
                                  code="validation.image_corrupt") from None
        if frame is None:
            raise ValidationError(f"{label} has no decodable video frame", code="validation.image_corrupt")
        facts = VideoFacts(width=frame.width, height=frame.height, duration_s=duration, fps=fps,
                           frame_time_s=round(at, 3), codec=stream.codec_context.name)
        return _to_rgb(frame), facts


def _pick_frame(container: Any, stream: Any, base: Fraction, start: float,
                duration: float | None) -> tuple[Image.Image | None, float]:
    if not duration or duration <= 0:
        return _pick_without_duration(container, stream, base)
    first: tuple[Image.Image, float] | None = None
    for position in PROBE_POSITIONS:
        target = start + duration * position
        container.seek(int(target / base), stream=stream, backward=True, any_frame=False)
        looked = 0
        for frame in container.decode(stream):
            at = float(frame.pts * base) if frame.pts is not None else target
            if at + 1e-6 < target and looked == 0 and frame.pts is not None:
                continue  # frames between the keyframe and the probe position
            img = frame.to_image()
            if first is None:
                first = (img, at)
            if not _is_black(img):
                return img, at
            looked += 1
            if looked >= FRAMES_PER_PROBE:
                break
    return first if first is not None else (None, 0.0)


def _pick_without_duration(container: Any, stream: Any, base: Fraction) -> tuple[Image.Image | None, float]:
    """A stream that does not say how long it is: count its frames once, then take the middle one."""
    total = sum(1 for _ in container.decode(stream))
    if total == 0:
        return None, 0.0
    container.seek(0, stream=stream)
    first: tuple[Image.Image, float] | None = None
    for index, frame in enumerate(container.decode(stream)):
        if index < total // 2:
            continue
        img, at = frame.to_image(), float(frame.pts * base) if frame.pts is not None else 0.0
        first = first or (img, at)
        if not _is_black(img) or index - total // 2 >= FRAMES_PER_PROBE:
            return (img, at) if not _is_black(img) else first
    return first if first is not None else (None, 0.0)


# ---- any media item: one picture --------------------------------------------------------------------


def load_media_image(path: Path, media_type: str | None, label: str, *, data: bytes | None = None) -> Image.Image:
    """The picture of a media file as RGB: the image itself, or a video's representative frame."""
    kind = check_media_type(media_type, path.name)
    if kind == "video":
        return video_frame(path if data is None else data, label)[0]
    if data is None:
        data = path.read_bytes()
    return open_image(data, label, path.name)


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / float(width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def prepare_image(media_root: Path, media_path: str, *, max_image_bytes: int, max_pixels: int,
                  media_type: str | None = None) -> PreparedImage:
    """Read, decode, downscale to the pixel budget and JPEG-encode until it fits max_image_bytes."""
    _, data = read_media_file(media_root, media_path)
    return prepare_image_bytes(data, media_path, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                               media_type=media_type)


def prepare_image_bytes(data: bytes, media_path: str, *, max_image_bytes: int, max_pixels: int,
                        media_type: str | None = None) -> PreparedImage:
    """Decode bytes already read (an image, or a video's representative frame), downscale to the pixel
    budget and JPEG-encode to fit max_image_bytes."""
    label = f"media file {media_path!r}"
    if check_media_type(media_type, media_path) == "video":
        img = video_frame(data, label)[0]
    else:
        img = open_image(data, label, media_path)
    return encode_prepared(img, media_path, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                           source_sha256=hashlib.sha256(data).hexdigest(), source_bytes=len(data))


def encode_prepared(img: Image.Image, media_path: str, *, max_image_bytes: int, max_pixels: int,
                    source_sha256: str, source_bytes: int) -> PreparedImage:
    """Downscale a decoded picture to the pixel budget and JPEG-encode it until it fits max_image_bytes."""
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
        b64=base64.b64encode(encoded).decode("ascii"), source_sha256=source_sha256, source_bytes=source_bytes,
        source_width=src_w, source_height=src_h, width=width, height=height, sent_bytes=len(encoded),
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
