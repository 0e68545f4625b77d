"""The CLI starts cheaply (issue 13 item 7): `ollama-pipeline --help` lists every command without importing
Dagster, SQLAlchemy, pydantic, PIL, ollama or the modules of other commands, and a command imports only the
module that has it. The timings are measured by `python -m ollama_pipeline.bench.startup`, not here."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from ollama_pipeline.app import cli

HEAVY = ("dagster", "sqlalchemy", "pydantic", "PIL", "ollama", "yaml", "numpy", "httpx", "starlette")


def _imported_after(*argv: str) -> tuple[set[str], str]:
    """Top-level packages and ollama_pipeline modules imported by `ollama-pipeline ARGV` in a fresh process."""
    code = ("import json, sys\nfrom ollama_pipeline.app.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    modules = json.loads(proc.stderr.strip().splitlines()[-1])
    return {m if m.startswith("ollama_pipeline") else m.split(".")[0] for m in modules}, proc.stdout


def _registered() -> dict[str, str]:
    """name -> help line of every command, with every command module imported and registered."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register_modules(sub, [module for module, _ in cli.COMMAND_MODULES.values()])
    return {action.dest: action.help for action in sub._choices_actions}


def test_help_lists_every_command_without_importing_dagster_or_the_command_modules() -> None:
    """`ollama-pipeline --help` names all commands, and imports none of the heavy libraries or command modules."""
    imported, shown = _imported_after("--help")
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    modules = {module for module, _ in cli.COMMAND_MODULES.values()} | {"ollama_pipeline.emulator.server"}
    assert not imported & modules, sorted(imported & modules)
    every = set(cli.build_parser(["--help"])._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert every >= set(cli.COMMAND_MODULES) | {"run", "demo", "emulator", "init-db", "export"}
    for name in every:
        assert f"    {name} " in shown, f"{name} missing from --help:\n{shown}"


def test_the_help_table_matches_what_the_command_modules_register() -> None:
    """COMMAND_MODULES (what `--help` lists) names exactly the commands the modules register, with their help."""
    registered = _registered()
    assert {name: help_line for name, (_, help_line) in cli.COMMAND_MODULES.items()} == registered


@pytest.mark.parametrize(("argv", "module", "absent"), [
    (("jobs", "--help"), "ollama_pipeline.app.cli_jobs", ("dagster", "ollama_pipeline.bench")),
    (("emulator", "--help"), "ollama_pipeline.emulator.server", ("dagster", "sqlalchemy", "ollama_pipeline.app.cli_jobs")),
    (("run", "--help"), "ollama_pipeline.app.cli", ("dagster", "sqlalchemy", "ollama_pipeline.app.cli_jobs")),
])
def test_a_command_imports_only_the_module_that_has_it(argv: tuple[str, ...], module: str,
                                                       absent: tuple[str, ...]) -> None:
    """`ollama-pipeline jobs|emulator|run --help` shows the command's options, importing its module only."""
    imported, shown = _imported_after(*argv)
    assert module in imported
    assert not imported & set(absent), sorted(imported & set(absent))
    assert shown.startswith(f"usage: ollama-pipeline {argv[0]}") and "options:" in shown


def test_help_before_a_command_word_still_lists_every_command() -> None:
    """`ollama-pipeline -h run` prints the top-level help with every command, as argparse reads it."""
    _, shown = _imported_after("-h", "run")
    assert all(f"    {name} " in shown for name in cli.COMMAND_MODULES), shown
