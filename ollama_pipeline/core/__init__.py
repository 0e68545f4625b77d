"""The pipeline core: config, errors, logs, database, Ollama client, images, stages, runner and queue.

Nothing in this package imports Dagster (an import-linter contract in the test suite enforces it).
"""
