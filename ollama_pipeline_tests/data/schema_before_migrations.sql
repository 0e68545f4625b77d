-- The schema ollama-pipeline init-db created before schema discovery and migrations (main at a0900b0), SQLite.
CREATE TABLE audit_log (
	id INTEGER NOT NULL, 
	actor VARCHAR(64) NOT NULL, 
	action VARCHAR(64) NOT NULL, 
	entity_type VARCHAR(64) NOT NULL, 
	entity_id VARCHAR(64) NOT NULL, 
	old_value TEXT, 
	new_value TEXT, 
	details TEXT, 
	job_id INTEGER, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE media (
	id INTEGER NOT NULL, 
	path VARCHAR(1024) NOT NULL, 
	type VARCHAR(32) NOT NULL, 
	width INTEGER, 
	height INTEGER, 
	rating INTEGER, 
	has_nsfw BOOLEAN NOT NULL, 
	hash VARCHAR(128), 
	status VARCHAR(32) NOT NULL, 
	quality_status VARCHAR(32), 
	quality_score FLOAT, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE ollama_jobs (
	id INTEGER NOT NULL, 
	job_type VARCHAR(64) NOT NULL, 
	media_id INTEGER NOT NULL, 
	payload TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	priority INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	max_attempts INTEGER NOT NULL, 
	lease_until DATETIME, 
	worker VARCHAR(128), 
	run_id VARCHAR(64), 
	error_channel VARCHAR(32), 
	error_code VARCHAR(64), 
	error_message TEXT, 
	retryable BOOLEAN, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_ollama_jobs_created_at ON ollama_jobs (created_at);
CREATE INDEX ix_ollama_jobs_media_id ON ollama_jobs (media_id);
CREATE INDEX ix_ollama_jobs_status_priority ON ollama_jobs (status, priority, id);
CREATE UNIQUE INDEX uq_ollama_jobs_active ON ollama_jobs (job_type, media_id) WHERE status IN ('queued', 'running');
CREATE TABLE tags (
	id INTEGER NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
CREATE TABLE media_lifecycle_events (
	id INTEGER NOT NULL, 
	media_id INTEGER NOT NULL, 
	event_type VARCHAR(64) NOT NULL, 
	old_value TEXT, 
	new_value TEXT, 
	source VARCHAR(64), 
	details TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE INDEX ix_media_lifecycle_events_media_id ON media_lifecycle_events (media_id);
CREATE TABLE media_meta (
	id INTEGER NOT NULL, 
	media_id INTEGER NOT NULL, 
	"key" VARCHAR(255) NOT NULL, 
	value TEXT, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_media_meta_media_key UNIQUE (media_id, "key"), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE INDEX ix_media_meta_media_id ON media_meta (media_id);
CREATE TABLE media_tags (
	media_id INTEGER NOT NULL, 
	tag_id INTEGER NOT NULL, 
	locked BOOLEAN NOT NULL, 
	confidence FLOAT, 
	weight FLOAT, 
	source VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (media_id, tag_id), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE, 
	FOREIGN KEY(tag_id) REFERENCES tags (id) ON DELETE CASCADE
);
CREATE TABLE ollama_media_index (
	media_id INTEGER NOT NULL, 
	content_sha256 VARCHAR(64) NOT NULL, 
	dhash VARCHAR(16), 
	size_bytes BIGINT NOT NULL, 
	width INTEGER, 
	height INTEGER, 
	mtime_ns BIGINT, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (media_id), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE INDEX ix_ollama_media_index_dhash ON ollama_media_index (dhash);
CREATE TABLE ollama_stage_results (
	media_id INTEGER NOT NULL, 
	stage VARCHAR(64) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	fingerprint VARCHAR(64), 
	model VARCHAR(255), 
	model_digest VARCHAR(128), 
	version VARCHAR(128), 
	error_channel VARCHAR(32), 
	error_code VARCHAR(64), 
	error_message TEXT, 
	retryable BOOLEAN, 
	prompt_eval_count INTEGER, 
	eval_count INTEGER, 
	total_duration_ms FLOAT, 
	load_duration_ms FLOAT, 
	duration_ms FLOAT, 
	job_id INTEGER, 
	run_id VARCHAR(64), 
	last_success_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (media_id, stage), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE TABLE prompts (
	id INTEGER NOT NULL, 
	media_id INTEGER NOT NULL, 
	prompt TEXT, 
	negative_prompt TEXT, 
	model VARCHAR(255), 
	sampler VARCHAR(64), 
	seed BIGINT, 
	size VARCHAR(32), 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE INDEX ix_prompts_media_id ON prompts (media_id);
CREATE TABLE scan_results (
	id INTEGER NOT NULL, 
	media_id INTEGER NOT NULL, 
	scanner VARCHAR(64), 
	nsfw_score FLOAT, 
	flags TEXT, 
	raw_json TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(media_id) REFERENCES media (id) ON DELETE CASCADE
);
CREATE INDEX ix_scan_results_media_id ON scan_results (media_id);
