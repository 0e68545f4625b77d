"""The `ollama-pipeline web` command: serve the web UI with uvicorn, on loopback unless a token is set.

`register(subparsers)` adds it to the main parser (`ollama_pipeline.app.cli`). Binding to a non-loopback host
is refused with a `validation.config` error unless `pipeline.web_token` is set (at least 16 characters);
with a token, every request must carry it (see `web.security`). The access log never shows the token.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from ollama_pipeline.app.web.security import is_loopback_host
from ollama_pipeline.core.config import Settings, load_settings
from ollama_pipeline.core.errors import ConfigError

_TOKEN_IN_QUERY = re.compile(r"(?i)([?&]token=)[^&\s]*")


class RedactTokenFilter(logging.Filter):
    """Masks `token=` query values in uvicorn's access-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


MIN_TOKEN_LENGTH = 16
"""Shortest `pipeline.web_token` accepted for a non-loopback bind (a guessable token is no guard)."""


def check_bind(host: str, settings: Settings) -> None:
    """Refuse a non-loopback bind without a `pipeline.web_token` of at least MIN_TOKEN_LENGTH characters."""
    if is_loopback_host(host):
        return
    token = settings.pipeline.web_token
    if not token:
        raise ConfigError(f"refusing to serve the web UI on non-loopback host {host!r} without "
                          f"pipeline.web_token: set a token (it is then required on every request) "
                          f"or bind to 127.0.0.1", code="validation.config")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"refusing to serve the web UI on non-loopback host {host!r}: pipeline.web_token "
                          f"has {len(token)} characters, at least {MIN_TOKEN_LENGTH} are required "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')",
                          code="validation.config")


def _cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from ollama_pipeline.app.web.app import create_app

    settings = load_settings(getattr(args, "config", None))
    check_bind(args.host, settings)
    app = create_app(settings)
    logging.getLogger("uvicorn.access").addFilter(RedactTokenFilter())
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"web UI on http://{shown}:{args.port}/" + (" (token required)" if settings.pipeline.web_token else ""))
    uvicorn.run(app, host=args.host, port=args.port, proxy_headers=False, server_header=False,
                log_level=args.log_level)
    return 0


def register(subparsers: Any) -> None:
    """Add `web` to the `ollama-pipeline` sub-commands."""
    p = subparsers.add_parser("web", help="serve the web UI (gallery, item pages, re-runs, queue)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need "
                                                        "pipeline.web_token)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=_cmd_web)
