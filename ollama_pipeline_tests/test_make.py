"""The Makefile's verbs take what README documents (issue 11 item 14): `make ui WEB_PORT=… DAGSTER_PORT=…`
passes the ports on; `make screenshots` exists and copies the README's pictures from test-artifacts/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    proc = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_ui_passes_the_ports_it_is_given() -> None:
    """`make ui WEB_PORT=8123 DAGSTER_PORT=3123` starts `ollama-pipeline ui --web-port 8123 --dagster-port 3123`."""
    ui = [line for line in _dry_run("ui", "WEB_PORT=8123", "DAGSTER_PORT=3123").splitlines()
          if "ollama-pipeline ui" in line]
    assert ui and ui[-1].split("ollama-pipeline ui", 1)[1].split() == ["--web-port", "8123", "--dagster-port", "3123"]
    plain = [line for line in _dry_run("ui").splitlines() if "ollama-pipeline ui" in line]
    assert plain and plain[-1].split("ollama-pipeline ui", 1)[1].split() == []


def test_make_screenshots_copies_the_browser_tests_pictures_into_docs() -> None:
    """The README's pictures are refreshed by `make screenshots`, never by `make test`."""
    recipe = _dry_run("screenshots")
    assert "test_browser.py" in recipe
    assert "docs/screenshots" in recipe and "gallery.png item.png dagster_asset_graph.png" in recipe
