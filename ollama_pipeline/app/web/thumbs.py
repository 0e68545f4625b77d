"""Thumbnails and previews for the web UI, made with Pillow (videos: PyAV) on a bounded pool, cached on disk.

The source file is found only through `images.resolve_media_path`, so a `media.path` that escapes the
media root (``..``, an absolute path, a symlink pointing out) is refused before anything is read. The
cache key is the resolved path plus its size and mtime, so a replaced file gets a new thumbnail; files are
written to a temporary name and renamed, so concurrent requests never serve half a JPEG.

Memory is bounded, whatever the number of requests:

* Only the formats the pipeline itself reads are opened (`core.images.IMAGE_FORMATS`: PNG, JPEG, WebP, GIF,
  TIFF, BMP, AVIF, HEIF), so a file in any other format Pillow knows (EPS would start Ghostscript) is refused
  with `validation.unsupported_media_type` before a decoder runs.
* The file is opened lazily from disk (never read into memory whole). A JPEG is decoded at a reduced size
  (`Image.draft`: the DCT decoder scales by 1/2..1/8 on the fly); other formats are decoded once, then
  shrunk with `Image.reduce` (box filter by an integer factor, cheap) before the final LANCZOS resize.
* A large PNG (above `STREAM_PNG_PIXELS`; Pillow can only decode a PNG whole, 4 bytes per pixel: 256 MB at
  8000 x 8000) is shrunk by libvips (pyvips) in sequential mode: rows are decoded and reduced as a stream,
  so a few strips are in memory, not the image. Only `pngload` is called, on a file Pillow already
  identified as PNG (libvips's other loaders, SVG among them, are never reached). An interlaced PNG cannot
  be streamed and takes its full size from the budget.
* A video item's picture is the representative frame the pipeline sends to the model
  (`core.images.video_frame`, PyAV: the middle frame, passing over black ones); FFmpeg reads the file in
  packets, so only a few decoded frames are in memory, counted against the same budget.
* Renders run on one pool of `RENDER_WORKERS` threads, and all renders together decode at most
  `DECODE_BUDGET_BYTES` of pixels at a time (an image larger than the budget is decoded alone).
* Concurrent requests for the same thumbnail wait for one render instead of starting their own.

The full-size file is sent only by `original_file`, streamed from disk as it is (never decoded).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.images import (
    IMAGE_FORMATS,
    MAX_SOURCE_PIXELS,
    media_kind,
    resolve_media_path,
    unsupported,
    video_frame,
)

THUMB_SIDE = 256
PREVIEW_SIDE = 1280
MAX_SOURCE_BYTES = 200_000_000
RENDER_WORKERS = 2
DECODE_BUDGET_BYTES = 160_000_000
# PNGs above this many pixels are shrunk as a stream by libvips instead of decoded whole by Pillow.
STREAM_PNG_PIXELS = 16_000_000
STREAM_ROWS = 256  # what the budget is charged per streamed PNG: about this many rows of RGBA
# A video frame in the decoder (YUV 4:2:0 plus its reference frames) and as the RGB picture, per pixel.
VIDEO_BYTES_PER_PIXEL = 8
# Raster types a browser shows and that carry no script; anything else is not sent as an original.
ORIGINAL_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/avif"})


def default_cache_dir(settings: Settings) -> Path:
    """`<logs_dir>/../.thumbs`: beside the logs folder, outside the media root."""
    return settings.logs_dir.parent / ".thumbs"


def source_file(media_root: Path, media_path: str) -> Path:
    """The media file inside the root, or a validation error (outside the root, missing, not a file)."""
    path = resolve_media_path(media_root, media_path)
    if not path.is_file():
        raise ValidationError(f"media file {media_path!r} does not exist", code="validation.file_missing")
    return path


def original_file(media_root: Path, media_path: str) -> tuple[Path, str]:
    """(file, media type) of a full-size original to stream as it is; a non-image type is refused."""
    path = source_file(media_root, media_path)
    media_type = mimetypes.guess_type(path.name)[0] or ""
    if media_type not in ORIGINAL_TYPES:
        raise ValidationError(f"media file {path.name!r} is not an image a browser shows",
                              code="validation.file_missing")
    return path, media_type


def _cache_name(path: Path, side: int) -> str:
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{side}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class _Budget:
    """Bytes of decoded pixels that renders may hold at once; a larger request waits until it is alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = threading.Condition()

    @contextmanager
    def take(self, cost: int) -> Iterator[None]:
        cost = min(cost, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= cost)
            self.free -= cost
        try:
            yield
        finally:
            with self._cond:
                self.free += cost
                self._cond.notify_all()


def _decode_scaled(path: Path, side: int, budget: _Budget) -> Image.Image:
    """The image at most `side` px on its longer edge, decoded with as few pixels in memory as possible."""
    label = f"media file {path.name!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                if img.width * img.height > MAX_SOURCE_PIXELS:
                    raise ValidationError(f"{label} has {img.width}x{img.height} pixels, more than allowed",
                                          code="validation.image_too_large")
                if img.format == "JPEG":
                    img.draft("RGB", (side, side))  # decode at 1/2, 1/4 or 1/8 scale, still >= side
                if img.format == "PNG" and img.width * img.height > STREAM_PNG_PIXELS:
                    interlaced = bool(img.info.get("interlace"))
                    cost = img.width * img.height * 4 if interlaced else img.width * STREAM_ROWS * 4
                    with budget.take(cost):  # (not img.getexif(): for a PNG it decodes the whole image)
                        small = _png_streamed(path, side)
                    return _fit(ImageOps.exif_transpose(small), side)
                # Pillow keeps 1 byte per pixel for L/P images and 4 for RGB, RGBA, CMYK (and 2-4 for 16-bit).
                with budget.take(img.width * img.height * (1 if img.mode in ("1", "L", "P") else 4)):
                    img.load()
                    factor = max(1, min(img.width, img.height) // side)
                    small = img.reduce(factor) if factor > 1 else img.copy()
            small = ImageOps.exif_transpose(small)
    except ValidationError:
        raise
    except UnidentifiedImageError:
        raise unsupported(label, "not an image format the pipeline reads (PNG, JPEG, WebP, GIF, TIFF, BMP, AVIF, "
                          "HEIC) or a broken file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValidationError(f"{label} cannot be decoded as an image: {type(exc).__name__}",
                              code="validation.image_corrupt") from None
    return _fit(small, side)


def _png_streamed(path: Path, side: int) -> Image.Image:
    """A PNG at most `side` px, shrunk by libvips as it decodes the rows (sequential access)."""
    import pyvips  # libvips from the pyvips-binary wheel; imported on the first large PNG only

    pyvips.cache_set_max(0)  # nothing of one render is kept for the next
    try:
        src = pyvips.Image.pngload(str(path), access="sequential", fail_on="error")
        scale = min(1.0, side / max(src.width, src.height))
        small = src.resize(scale, kernel="lanczos3") if scale < 1.0 else src
        if small.format != "uchar":  # 16-bit PNG
            small = small.colourspace("srgb" if small.bands >= 3 else "b-w").cast("uchar")
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[small.bands]
        picture = Image.frombytes(mode, (small.width, small.height), small.write_to_memory())
        if src.get_typeof("orientation"):  # libvips reads the EXIF orientation of an eXIf chunk
            exif = Image.Exif()
            exif[0x0112] = int(src.get("orientation"))
            picture.info["exif"] = exif.tobytes()  # ImageOps.exif_transpose applies it
        return picture
    except pyvips.Error as exc:
        raise ValidationError(f"media file {path.name!r} cannot be decoded as an image: {type(exc).__name__}",
                              code="validation.image_corrupt") from None


def _video_pixels(path: Path) -> int | None:
    """Pixels of a video's first video stream, read from the container's headers (None: unreadable)."""
    import av  # slow to import; only video items need it

    try:
        with av.open(str(path), mode="r") as container:
            streams = container.streams.video
            return int(streams[0].width * streams[0].height) if streams else 0
    except (av.error.FFmpegError, OSError, ValueError):
        return None  # video_frame reports it with a typed error


def _decode_video_frame(path: Path, side: int, budget: _Budget) -> Image.Image:
    """The representative frame of a video (the one the pipeline sends), at most `side` px."""
    pixels = _video_pixels(path)
    # an unreadable header takes the whole budget: decoded alone, whatever it turns out to be
    with budget.take(budget.total if pixels is None else pixels * VIDEO_BYTES_PER_PIXEL):
        frame, _ = video_frame(path, f"media file {path.name!r}")
        factor = max(1, min(frame.width, frame.height) // side)
        small = frame.reduce(factor) if factor > 1 else frame
        del frame
    return _fit(small, side)


def _fit(small: Image.Image, side: int) -> Image.Image:
    """RGB on white, at most `side` px on the longer edge."""
    if small.mode != "RGB":
        background = Image.new("RGB", small.size, (255, 255, 255))
        rgba = small.convert("RGBA")
        background.paste(rgba, mask=rgba.split()[-1])
        small = background
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    return small


class Renderer:
    """The bounded pool that makes cached JPEGs; one render per target however many requests ask."""

    def __init__(self, workers: int = RENDER_WORKERS, budget_bytes: int = DECODE_BUDGET_BYTES) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbs")
        self._budget = _Budget(budget_bytes)
        self._inflight: dict[Path, Future[Path]] = {}
        self._lock = threading.Lock()

    def _render(self, path: Path, side: int, target: Path, kind: str) -> Path:
        try:
            if target.is_file():
                return target
            if kind == "video":  # FFmpeg reads packets as it goes: the file's size does not matter
                img = _decode_video_frame(path, side, self._budget)
            elif path.stat().st_size > MAX_SOURCE_BYTES:
                raise ValidationError(f"media file {path.name!r} is too large to preview",
                                      code="validation.image_too_large")
            else:
                img = _decode_scaled(path, side, self._budget)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    img.save(fh, format="JPEG", quality=85, optimize=True)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return target
        finally:
            with self._lock:
                self._inflight.pop(target, None)

    def scaled_jpeg(self, media_root: Path, media_path: str, cache_dir: Path, side: int = THUMB_SIDE, *,
                    media_type: str | None = None) -> Path:
        """A cached JPEG of the media file (a video: its representative frame), at most `side` pixels on its
        longer edge; made when missing. `media_type` is `media.type` (empty: told by the file name); anything
        but a video is opened as an image of one of the formats the pipeline reads."""
        kind = "video" if media_kind(media_type, media_path) == "video" else "image"
        path = source_file(media_root, media_path)
        name = _cache_name(path, side)
        target = cache_dir / name[:2] / f"{name}.jpg"
        if target.is_file():
            return target
        with self._lock:
            future = self._inflight.get(target)
            if future is None:
                future = self._pool.submit(self._render, path, side, target, kind)
                self._inflight[target] = future
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_DEFAULT: Renderer | None = None
_DEFAULT_LOCK = threading.Lock()


def scaled_jpeg(media_root: Path, media_path: str, cache_dir: Path, side: int = THUMB_SIDE, *,
                media_type: str | None = None) -> Path:
    """`Renderer.scaled_jpeg` on the process's one shared pool."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Renderer()
    return _DEFAULT.scaled_jpeg(media_root, media_path, cache_dir, side, media_type=media_type)
