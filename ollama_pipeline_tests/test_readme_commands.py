"""README's shell examples run as written (issue 11): every command of the shell blocks in the sections
"Using it with …", "Job API and CLI", "Dagster …" and "Export feed" runs against the demo library in a
temporary copy of the project, with the emulator as Ollama, and must exit 0 without a traceback.

Skipped, and marked so, are only commands that need what no machine here has: `ollama pull` (model
downloads) and the long-running UIs and servers (`dagster dev`, `ollama-pipeline ui|web|emulator`,
`make ui`). Sections are found by heading prefix, so a renamed "Using it with …" section is still run;
a section that disappears fails the test instead of silently running nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SECTION_PREFIXES = ("Using it with", "Job API and CLI", "Dagster", "Export feed")
MUST_HAVE_COMMANDS = ("Using it with", "Job API and CLI", "Export feed")
COMMAND_TIMEOUT_S = 600
PROJECT_FILES = ("ollama_pipeline.example.yaml", "workspace.yaml", "dagster.yaml", "README.md")
SKIPS: tuple[tuple[str, str], ...] = (
    (r"\bollama\s+pull\b", "downloads model weights from the internet (no machine here can)"),
    (r"\bdagster\s+dev\b", "a long-running UI server"),
    (r"\bollama-pipeline\s+(ui|web|emulator)\b", "a long-running server"),
    (r"\bmake\s+ui\b", "a long-running UI server"),
)
# What a comment tells the user to edit after a command ("set base_url, database.url, media_root"), done
# the way a user of this machine would: the demo library, and the demo's Ollama settings (the base URL
# itself comes from the environment: the emulator).
EDITS: tuple[tuple[str, dict[str, Any]], ...] = (
    (r"^cp\s+ollama_pipeline\.example\.yaml\s+ollama_pipeline\.yaml\b",
     {"database": {"url": "sqlite:///demo/library.db"}, "media_root": "demo/media", "logs_dir": "LOGS",
      "ollama": "<the demo's>"}),
)


@dataclass
class Command:
    section: str
    index: int
    line: str
    skip: str | None = None
    edits: dict[str, Any] = field(default_factory=dict)


def _sections(text: str) -> dict[str, str]:
    """`## heading` -> body, for the headings that start with one of SECTION_PREFIXES."""
    found: dict[str, str] = {}
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        if heading.startswith(SECTION_PREFIXES):
            found[heading.strip()] = body
    return found


def _shell_lines(body: str) -> Iterator[str]:
    """The commands of the ```sh / ```bash / ```shell blocks, continuation lines joined."""
    for block in re.findall(r"^```(?:sh|bash|shell|console)\s*\n(.*?)^```", body, flags=re.M | re.S):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw.rstrip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line.strip() and not line.lstrip().startswith("#"):
                yield line.strip().removeprefix("$ ")


def collect_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    for heading, body in _sections(text).items():
        for index, line in enumerate(_shell_lines(body)):
            skip = next((why for pattern, why in SKIPS if re.search(pattern, line)), None)
            edits = next((e for pattern, e in EDITS if re.search(pattern, line)), {})
            commands.append(Command(heading, index, line, skip, edits))
    return commands


COMMANDS = collect_commands(README.read_text(encoding="utf-8"))


def test_readme_sections_with_commands_are_found() -> None:
    """Each section the doc test covers exists (matched by heading prefix) and shows shell commands."""
    sections = _sections(README.read_text(encoding="utf-8"))
    for prefix in SECTION_PREFIXES:
        assert any(h.startswith(prefix) for h in sections), f"no README section starting with {prefix!r}"
    for prefix in MUST_HAVE_COMMANDS:
        assert any(c.section.startswith(prefix) for c in COMMANDS), f"no shell commands under {prefix!r}"


def _merge(target: dict[str, Any], edits: dict[str, Any]) -> None:
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _env(emulator_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OLLAMA_PIPELINE", "DAGSTER_")) and k not in ("OLLAMA_HOST", "OLLAMA_API_KEY")}
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OLLAMA_PIPELINE__OLLAMA__BASE_URL"] = emulator_url  # the machine's "Ollama": the emulator
    return env


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's top-level files after `ollama-pipeline demo` (what `make demo` runs)."""
    base = tmp_path_factory.mktemp("readme_demo")
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, base / name)
    (base / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = _env("http://127.0.0.1:9")  # the demo starts its own emulator; this value is not used
    env.pop("OLLAMA_PIPELINE__OLLAMA__BASE_URL")
    proc = subprocess.run([str(base / ".venv" / "bin" / "ollama-pipeline"), "demo"], cwd=base, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LocalSupervisor's schema" in proc.stdout, proc.stdout[-2000:]  # the demo's default layout
    return base


class _SectionRuns:
    """Each README section's commands run in order in its own copy of the demo project. The sections are
    independent, so they run side by side (one thread each, the commands being child processes): the doc
    test uses both CPUs. Only the sections, and the commands up to the last one, that the session's
    selected tests ask for are run."""

    def __init__(self, base: Path, root: Path, env: dict[str, str], wanted: dict[str, int]) -> None:
        self.base, self.root, self.env = base, root, env
        self.results: dict[tuple[str, int], subprocess.CompletedProcess[str] | BaseException] = {}
        self.done = {(c.section, c.index): threading.Event() for c in COMMANDS}
        self.threads = [threading.Thread(target=self._section, args=(section, last), daemon=True,
                                         name=f"readme {section}") for section, last in wanted.items()]
        for thread in self.threads:
            thread.start()

    def _section(self, section: str, last: int) -> None:
        commands = [c for c in COMMANDS if c.section == section and not c.skip and c.index <= last]
        try:
            cwd = self.root / re.sub(r"\W+", "_", section)[:40]
            shutil.copytree(self.base, cwd, symlinks=True)
            # The demo library is in LocalSupervisor's schema, whose media paths are absolute (as its
            # importer writes them): they name the files of the first copy, so the copy's media root does too.
            config = cwd / "demo" / "ollama_pipeline.yaml"
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
            data["media_root"] = str(self.base / "demo" / "media")
            config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        except BaseException as exc:  # every command of the section reports it
            for command in commands:
                self.results[(section, command.index)] = exc
                self.done[(section, command.index)].set()
            return
        for command in commands:
            try:
                self.results[(section, command.index)] = _run(command, cwd, self.env)
            except BaseException as exc:  # a timeout: this command fails, the next ones still run
                self.results[(section, command.index)] = exc
            self.done[(section, command.index)].set()

    def result(self, command: Command) -> subprocess.CompletedProcess[str]:
        """The finished command (its section's earlier commands ran before it), waiting with a deadline."""
        key = (command.section, command.index)
        assert self.done[key].wait(timeout=COMMAND_TIMEOUT_S * 4), f"`{command.line}` did not finish in time"
        outcome = self.results[key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=COMMAND_TIMEOUT_S)


@pytest.fixture(scope="module")
def section_runs(request: pytest.FixtureRequest, demo_project: Path, gpu_emulator: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SectionRuns]:
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_readme_command_runs_as_written"
                and hasattr(item, "callspec")]
    wanted: dict[str, int] = {}
    for command in selected:
        if not command.skip:
            wanted[command.section] = max(wanted.get(command.section, -1), command.index)
    runs = _SectionRuns(demo_project, tmp_path_factory.mktemp("readme_sections"), _env(gpu_emulator.base_url),
                        wanted)
    yield runs
    runs.join()


def _run(command: Command, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command.line], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if command.edits and proc.returncode == 0:
        path = cwd / "ollama_pipeline.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        demo = yaml.safe_load((cwd / "demo" / "ollama_pipeline.yaml").read_text(encoding="utf-8"))
        edits = {k: (demo[k] if v == "<the demo's>" else v) for k, v in command.edits.items()}
        _merge(data, edits)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return proc


@pytest.fixture(scope="module")
def gpu_emulator() -> Iterator[Any]:
    """The machine's "Ollama" for the documented commands: the emulator playing the demo's 24 GiB GPU."""
    from ollama_pipeline.app.demo import DEMO_VRAM_GIB
    from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

    server = EmulatorServer(EmulatorConfig(host="127.0.0.1", port=0, latency_ms=0, parallel=8,
                                           vram_gib=DEMO_VRAM_GIB))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, id=f"{c.section.split()[0]}{c.index}: {c.line[:70]}",
                  marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
     for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command, section_runs: _SectionRuns) -> None:
    """The documented command exits 0 and prints no traceback (earlier commands of its section first)."""
    proc = section_runs.result(command)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"`{command.line}` exited {proc.returncode}:\n{output}"
    assert "Traceback" not in proc.stdout + proc.stderr, output


def test_make_demo_leaves_export_and_report_materialized_in_dagster(
        demo_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `make demo` the Dagster UI shows ollama_export and ollama_report materialized (issue 11 item 13)."""
    from dagster import AssetKey, DagsterInstance

    home = demo_project / ".dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.from_config(str(home)) as instance:
        for name in ("ollama_export", "ollama_report"):
            event = instance.get_latest_materialization_event(AssetKey(name))
            assert event is not None, f"{name} was not materialized by the demo"
        export = instance.get_latest_materialization_event(AssetKey("ollama_export"))
        assert export is not None and export.asset_materialization is not None
        assert export.asset_materialization.metadata["items"].value == 50
    assert len((demo_project / "exports" / "ollama_export.jsonl").read_text(encoding="utf-8").splitlines()) == 50
