"""A LocalSupervisor gallery database (the schema of `ollama_pipeline.app.localsupervisor_schema`), filled
with rows shaped as its importer writes them.

The rows are shaped as LocalSupervisor's importer (`SCRIPTS/scan_path_cli.php` of github
noliv3/LocalSupervisor) writes them: absolute paths, ISO-8601 text timestamps, seeds as text, scanner flags
as JSON.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from PIL import Image

from ollama_pipeline.app.localsupervisor_schema import MIGRATIONS, SCHEMA

GALLERY_TABLES = ("media", "tags", "media_tags", "scan_results", "prompts", "jobs", "media_lifecycle_events",
                  "audit_log", "media_meta", "schema_migrations")

PROMPTS = ("a lighthouse on a cliff at dusk, oil painting", "portrait of an old fisherman, photo, 85mm",
           "a red fox in fresh snow, morning light", "cyberpunk street market at night, neon, rain",
           "a bowl of ramen, studio lighting, food photography")


def create_localsupervisor_db(db_path: Path, media_root: Path, count: int = 6) -> list[int]:
    """The schema plus `count` imported images (PNG and JPEG) with prompts, tags, a scan and meta rows."""
    media_root.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db_path)
    con.executescript(SCHEMA)
    con.executemany("INSERT INTO schema_migrations (version, applied_at, description) VALUES (?, ?, ?)",
                    [(v, "2026-01-20T10:00:00+00:00", v.split("_", 1)[1]) for v in MIGRATIONS])
    ids = []
    for i in range(count):
        ext = "png" if i % 2 == 0 else "jpg"
        path = media_root / f"sd_{i:03d}.{ext}"
        Image.new("RGB", (64 + 8 * i, 48), ((i * 47) % 256, (i * 83) % 256, (i * 29) % 256)).save(path)
        data = path.read_bytes()
        cur = con.execute(
            "INSERT INTO media (path, type, source, width, height, filesize, hash, created_at, imported_at) "
            "VALUES (?, 'image', 'sd', ?, 48, ?, ?, ?, ?)",
            (str(path), 64 + 8 * i, len(data), hashlib.md5(data).hexdigest(), "2026-01-19T08:00:00+00:00",
             f"2026-01-20T10:00:0{i}+00:00"))
        media_id = int(cur.lastrowid)
        ids.append(media_id)
        con.execute("INSERT INTO prompts (media_id, prompt, negative_prompt, model, sampler, cfg_scale, steps, seed, "
                    "width, height, source_metadata) VALUES (?, ?, 'blurry, lowres', 'sdxl_base', 'Euler a', 7, 30, "
                    "?, ?, 48, ?)",
                    (media_id, PROMPTS[i % len(PROMPTS)], str(1000 + i), 64 + 8 * i, "Steps: 30, Sampler: Euler a"))
        for name, locked in (("landscape" if i % 2 == 0 else "portrait", 0), ("sd", 1 if i == 0 else 0)):
            con.execute("INSERT OR IGNORE INTO tags (name, type) VALUES (?, 'content')", (name,))
            tag_id = con.execute("SELECT id FROM tags WHERE name = ? AND type = 'content'", (name,)).fetchone()[0]
            con.execute("INSERT INTO media_tags (media_id, tag_id, confidence, locked) VALUES (?, ?, 1.0, ?)",
                        (media_id, tag_id, locked))
        con.execute("INSERT INTO scan_results (media_id, scanner, run_at, nsfw_score, flags, raw_json) "
                    "VALUES (?, 'pixai_sensible', '2026-01-20T10:01:00+00:00', ?, ?, '{}')",
                    (media_id, 0.02 * i, json.dumps({"nudity": False, "gore": False})))
        con.execute("INSERT INTO media_meta (media_id, source, meta_key, meta_value, created_at) "
                    "VALUES (?, 'scan', 'hash.sha256', ?, '2026-01-20T10:01:00+00:00')",
                    (media_id, hashlib.sha256(data).hexdigest()))
    con.commit()
    con.close()
    return ids


def snapshot(db_path: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """Columns and rows of every LocalSupervisor table (for before/after comparisons)."""
    con = sqlite3.connect(db_path)
    out = {}
    for table in GALLERY_TABLES:
        cur = con.execute(f"SELECT * FROM {table} ORDER BY rowid")
        out[table] = ([d[0] for d in cur.description], cur.fetchall())
    con.close()
    return out
