"""The architecture as enforced rules: import-linter contracts between the layers (pyproject.toml), Dagster's
public API only, and a shipped dagster.yaml that names no class of this project."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ollama_pipeline"


def test_import_contracts_between_the_layers_are_kept() -> None:
    """core never imports Dagster or the apps, defs never imports the apps, the emulator imports nothing of
    the pipeline, and only core.client imports the ollama library."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout


def test_no_private_dagster_module_is_used_anywhere_in_the_package() -> None:
    """`grep -r "dagster\\._" ollama_pipeline` finds nothing."""
    hits = [f"{path.relative_to(REPO)}:{n}" for path in PACKAGE.rglob("*.py")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if re.search(r"dagster\._", line)]
    assert hits == []


def test_shipped_dagster_yaml_holds_only_standard_keys_and_no_class_of_ours() -> None:
    """The instance settings are Dagster's own keys; nothing in them points at this package."""
    text = (REPO / "dagster.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    assert set(config) <= {"run_queue", "run_retries", "telemetry", "run_monitoring", "storage"}
    assert "ollama_pipeline" not in text and "module:" not in text and "class:" not in text

