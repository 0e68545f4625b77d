"""The `ollama-pipeline` command line: set-up, demo, emulator, runs through Dagster, export, jobs.

Every command exits 0 on success and 2 on a typed pipeline error, printing one line
`error [channel/code]: message` to stderr (never a traceback for an expected failure).

Start-up stays cheap (issue 13 item 7): this module imports only the standard library and
`core.errors`; configuration (pydantic), SQLAlchemy, Dagster and the other command modules are imported
inside the handler that needs them. `--help` lists the other modules' commands from COMMAND_MODULES
without importing them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ollama_pipeline.core.errors import OllamaPipelineError, ValidationError

if TYPE_CHECKING:
    from ollama_pipeline.core.config import Settings

Handler = Callable[[argparse.Namespace], int]
USAGE_CODE = "validation.payload"


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line typed error (exit code 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error [validation/{USAGE_CODE}]: {self.prog}: {message} (see {self.prog} --help)\n")


def arg_type(check: Callable[[str, str], object], name: str) -> Callable[[str], object]:
    """An argparse `type=` from a core check that raises a typed ValidationError."""

    def convert(value: str) -> object:
        try:
            return check(value, name)
        except OllamaPipelineError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = name.lstrip("-")
    return convert


def _positive_int(value: str, name: str) -> int:
    from ollama_pipeline.core.selection import positive_int  # SQLAlchemy: only when the value is parsed

    return positive_int(value, name)


def settings_from_args(args: argparse.Namespace) -> Settings:
    from ollama_pipeline.core.config import load_settings

    return load_settings(getattr(args, "config", None))


def _cmd_init_db(args: argparse.Namespace) -> int:
    from ollama_pipeline.core.db.engine import engine_for_settings, init_db
    from ollama_pipeline.core.db.gallery import gallery_for, require_gallery
    from ollama_pipeline.core.db.optional import add_optional_columns_sql

    settings = settings_from_args(args)
    engine = engine_for_settings(settings)
    if args.add_optional_columns or args.drop_optional_columns:
        statements = add_optional_columns_sql(engine, gallery_for(engine), drop=args.drop_optional_columns)
        if args.sql or not statements:
            print("\n".join(statements) if statements else "-- no optional column is missing")
            return 0
    created = init_db(engine)
    if args.add_optional_columns or args.drop_optional_columns:
        from ollama_pipeline.core.db.optional import apply_statements

        apply_statements(engine, statements)
        print(f"{'dropped' if args.drop_optional_columns else 'added'} {len(statements)} optional column(s)")
    gallery = require_gallery(engine)
    print(f"database ready ({gallery.profile} profile): created {len(created)} table(s)"
          f"{': ' + ', '.join(created) if created else ''}")
    return 0


def _check_gallery(settings: Settings) -> None:
    """Stop with the check-db report (exit code 2) when the gallery lacks a required table or column."""
    from ollama_pipeline.core.db.engine import engine_for_settings
    from ollama_pipeline.core.db.gallery import require_gallery

    require_gallery(engine_for_settings(settings))


def _cmd_check_db(args: argparse.Namespace) -> int:
    import json

    from ollama_pipeline.core.db.engine import engine_for_settings
    from ollama_pipeline.core.db.gallery import gallery_for

    settings = settings_from_args(args)
    report = gallery_for(engine_for_settings(settings), refresh=True).report
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 2


def _cmd_gallery_jobs(args: argparse.Namespace) -> int:
    import json

    from sqlalchemy import inspect

    from ollama_pipeline.core.queue import gallery_jobs
    from ollama_pipeline.core.runner import Pipeline

    settings = settings_from_args(args)
    pipeline = Pipeline.from_settings(settings)
    _check_gallery(settings)
    if args.action == "process" and not inspect(pipeline.engine).has_table("jobs"):
        print("gallery jobs: this gallery has no jobs table of its own (LocalSupervisor's); nothing to do")
        return 0
    if args.action == "enqueue":
        if args.job_type is None or args.media_id is None:
            raise ValidationError("gallery-jobs enqueue needs JOB_TYPE and MEDIA_ID", code="validation.payload")
        from ollama_pipeline.core.queue import store

        result = store.enqueue_ollama(pipeline, args.job_type, args.media_id)
        print(json.dumps({"job_id": result.job_id, "deduped": result.status == "deduplicated"}))
        return 0
    outcomes = gallery_jobs.process_gallery_jobs(pipeline, limit=args.limit)
    for outcome in outcomes:
        print(outcome.model_dump_json())
    print(f"gallery jobs: {len(outcomes)} processed, "
          f"{sum(o.status == 'done' for o in outcomes)} done, {sum(o.status == 'error' for o in outcomes)} error")
    return 0 if all(o.status != "error" for o in outcomes) else 1


def _cmd_demo_library(args: argparse.Namespace) -> int:
    from ollama_pipeline.app.demo_library import build_demo_library
    from ollama_pipeline.core.db.engine import init_db, make_engine

    settings = settings_from_args(args)
    engine = make_engine(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
    if args.layout == "pipeline":
        init_db(engine)
    report = build_demo_library(engine, settings.media_root, count=args.count, seed=args.seed, layout=args.layout)
    print(f"demo library: {report.created} created, {report.skipped} already there, "
          f"{report.bytes_written / 1e6:.1f} MB written under {settings.media_root}")
    return 0


def _cmd_emulator(args: argparse.Namespace) -> int:
    from ollama_pipeline.emulator.__main__ import run

    return run(args)


def _cmd_health(args: argparse.Namespace) -> int:
    from ollama_pipeline.core.client import OllamaClient

    settings = settings_from_args(args)
    client = OllamaClient(settings.ollama, default_slots=settings.pipeline.concurrency)
    health = client.health()
    print(health.model_dump_json(exclude={"hosts"}))
    for host in health.hosts:
        state = f"up (version {host.version}, {host.latency_ms:.0f} ms)" if host.ok else f"DOWN ({host.error_code})"
        serves = ", ".join(host.models) if host.models is not None else "every model"
        print(f"host {host.base_url}: {state}; weight {host.weight:g}, {host.slots} slot(s), serves {serves}")
    if health.ok:
        models = client.list_models()
        print("models: " + (", ".join(models.names()) or "(none)"))
    return 0 if health.ok else 2


def selected_media_ids(settings: Settings, spec: str | None) -> list[int | str] | None:
    """The media ids of `--media SPEC` that exist in the library (None: every item); the one parser
    (ranges for integer ids; text and UUID ids listed one by one)."""
    from ollama_pipeline.core.db.engine import engine_for_settings
    from ollama_pipeline.core.selection import parse_for_library

    engine = engine_for_settings(settings)
    selection = parse_for_library(spec, engine, default_all=True)
    check = selection.check(engine)
    if check.note():
        print(check.note(), file=sys.stderr)
    return None if selection.everything else list(selection.iter_ids(engine))


def _cmd_run(args: argparse.Namespace) -> int:
    from ollama_pipeline.app.orchestrate import parse_stage_list, run_stages_through_dagster

    settings = settings_from_args(args)
    stages = parse_stage_list(args.stages)
    _check_gallery(settings)
    media_ids = selected_media_ids(settings, args.media)
    summary = run_stages_through_dagster(settings, stages, media_ids=media_ids,
                                         force=args.force, config_path=args.config)
    print(summary.render())
    return 0 if summary.all_items_ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from ollama_pipeline.app.demo import run_demo

    return run_demo(count=args.count, emulator=args.emulator, config=args.config, stages=args.stages,
                    layout=args.layout)


def _cmd_export(args: argparse.Namespace) -> int:
    from ollama_pipeline.core.export import write_export

    settings = settings_from_args(args)
    path = Path(args.out) if args.out else None
    written, count = write_export(settings, path)
    print(f"export: {count} item(s) written to {written}")
    return 0


# Commands registered by other modules (`register(subparsers)`): name -> (module, the help line of the
# top-level `--help`). The top-level help is built from this table, so it imports none of these modules
# (the bench alone imports Dagster: seconds); a command word imports only the module that has it. A command
# a module registers but this table lacks still runs (every module is then imported); test_cli_start.py
# checks that the table matches what the modules register.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "enqueue": ("ollama_pipeline.app.cli_jobs", "queue jobs for media items (deduplicated against active jobs)"),
    "process": ("ollama_pipeline.app.cli_jobs", "process queued jobs (a worker) or one job"),
    "jobs": ("ollama_pipeline.app.cli_jobs", "inspect and manage the job queue"),
    "web": ("ollama_pipeline.app.web.cli", "serve the web UI (gallery, item pages, re-runs, queue)"),
    "docs": ("ollama_pipeline.app.docs", "print the README tables generated from the registries"),
    "ui": ("ollama_pipeline.app.ui", "the results web UI, the Dagster UI and (when no Ollama is configured) "
                                     "the emulator, together; Ctrl-C stops them all"),
    "pilot": ("ollama_pipeline.app.pilot", "run every stage on a sample, print model time per item and the ETA"),
    "backfill": ("ollama_pipeline.app.backfill", "launch one Dagster backfill over the items a question selects"),
    "bench": ("ollama_pipeline.bench", "throughput through Dagster vs the model server's limit (make bench)"),
}
EMULATOR_HELP = "serve Ollama's HTTP API on loopback with fault injection"


def register_modules(sub: Any, modules: list[str]) -> None:
    """Import each module (once) and let it add its commands; a module not installed is left out."""
    for module in dict.fromkeys(modules):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        register(sub)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for argv: complete for the command argv names; for none (`--help`), every command
    listed with its help line, the other modules' commands (and the emulator's options) not imported.
    argv None: every command complete."""
    command = _command_word(argv)
    listed_only = argv is not None and command is None
    parser = Parser(prog="ollama-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="configuration file (default: $OLLAMA_PIPELINE_CONFIG or ./ollama_pipeline.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-db", help="create the pipeline's tables that do not exist yet and check the gallery's")
    p.add_argument("--add-optional-columns", action="store_true",
                   help="also add the optional gallery columns the pipeline would use (see check-db)")
    p.add_argument("--drop-optional-columns", action="store_true",
                   help="undo --add-optional-columns (drops only the columns it adds)")
    p.add_argument("--sql", action="store_true", help="with --add/--drop-optional-columns: print the SQL only")
    p.set_defaults(handler=_cmd_init_db)

    p = sub.add_parser("gallery-jobs", help="LocalSupervisor's own jobs table: enqueue, or process what waits there")
    p.add_argument("action", choices=["process", "enqueue"])
    p.add_argument("job_type", nargs="?", help="enqueue: e.g. ollama_caption")
    p.add_argument("media_id", nargs="?", type=int, help="enqueue: the media id")
    p.add_argument("--limit", type=int, default=100, help="process: at most this many jobs")
    p.set_defaults(handler=_cmd_gallery_jobs)

    p = sub.add_parser("check-db", help="report the gallery's tables and columns as the pipeline will use them")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(handler=_cmd_check_db)

    p = sub.add_parser("demo-library", help="write a realistic demo library (images, prompts, tags, scans)")
    p.add_argument("--count", type=arg_type(_positive_int, "--count"), default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--layout", choices=["pipeline", "localsupervisor"], default="pipeline",
                   help="gallery schema of a new library: the pipeline's own, or LocalSupervisor's")
    p.set_defaults(handler=_cmd_demo_library)

    if not listed_only and command in (None, "emulator"):
        from ollama_pipeline.emulator.__main__ import build_parser as emulator_parser

        sub.add_parser("emulator", help=EMULATOR_HELP, parents=[emulator_parser(add_help=False)],
                       conflict_handler="resolve").set_defaults(handler=_cmd_emulator)
    else:  # listed only: its options come with the emulator's modules
        sub.add_parser("emulator", help=EMULATOR_HELP).set_defaults(handler=_cmd_emulator)

    p = sub.add_parser("health", help="check that every Ollama host answers and list the models")
    p.set_defaults(handler=_cmd_health)

    p = sub.add_parser("run", help="materialize stages for media items through Dagster (one run over many items)")
    p.add_argument("--stages", default="all", help="'all', or job types/short names separated by commas")
    p.add_argument("--media", help="media ids: 7, 1-500, 3,5,9 or all (default: every media item)")
    p.add_argument("--force", action="store_true", help="call the model even when nothing changed")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("demo", help="demo library + emulator (when no Ollama is configured) + all stages")
    p.add_argument("--count", type=arg_type(_positive_int, "--count"), default=50)
    p.add_argument("--emulator", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--stages", default="all")
    p.add_argument("--layout", choices=["localsupervisor", "pipeline"], default="localsupervisor",
                   help="build the demo library in LocalSupervisor's schema (default, under demo/) or in the "
                        "pipeline's own (under demo/pipeline/)")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("export", help="write the JSON Lines export feed of all ollama.* values")
    p.add_argument("--out", help="output file (default: <logs_dir>/../exports/ollama_export.jsonl)")
    p.set_defaults(handler=_cmd_export)

    if listed_only:  # the top-level help (or the usage error for a missing command)
        for name, (_, help_line) in COMMAND_MODULES.items():
            sub.add_parser(name, help=help_line)
    elif command in COMMAND_MODULES:
        register_modules(sub, [COMMAND_MODULES[command][0]])
    elif command is None or command not in sub.choices:  # a command not in the table yet, a typo, or all
        register_modules(sub, [module for module, _ in COMMAND_MODULES.values()])
    return parser


def _command_word(argv: list[str] | None) -> str | None:
    """The subcommand named in argv (None when argv is None or names none, or when `-h`/`--help` comes
    before it: then the top-level help is printed)."""
    args = list(argv or [])
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            return None
        if arg == "--config":
            if args:
                args.pop(0)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except OllamaPipelineError as exc:
        print(f"error [{exc.channel}/{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
