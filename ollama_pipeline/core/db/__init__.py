"""Database layer: the gallery's tables (§1, §2), the pipeline's own tables, engines and the one write path."""
