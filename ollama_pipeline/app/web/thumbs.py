"""Thumbnails and previews for the web UI, made on the fly with Pillow and cached on disk.

The source file is found only through `images.resolve_media_path`, so a `media.path` that escapes the
media root (``..``, an absolute path, a symlink pointing out) is refused before anything is read. The
cache key is the resolved path plus its size and mtime, so a replaced file gets a new thumbnail; files are
written to a temporary name and renamed, so concurrent requests never serve half a JPEG. The full-size
file is never sent by these functions.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.images import open_image, resolve_media_path

THUMB_SIDE = 256
PREVIEW_SIDE = 1280
MAX_SOURCE_BYTES = 200_000_000


def default_cache_dir(settings: Settings) -> Path:
    """`<logs_dir>/../.thumbs`: beside the logs folder, outside the media root."""
    return settings.logs_dir.parent / ".thumbs"


def source_file(media_root: Path, media_path: str) -> Path:
    """The media file inside the root, or a validation error (outside the root, missing, not a file)."""
    path = resolve_media_path(media_root, media_path)
    if not path.is_file():
        raise ValidationError(f"media file {media_path!r} does not exist", code="validation.file_missing")
    return path


def _cache_name(path: Path, side: int) -> str:
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{side}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _render(path: Path, side: int, target: Path) -> None:
    if path.stat().st_size > MAX_SOURCE_BYTES:
        raise ValidationError(f"media file {path.name!r} is too large to preview", code="validation.image_too_large")
    img = open_image(path.read_bytes(), f"media file {path.name!r}")
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="JPEG", quality=85, optimize=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scaled_jpeg(media_root: Path, media_path: str, cache_dir: Path, side: int = THUMB_SIDE) -> Path:
    """A cached JPEG of the media file, at most `side` pixels on its longer edge; made when missing."""
    path = source_file(media_root, media_path)
    name = _cache_name(path, side)
    target = cache_dir / name[:2] / f"{name}.jpg"
    if not target.is_file():
        _render(path, side, target)
    return target
