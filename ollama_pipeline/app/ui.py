"""`ollama-pipeline ui` (`make ui`): the results web UI, the Dagster UI and, when no Ollama is configured, the
bundled emulator, started together and stopped together.

The settings come from the usual lookup (`--config`, $OLLAMA_PIPELINE_CONFIG, ./ollama_pipeline.yaml), else
from the demo's `demo/ollama_pipeline.yaml`, so `make demo` then `make ui` shows the demo's results. The rule
for the emulator is `ollama-pipeline demo`'s: with no configuration of the user's it serves on a free
loopback port and the children get its URL in OLLAMA_PIPELINE__OLLAMA__BASE_URL; with a configuration whose
Ollama does not answer, a message says so and nothing replaces it. Both UIs are child processes in their own
sessions (see `supervise`), so SIGINT or SIGTERM to this command stops them and everything they started.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_pipeline.app.supervise import (
    Child,
    StartError,
    install_stop_handlers,
    port_in_use,
    restore_handlers,
    start_child,
    stop_all,
    wait_ready,
)
from ollama_pipeline.core.config import CONFIG_ENV, DEFAULT_CONFIG_FILE, ENV_PREFIX, Settings, load_settings

WEB_PORT = 8080  # `ollama-pipeline web`'s default
DAGSTER_PORT = 3000  # `dagster dev`'s default, and pipeline.dagster_ui_url's
DAGSTER_UI_URL_ENV = f"{ENV_PREFIX}PIPELINE__DAGSTER_UI_URL"
WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"


@dataclass(frozen=True)
class UiConfig:
    """Which settings file the UIs use, and whether it is the user's (not the demo's)."""

    path: Path
    users: bool


def resolve_config(config: str | None) -> UiConfig:
    """The user's configuration when there is one, else the demo's (written first if `make demo` never ran)."""
    from ollama_pipeline.app.demo import DEMO_DIR, _demo_config

    chosen = config or os.environ.get(CONFIG_ENV) or (DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).exists()
                                                      else None)
    if chosen is not None:
        return UiConfig(Path(chosen).resolve(), users=True)
    path = DEMO_DIR / "ollama_pipeline.yaml"
    _demo_config(path)
    return UiConfig(path.resolve(), users=False)


def url_of(host: str, port: int, path: str = "/") -> str:
    """http://host:port/path, with brackets around an IPv6 address."""
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def local_host(host: str) -> str:
    """The address this machine reaches a server bound to host on (a wildcard bind answers on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}.get(host, host)


def library_note(settings: Settings, *, demo: bool) -> str:
    """One line about the library the web UI shows (item count, or what to do when it is empty)."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.db.gallery import SchemaCheckError, require_gallery

    engine = make_engine(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
    try:
        if demo:  # the demo library is ours to create; a user's database is changed only by init-db
            init_db(engine, settings.library)
        media = require_gallery(engine, settings.library)["media"]  # the mapped table (prefix, schema)
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(media.table)).scalar_one()
    except (SQLAlchemyError, SchemaCheckError) as exc:
        return f"library not readable ({type(exc).__name__}): run `ollama-pipeline check-db`, then `init-db`"
    finally:
        engine.dispose()
    if count == 0:
        return ("library is empty: run `make demo` (or `ollama-pipeline demo`) to fill it" if demo
                else "no media items yet")
    return f"{count} media item(s)"


def _child_env(settings: Settings, dagster_home: Path, dagster_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(dagster_home)
    bin_dir = str(Path(sys.executable).parent)  # dagster dev starts dagster-webserver and its daemon by name
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    default_url = type(settings.pipeline).model_fields["dagster_ui_url"].default
    if dagster_url and DAGSTER_UI_URL_ENV not in env and settings.pipeline.dagster_ui_url == default_url:
        env[DAGSTER_UI_URL_ENV] = dagster_url.rstrip("/")  # the web UI's links to partitions
    return env


def start_servers(args: argparse.Namespace, settings: Settings, env: dict[str, str]) -> list[Child]:
    """Start the web UI and (unless --no-dagster) `dagster dev`; each logs to <logs_dir>/ui-<name>.log."""
    reach = local_host(args.host)
    token = settings.pipeline.web_token
    children = [start_child(
        "web UI", [sys.executable, "-m", "ollama_pipeline.app.cli", "web", "--host", args.host, "--port",
                   str(args.web_port)],
        env=env, cwd=Path.cwd(), log_path=settings.logs_dir / "ui-web.log",
        ready_url=url_of(reach, args.web_port, "/healthz"), ready_headers={"X-Auth-Token": token} if token else None)]
    if not args.no_dagster:
        target = ["-w", str(WORKSPACE)] if WORKSPACE.exists() else ["-m", "ollama_pipeline.definitions"]
        children.append(start_child(
            "Dagster UI", [sys.executable, "-m", "dagster", "dev", *target, "-h", args.host, "-p",
                           str(args.dagster_port)],
            env=env, cwd=WORKSPACE.parent if WORKSPACE.exists() else Path.cwd(),
            log_path=settings.logs_dir / "ui-dagster.log", ready_url=url_of(reach, args.dagster_port, "/server_info")))
    return children


def _print_failure(child: Child, reason: str) -> None:
    print(f"error: {child.name} {reason}\nlast lines of its output ({child.log_path}):", file=sys.stderr)
    print("\n".join("  | " + line for line in (child.tail() or "(none)").splitlines()), file=sys.stderr)


def _print_ready(args: argparse.Namespace, children: list[Child], config: UiConfig, note: str,
                 ollama: str) -> None:
    print("\nollama-pipeline ui is up:")
    print(f"  results web UI  {url_of(args.host, args.web_port)}")
    if not args.no_dagster:
        print(f"  Dagster UI      {url_of(args.host, args.dagster_port)}  (runs, lineage, partitions)")
    print(f"  Ollama          {ollama}")
    print(f"  settings        {config.path}" + ("" if config.users else "  (the demo's)"))
    print(f"  library         {note}")
    print("  logs            " + ", ".join(str(c.log_path) for c in children))
    print(f"Press Ctrl-C to stop (or `kill {os.getpid()}`): everything started here stops with it.", flush=True)


def _watch(children: list[Child], stop: threading.Event) -> int:
    """Wait for a stop signal (0) or for a child to exit on its own (1, after saying which)."""
    while not stop.wait(0.5):
        for child in children:
            code = child.proc.poll()
            if code is not None:
                _print_failure(child, f"exited on its own with code {code}; stopping the others")
                return 1
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """Start the UIs (and the emulator when needed), print where they are, and stop them all on a signal."""
    from ollama_pipeline.app.demo import BASE_URL_ENV
    from ollama_pipeline.app.orchestrate import ensure_dagster_home
    from ollama_pipeline.app.web.cli import check_bind
    from ollama_pipeline.app.web.security import is_loopback_host

    stop = threading.Event()
    previous = install_stop_handlers(lambda _signum: stop.set())  # before any child: they start at SIG_DFL
    server: Any = None
    children: list[Child] = []
    try:
        config = resolve_config(getattr(args, "config", None))
        os.environ[CONFIG_ENV] = str(config.path)
        if args.emulator == "always" or (args.emulator == "auto" and not config.users):
            from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

            server = EmulatorServer(EmulatorConfig(host="127.0.0.1", port=0, latency_ms=0, parallel=8)).start()
            os.environ[BASE_URL_ENV] = server.base_url
        settings = load_settings(config.path)
        check_bind(args.host, settings)
        if not args.no_dagster and not is_loopback_host(args.host):
            print(f"warning: the Dagster UI has no login: anyone who reaches {args.host}:{args.dagster_port} "
                  f"can launch runs", file=sys.stderr)
        if server is not None:
            ollama = f"{server.base_url}  (the bundled emulator, no Ollama configured)"
        else:
            ollama = _check_ollama(settings, config)
        busy = [f"{name} port {port}" for name, port, wanted in
                (("--web-port", args.web_port, True), ("--dagster-port", args.dagster_port, not args.no_dagster))
                if wanted and port_in_use(args.host, port)]
        if busy:
            print(f"error: already in use on {args.host}: {', '.join(busy)}; stop what listens there or choose "
                  f"another port", file=sys.stderr)
            return 1
        note = library_note(settings, demo=not config.users)
        dagster_url = None if args.no_dagster else url_of(args.host, args.dagster_port)
        env = _child_env(settings, ensure_dagster_home().resolve(), dagster_url)
        if stop.is_set():
            return 0
        print("starting the web UI" + ("" if args.no_dagster else " and the Dagster UI (dagster dev)") + " ...",
              flush=True)
        children = start_servers(args, settings, env)
        try:
            if not wait_ready(children, timeout=args.timeout, should_stop=stop.is_set):
                return 0
        except StartError as exc:
            _print_failure(exc.child, exc.reason)
            return 1
        _print_ready(args, children, config, note, ollama)
        return _watch(children, stop)
    finally:
        if children:
            print("stopping " + ", ".join(c.name for c in children) + " ...", flush=True)
            killed = stop_all(children, grace=args.grace)
            print("stopped" + (f" ({', '.join(killed)} needed SIGKILL)" if killed else ""), flush=True)
            for child in children:
                for command in child.killed_commands:
                    print(f"  killed: {command[:200]}", flush=True)
        if server is not None:
            server.stop()
        restore_handlers(previous)


def _check_ollama(settings: Settings, config: UiConfig) -> str:
    """The Ollama line of the summary; says clearly when the configured Ollama does not answer."""
    from ollama_pipeline.core.client import OllamaClient

    health = OllamaClient(settings.ollama).health()
    if health.ok:
        return f"{health.base_url}  (version {health.version})"
    print(f"warning: Ollama at {health.base_url} is not reachable ({health.error_code}): {health.error}\n"
          f"  the UIs start anyway and show stored results, but runs and re-runs fail until it answers:\n"
          f"  start Ollama, fix ollama.base_url in {config.path}, or run with --emulator always", file=sys.stderr)
    return f"{health.base_url}  (NOT reachable)"


def register(subparsers: Any) -> None:
    """Add `ui` to the `ollama-pipeline` sub-commands."""
    p = subparsers.add_parser("ui", help="the results web UI, the Dagster UI and (when no Ollama is configured) "
                                         "the emulator, together; Ctrl-C stops them all")
    p.add_argument("--host", default="127.0.0.1", help="address both UIs bind (default 127.0.0.1; others need "
                                                        "pipeline.web_token)")
    p.add_argument("--web-port", type=int, default=WEB_PORT, help=f"results web UI port (default {WEB_PORT})")
    p.add_argument("--dagster-port", type=int, default=DAGSTER_PORT,
                   help=f"Dagster UI port (default {DAGSTER_PORT})")
    p.add_argument("--no-dagster", action="store_true", help="start only the results web UI")
    p.add_argument("--emulator", choices=["auto", "always", "never"], default="auto",
                   help="auto: the bundled emulator when no configuration of yours exists (default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each UI may take to answer (default 120)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds between SIGTERM and SIGKILL when stopping (default 30: dagster dev stops its "
                        "webserver, daemon and code server one after another, 4-5 s on an idle machine, "
                        "over 10 s on a loaded one)")
    p.set_defaults(handler=run_ui)
