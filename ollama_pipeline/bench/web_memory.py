"""Peak memory of the web UI process under concurrent image requests (`python -m ollama_pipeline.bench.web_memory`).

For each source image (by default the largest demo size, 4096 px, as PNG, and 8000 x 8000 as PNG and as
JPEG) it starts `ollama-pipeline web` (uvicorn) in its own process on loopback, with an empty thumbnail
cache, reads the server's resident memory (VmRSS in /proc) once it answers, sends `--requests` concurrent
GETs (half `/image/<id>`, the bounded preview, half `/thumb/<id>`), and reads the server's peak resident
memory (VmHWM: the kernel's high-water mark of the process, so no sampling can miss a peak). Prints a
table and writes JSON (`--out`). Target: peak below 400 MB. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

DEFAULT_OUT = Path("bench_results") / "web_memory.json"
DEMO_LARGEST_SIDE = 4096  # demo_library's max_side: its largest images
TARGET_MB = 400.0
SOURCES = (("demo-largest-png", DEMO_LARGEST_SIDE, "PNG"), ("8000-png", 8000, "PNG"), ("8000-jpeg", 8000, "JPEG"))


def make_image(path: Path, side: int, fmt: str) -> Path:
    """A side x side picture (gradients, so it compresses like a photo's sky, quickly)."""
    tile = Image.merge("RGB", (Image.linear_gradient("L"), Image.radial_gradient("L"),
                               Image.linear_gradient("L").rotate(90)))
    img = tile.resize((side, side), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "PNG":
        img.save(path, format="PNG", compress_level=1)
    else:
        img.save(path, format="JPEG", quality=90)
    return path


def make_library(workdir: Path, sources: tuple[tuple[str, int, str], ...] = SOURCES) -> tuple[Path, dict[str, int]]:
    """A SQLite library with one media row per source image; (config file, name -> media id)."""
    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.db.models import Media

    media_root = workdir / "media"
    db = workdir / "library.db"
    engine = make_engine(f"sqlite:///{db}")
    init_db(engine)
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for name, side, fmt in sources:
            rel = f"{name}.{'png' if fmt == 'PNG' else 'jpg'}"
            make_image(media_root / rel, side, fmt)
            ids[name] = conn.execute(Media.__table__.insert().values(path=rel, type="image", width=side,
                                                                     height=side)).inserted_primary_key[0]
    engine.dispose()
    config = workdir / "ollama_pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "ollama": {"base_url": "http://127.0.0.1:9", "model": {"default": "llava:7b"}, "timeout_ms": 1000,
                   "max_image_bytes": 1_000_000},
        "database": {"url": f"sqlite:///{db}"}, "media_root": str(media_root), "logs_dir": str(workdir / "LOGS")}))
    return config, ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_mb(pid: int, field: str) -> float:
    """VmRSS / VmHWM of a process, in MB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class WebServer:
    """`ollama-pipeline web` in its own process on a free loopback port."""

    def __init__(self, config: Path, start_timeout_s: float = 180.0) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.app.cli", "--config", str(config), "web",
                                      "--port", str(self.port), "--log-level", "warning"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the web server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def hammer(url: str, media_id: int, requests: int, timeout_s: float = 300.0) -> list[int]:
    """`requests` GETs at once, half the preview and half the thumbnail of one item; their status codes
    (0 for one that got no answer within timeout_s)."""
    paths = [f"/image/{media_id}" if i % 2 == 0 else f"/thumb/{media_id}" for i in range(requests)]

    def get(client: httpx.Client, path: str) -> int:
        try:
            return client.get(path).status_code
        except httpx.TransportError:
            return 0

    with httpx.Client(base_url=url, timeout=timeout_s) as client, ThreadPoolExecutor(requests) as pool:
        return list(pool.map(lambda p: get(client, p), paths))


def measure_source(config: Path, media_id: int, requests: int = 16) -> dict[str, Any]:
    """One fresh server: baseline and peak resident memory around `requests` concurrent image GETs."""
    server = WebServer(config)
    try:
        baseline = memory_mb(server.proc.pid, "VmRSS")
        started = time.perf_counter()
        codes = hammer(server.url, media_id, requests)
        seconds = time.perf_counter() - started
        peak = memory_mb(server.proc.pid, "VmHWM")
    finally:
        server.stop()
    return {"requests": requests, "status_codes": sorted(set(codes)), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 2)}


def run(workdir: Path, requests: int = 16, names: list[str] | None = None) -> dict[str, Any]:
    sources = tuple(s for s in SOURCES if not names or s[0] in names)
    config, ids = make_library(workdir, sources)
    results = {}
    for name, side, fmt in sources:
        thumbs = workdir / ".thumbs"  # default cache: beside LOGS; emptied so every round renders
        if thumbs.exists():
            for f in sorted(thumbs.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        results[name] = {"side": side, "format": fmt, **measure_source(config, ids[name], requests)}
    return {"target_peak_rss_mb": TARGET_MB, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
            "sources": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_pipeline.bench.web_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per image (default 16)")
    parser.add_argument("--sources", default=",".join(s[0] for s in SOURCES),
                        help=f"which source images, comma-separated (default all: {', '.join(s[0] for s in SOURCES)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="web_memory_") as tmp:
        report = run(Path(tmp), args.requests, [n.strip() for n in args.sources.split(",") if n.strip()])
    print(f"{'source':<18} {'requests':>8} {'baseline MB':>12} {'peak MB':>8} {'seconds':>8}  codes")
    for name, r in report["sources"].items():
        print(f"{name:<18} {r['requests']:>8} {r['baseline_rss_mb']:>12} {r['peak_rss_mb']:>8} {r['seconds']:>8}  "
              f"{r['status_codes']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}; target: peak below {TARGET_MB:.0f} MB")
    return 0 if all(r["peak_rss_mb"] < TARGET_MB and r["status_codes"] == [200]
                    for r in report["sources"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
