"""Media types, decompression bombs, NFC/NFD paths, unsupported media and missing files (issue 11 items 11
and 12, issue 12 item 5), through the CLI, the job API and the database. Test videos are made with PyAV."""

from __future__ import annotations

import io
import json
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import yaml
from PIL import Image
from sqlalchemy import Engine, insert, select, update

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.models import Media, MediaMeta, OllamaJob, OllamaStageResult, Prompt
from ollama_pipeline.core.images import prepare_image, video_frame
from ollama_pipeline.core.queue import store as jobs
from ollama_pipeline.core.runner import Pipeline

# ---- helpers ------------------------------------------------------------------------------------------


def _pipeline(settings: Settings) -> Pipeline:
    pipeline = Pipeline.from_settings(settings)
    init_db(pipeline.engine)
    return pipeline


def _add(engine: Engine, path: str, media_type: str | None = "image", prompt: str = "a lighthouse at dusk") -> int:
    with engine.begin() as conn:
        media_id = conn.execute(insert(Media).values(path=path, type=media_type).returning(Media.id)).scalar_one()
        conn.execute(insert(Prompt).values(media_id=media_id, prompt=prompt, model="sdxl"))
    return int(media_id)


def _png(path: Path, color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_video(path: Path, *, frames: int = 30, fps: int = 10, black: range = range(0),
               codec: str = "mpeg4") -> Path:
    """A small test video: frame i has red = 8*i (so the frame taken can be told), black frames as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((48, 64, 3), np.uint8)
            if i not in black:
                pixels[:, :, 0], pixels[:, :, 1] = (i * 8) % 256, 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _stage_rows(engine: Engine, media_id: int) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {r["stage"]: dict(r) for r in conn.execute(
            select(OllamaStageResult).where(OllamaStageResult.media_id == media_id)).mappings()}


def _meta(engine: Engine, media_id: int) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(MediaMeta.key, MediaMeta.value).where(MediaMeta.media_id == media_id)).all())


def _job(engine: Engine, job_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(OllamaJob).where(OllamaJob.id == job_id)).mappings().one())


def _run_job(pipeline: Pipeline, job_type: str, media_id: int) -> dict[str, Any]:
    job_id = jobs.enqueue_ollama(pipeline, job_type, media_id).job_id
    jobs.process_ollama_job(pipeline, job_id)
    return _job(pipeline.engine, job_id)


def _log(settings: Settings, name: str = "ollama_jobs.jsonl") -> list[dict[str, Any]]:
    path = settings.logs_dir / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def _cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    from ollama_pipeline.app.cli import main

    code = main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def media_env(sqlite_url: str, settings_factory: Callable[..., Settings], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Pipeline, Path]:
    """Settings, a pipeline and a config file on a SQLite library; Dagster state under tmp_path."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    settings = settings_factory(sqlite_url)
    settings.media_root.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return settings, _pipeline(settings), config


# ---- issue 12 item 5: media types -----------------------------------------------------------------------


def _formats(root: Path) -> dict[str, Path]:
    """One file per supported image format, each a distinct solid colour."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, fmt in [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.webp", "WEBP"), ("a.tif", "TIFF"),
                      ("a.bmp", "BMP"), ("a.avif", "AVIF"), ("a.heic", "HEIF")]:
        Image.new("RGB", (40, 30), (30, 160, 90)).save(root / name, format=fmt)
        files[name] = root / name
    return files


def test_png_jpeg_webp_tiff_bmp_avif_and_heic_are_read_and_sent(media_env: tuple[Settings, Pipeline, Path],
                                                                 emulator: Any) -> None:
    """Every supported still format goes through a caption job and ends with a stored caption."""
    settings, pipeline, _ = media_env
    for name in _formats(settings.media_root):
        prepared = prepare_image(settings.media_root, name, max_image_bytes=200_000, max_pixels=1_048_576)
        assert (prepared.width, prepared.height) == (40, 30), name
        job = _run_job(pipeline, "ollama_caption", _add(pipeline.engine, name))
        assert job["status"] == "done", (name, job["error_code"], job["error_message"])
        assert "ollama.caption" in _meta(pipeline.engine, job["media_id"])


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A portrait photo stored landscape with EXIF orientation 6 is sent upright (height > width)."""
    img = Image.new("RGB", (60, 20), (10, 10, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    prepared = prepare_image(tmp_path, "rotated.jpg", max_image_bytes=200_000, max_pixels=1_048_576)
    assert (prepared.source_width, prepared.source_height) == (20, 60)


def test_animated_gif_is_read_from_its_first_frame(tmp_path: Path) -> None:
    """An animated GIF (red, then blue) is sent as its first, red frame."""
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = prepare_image(tmp_path, "anim.gif", max_image_bytes=200_000, max_pixels=1_048_576)
    import base64

    sent = Image.open(io.BytesIO(base64.b64decode(prepared.b64))).convert("RGB").getpixel((16, 16))
    assert sent[0] > 200 and sent[2] < 60


def test_video_is_sent_as_its_middle_frame_passing_over_black_frames(tmp_path: Path) -> None:
    """The representative frame is the middle one; when the middle is black, the next frame that is not."""
    clip = make_video(tmp_path / "clip.mp4", frames=30)
    frame, facts = video_frame(clip, "clip")
    assert facts.frame_time_s == pytest.approx(1.5) and facts.fps == pytest.approx(10.0)
    assert abs(frame.getpixel((32, 24))[0] - 15 * 8) < 12  # frame 15 of 30
    faded = make_video(tmp_path / "faded.mp4", frames=40, black=range(10, 30))
    frame, facts = video_frame(faded, "faded")
    assert facts.frame_time_s == pytest.approx(3.0)  # frame 30: the first after the black stretch
    assert frame.getpixel((32, 24))[0] > 200


def test_video_item_gets_a_caption_and_the_same_bytes_on_every_run(media_env: tuple[Settings, Pipeline, Path],
                                                                   emulator: Any) -> None:
    """A media row with type 'video' (as LocalSupervisor stores it) is captioned from its frame; the bytes
    sent are identical on every preparation, so its fingerprint and provenance stay put."""
    settings, pipeline, _ = media_env
    make_video(settings.media_root / "clips" / "walk.mp4", frames=24)
    media_id = _add(pipeline.engine, "clips/walk.mp4", "video")
    job = _run_job(pipeline, "ollama_caption", media_id)
    assert job["status"] == "done", job["error_message"]
    assert json.loads(_meta(pipeline.engine, media_id)["ollama.caption"])["text"]
    first = _stage_rows(pipeline.engine, media_id)["ollama_caption"]["fingerprint"]
    sent = {prepare_image(settings.media_root, "clips/walk.mp4", max_image_bytes=200_000, max_pixels=1_048_576,
                          media_type="video").b64 for _ in range(3)}
    assert len(sent) == 1
    calls = emulator.stats()["model_calls"]
    again = _run_job(pipeline, "ollama_caption", media_id)
    assert again["status"] == "done" and emulator.stats()["model_calls"] == calls  # unchanged: skipped
    assert _stage_rows(pipeline.engine, media_id)["ollama_caption"]["fingerprint"] == first


# ---- issue 11 item 12: image errors ----------------------------------------------------------------------


def test_decompression_bomb_fails_as_image_too_large(media_env: tuple[Settings, Pipeline, Path], emulator: Any) -> None:
    """A 16 KB PNG declaring 12000×11000 pixels (132 MP) fails its job with validation.image_too_large."""
    settings, pipeline, _ = media_env
    Image.new("1", (12000, 11000)).save(settings.media_root / "bomb.png")
    assert (settings.media_root / "bomb.png").stat().st_size < 100_000
    calls = emulator.stats()["model_calls"]
    job = _run_job(pipeline, "ollama_caption", _add(pipeline.engine, "bomb.png"))
    assert (job["status"], job["error_code"]) == ("failed", "validation.image_too_large")
    assert emulator.stats()["model_calls"] == calls


@pytest.mark.parametrize("stored,on_disk", [("NFC", "NFD"), ("NFD", "NFC")])
def test_path_in_the_other_unicode_normalization_is_found(media_env: tuple[Settings, Pipeline, Path],
                                                          emulator: Any, stored: str, on_disk: str) -> None:
    """media.path in one normalization, the file (folder and name) in the other: the job finds and captions it."""
    settings, pipeline, _ = media_env
    name = "Café/Crème brûlée.png"
    _png(settings.media_root / unicodedata.normalize(on_disk, name))
    assert not (settings.media_root / unicodedata.normalize(stored, name)).exists()
    job = _run_job(pipeline, "ollama_caption", _add(pipeline.engine, unicodedata.normalize(stored, name)))
    assert job["status"] == "done", job["error_message"]


# ---- issue 11 item 11: unsupported media types and missing files ------------------------------------------


def test_unsupported_media_is_skipped_not_failed_and_listed_to_fix(media_env: tuple[Settings, Pipeline, Path],
                                                                    emulator: Any,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An audio row and a PDF stored as an image: `run` exits 0, no failed stage result, and `jobs problems`
    lists both with reason unsupported_media_type; the image beside them is captioned."""
    settings, pipeline, config = media_env
    _png(settings.media_root / "ok.png")
    (settings.media_root / "song.mp3").write_bytes(b"ID3\x04" + b"\x00" * 64)
    (settings.media_root / "doc.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n")
    ok, song, doc = (_add(pipeline.engine, "ok.png"), _add(pipeline.engine, "song.mp3", "audio"),
                     _add(pipeline.engine, "doc.pdf", "image"))
    for _ in range(2):
        code, out, err = _cli(capsys, config, "run", "--stages", "caption")
        assert code == 0, out + err
        assert "FAILED" not in out
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:  # the CLI's instance ($DAGSTER_HOME under tmp_path)
        for asset in ("media", "ollama_caption"):
            assert set(instance.get_materialized_partitions(AssetKey(asset))) == {"1-1000"}  # the block of all three
            assert not instance.event_log_storage.get_latest_asset_partition_materialization_attempts_without_materializations(
                AssetKey(asset))  # no failed partition
    for media_id in (song, doc):
        rows = _stage_rows(pipeline.engine, media_id)
        assert all(r["status"] != "failed" for r in rows.values()), rows
        assert rows["media"]["error_code"] == "validation.unsupported_media_type"
    assert "ollama.caption" in _meta(pipeline.engine, ok)
    from ollama_pipeline.core.export import export_records
    from ollama_pipeline.core.export_schema import ExportRecord

    for record in export_records(pipeline.engine):  # the export feed stays valid beside skipped items
        ExportRecord.model_validate(record)
    # the job API skips it too: the job is done, nothing is stored
    job = _run_job(pipeline, "ollama_caption", song)
    assert job["status"] == "done" and "ollama.caption" not in _meta(pipeline.engine, song)
    code, out, _ = _cli(capsys, config, "jobs", "problems", "--json")
    listed = {r["media_id"]: r for r in json.loads(out)}
    assert code == 0 and set(listed) == {song, doc}
    assert {r["reason"] for r in listed.values()} == {"unsupported_media_type"}
    code, out, _ = _cli(capsys, config, "jobs", "problems")
    assert code == 0 and "song.mp3" in out and "doc.pdf" in out and "2 item(s) to fix" in out
    from fastapi.testclient import TestClient

    from ollama_pipeline.app.web.app import create_app

    with TestClient(create_app(settings, pipeline=pipeline), base_url="http://127.0.0.1") as client:
        page = client.get("/queue")
    assert page.status_code == 200
    to_fix = page.text.split('id="problems"', 1)[1]
    assert "song.mp3" in to_fix and "doc.pdf" in to_fix and "unsupported_media_type" in to_fix
    assert "ok.png" not in to_fix


def test_missing_file_fails_once_then_is_reported_until_its_file_or_row_changes(
        media_env: tuple[Settings, Pipeline, Path], emulator: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """First `run` fails the item (exit 1); later runs exit 0 and report it (listed by `jobs problems`),
    without a new failure; the file coming back runs it; a changed row with the file gone fails it once more."""
    settings, pipeline, config = media_env
    _png(settings.media_root / "here.png")
    here, gone = _add(pipeline.engine, "here.png"), _add(pipeline.engine, "gone.png")
    code, out, _ = _cli(capsys, config, "run", "--stages", "caption")
    assert code == 1 and "validation/validation.file_missing" in out
    failures = [e for e in _log(settings, "ollama_errors.jsonl") if e.get("media_id") == gone]
    assert failures
    for _ in range(2):
        code, out, err = _cli(capsys, config, "run", "--stages", "caption")
        assert code == 0, out + err
        assert "skipped" in out
    assert [e for e in _log(settings, "ollama_errors.jsonl") if e.get("media_id") == gone] == failures
    skipped = [e for e in _log(settings) if e.get("event") == "stage_skipped" and e.get("media_id") == gone]
    assert {e["reason"] for e in skipped} == {"file_missing"}
    # a job for it is not failed again either
    assert _run_job(pipeline, "ollama_caption", gone)["status"] == "done"
    code, out, _ = _cli(capsys, config, "jobs", "problems", "--json")
    assert [(r["media_id"], r["reason"]) for r in json.loads(out)] == [(gone, "file_missing")]

    _png(settings.media_root / "gone.png", (20, 90, 200))  # the file comes back
    code, out, _ = _cli(capsys, config, "run", "--stages", "caption")
    assert code == 0 and "ollama.caption" in _meta(pipeline.engine, gone)
    assert json.loads(_cli(capsys, config, "jobs", "problems", "--json")[1]) == []

    (settings.media_root / "gone.png").unlink()  # gone again: reported once more as a failure ...
    code, out, _ = _cli(capsys, config, "run", "--stages", "caption", "--media", str(gone))
    assert code == 1
    code, out, _ = _cli(capsys, config, "run", "--stages", "caption", "--media", str(gone))
    assert code == 0
    with pipeline.engine.begin() as conn:  # ... and after its row changes (a new path), once more
        conn.execute(update(Media).where(Media.id == gone).values(path="moved/gone.png"))
    code, out, _ = _cli(capsys, config, "run", "--stages", "caption", "--media", str(gone))
    assert code == 1
    assert _stage_rows(pipeline.engine, here)["ollama_caption"]["status"] == "ok"
