"""The README's generated tables match the registries (stages, stored values, error codes)."""

from __future__ import annotations

from pathlib import Path

from ollama_pipeline.app.cli import main
from ollama_pipeline.app.docs import BLOCKS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_generated_blocks_are_current() -> None:
    text = README.read_text(encoding="utf-8")
    for name in BLOCKS:
        assert f"<!-- generated:{name} -->" in text
    assert main(["docs", "--check", str(README)]) == 0, "run: ollama-pipeline docs --write README.md"


def test_readme_starts_with_the_two_setup_commands() -> None:
    first = README.read_text(encoding="utf-8").split("```", 2)[1]
    assert "make demo" in first and "make test" in first
