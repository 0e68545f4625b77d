"""LocalSupervisor's gallery schema, written as plain SQL from its schema as facts, for the demo library.

LocalSupervisor (github noliv3/LocalSupervisor) builds its SQLite database with `SCRIPTS/init_db.php`
(DB/schema.sql) and `SCRIPTS/migrate.php` (SCRIPTS/migrations 001-018). The tables below have the table and
column names, types, defaults and keys those create (013 adds media.status_vote/is_active/is_deleted; 012,
014-016 the jobs control fields), so LocalSupervisor's own pages open such a database; `schema_migrations`
rows make the pipeline recognise the profile. No code of LocalSupervisor is
copied. `ollama-pipeline demo --layout localsupervisor` builds its demo library in this schema.
"""

from __future__ import annotations

from sqlalchemy import Engine, inspect

MIGRATIONS = (
    "001_initial_schema", "002_add_consistency_log", "003_add_runtime_indexes", "004_add_audit_log",
    "005_media_meta_and_video_meta", "006_add_media_tags_locked", "007_prompt_history_and_lifecycle",
    "008_prompt_history_unique", "009_tags_name_type_unique", "010_add_ollama_results",
    "011_expand_ollama_results", "012_expand_jobs_for_ollama_control", "013_add_media_vote_active_deleted",
    "014_add_jobs_worker_tracking", "015_add_jobs_not_before", "016_add_jobs_started_at",
    "017_add_media_meta_key_value_index", "018_jobs_payload_schema_backfill",
)

SCHEMA = """
CREATE TABLE media (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, type TEXT NOT NULL, source TEXT NOT NULL,
    width INTEGER, height INTEGER, duration REAL, fps REAL, filesize INTEGER, hash TEXT, created_at TEXT,
    imported_at TEXT NOT NULL, rating INTEGER NOT NULL DEFAULT 0, has_nsfw INTEGER NOT NULL DEFAULT 0,
    parent_media_id INTEGER, status TEXT NOT NULL DEFAULT 'active',
    lifecycle_status TEXT NOT NULL DEFAULT 'active', lifecycle_reason TEXT,
    quality_status TEXT NOT NULL DEFAULT 'unknown', quality_score REAL, quality_notes TEXT, deleted_at TEXT,
    status_vote TEXT NOT NULL DEFAULT 'neutral', is_active INTEGER NOT NULL DEFAULT 1,
    is_deleted INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (parent_media_id) REFERENCES media(id) ON DELETE SET NULL
);
CREATE UNIQUE INDEX idx_media_hash ON media(hash);
CREATE INDEX idx_media_quality_status ON media(quality_status);
CREATE TABLE tags (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, type TEXT NOT NULL DEFAULT 'content',
    locked INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX idx_tags_name_type ON tags(name, type);
CREATE TABLE media_tags (
    media_id INTEGER NOT NULL, tag_id INTEGER NOT NULL, confidence REAL NOT NULL DEFAULT 1.0,
    locked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (media_id, tag_id),
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE,
    FOREIGN KEY (tag_id) REFERENCES tags(id) ON DELETE CASCADE
);
CREATE TABLE scan_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, scanner TEXT NOT NULL,
    run_at TEXT NOT NULL, nsfw_score REAL, flags TEXT, raw_json TEXT,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, prompt TEXT, negative_prompt TEXT,
    model TEXT, sampler TEXT, cfg_scale REAL, steps INTEGER, seed TEXT, width INTEGER, height INTEGER,
    scheduler TEXT, sampler_settings TEXT, loras TEXT, controlnet TEXT, source_metadata TEXT,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, prompt_id INTEGER, type TEXT NOT NULL,
    status TEXT NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0, cancelled_at TEXT,
    progress_bits INTEGER NOT NULL DEFAULT 0, progress_bits_total INTEGER NOT NULL DEFAULT 0,
    heartbeat_at TEXT, not_before TEXT, last_error_code TEXT, created_at TEXT NOT NULL, updated_at TEXT,
    started_at TEXT, forge_request_json TEXT, forge_response_json TEXT, payload_json TEXT,
    error_message TEXT, worker_pid INTEGER, worker_owner TEXT, stage TEXT, stage_changed_at TEXT,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE INDEX idx_jobs_status ON jobs(status);
CREATE TABLE media_lifecycle_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, event_type TEXT NOT NULL,
    from_status TEXT, to_status TEXT, quality_status TEXT, quality_score REAL, rule TEXT, reason TEXT,
    actor TEXT, created_at TEXT NOT NULL,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE TABLE schema_migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL,
    description TEXT
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL, entity_type TEXT, entity_id INTEGER,
    details_json TEXT, actor_ip TEXT, actor_key TEXT, created_at TEXT NOT NULL
);
CREATE TABLE media_meta (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, source TEXT NOT NULL,
    meta_key TEXT NOT NULL, meta_value TEXT, created_at TEXT NOT NULL,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE INDEX idx_media_meta_media ON media_meta(media_id);
CREATE INDEX idx_media_meta_key_value ON media_meta(meta_key, meta_value);
CREATE TABLE prompt_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, prompt_id INTEGER, version INTEGER NOT NULL,
    source TEXT NOT NULL, created_at TEXT NOT NULL, prompt TEXT, negative_prompt TEXT, model TEXT, sampler TEXT,
    cfg_scale REAL, steps INTEGER, seed TEXT, width INTEGER, height INTEGER, scheduler TEXT, sampler_settings TEXT,
    loras TEXT, controlnet TEXT, source_metadata TEXT, raw_text TEXT,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE,
    FOREIGN KEY (prompt_id) REFERENCES prompts(id) ON DELETE SET NULL
);
CREATE UNIQUE INDEX idx_prompt_history_media_version ON prompt_history(media_id, version);
CREATE TABLE ollama_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, mode TEXT NOT NULL, model TEXT NOT NULL,
    title TEXT, caption TEXT, score INTEGER, contradictions TEXT, missing TEXT, rationale TEXT, raw_json TEXT,
    raw_text TEXT, parse_error INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, meta TEXT,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE TABLE ollama_vectors (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id INTEGER NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL,
    dims INTEGER NOT NULL, vector_json TEXT NOT NULL, input_hash TEXT NOT NULL, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX idx_ollama_vectors_unique ON ollama_vectors(media_id, kind, model, input_hash);
CREATE TABLE collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, description TEXT, created_at TEXT NOT NULL
);
CREATE TABLE collection_media (
    collection_id INTEGER NOT NULL, media_id INTEGER NOT NULL, PRIMARY KEY (collection_id, media_id),
    FOREIGN KEY (collection_id) REFERENCES collections(id) ON DELETE CASCADE,
    FOREIGN KEY (media_id) REFERENCES media(id) ON DELETE CASCADE
);
CREATE TABLE import_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, status TEXT NOT NULL, message TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE consistency_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, check_name TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""



def create_localsupervisor_schema(engine: Engine) -> bool:
    """Create the schema in an empty SQLite database (with its 18 migrations recorded); False when the
    database already has a media table (then nothing is changed)."""
    if engine.dialect.name != "sqlite":
        raise ValueError("the LocalSupervisor demo layout is SQLite only (as LocalSupervisor itself)")
    if inspect(engine).has_table("media"):
        return False
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.executescript(SCHEMA)
        cur.executemany("INSERT INTO schema_migrations (version, applied_at, description) VALUES (?, ?, ?)",
                        [(v, "2026-01-20T10:00:00+00:00", v.split("_", 1)[1]) for v in MIGRATIONS])
        raw.commit()
    finally:
        raw.close()
    return True
