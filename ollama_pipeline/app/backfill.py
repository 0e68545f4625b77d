"""`ollama-pipeline backfill --where ...`: a targeted Dagster backfill over the items a question selects.

The selection is answered and stored by core.backfill; this module launches ONE Dagster asset backfill over
the partitions that hold the items, through Dagster's public GraphQL API (`launchPartitionBackfill`, the
mutation the UI's "Materialize partitions" dialog sends), with the selection id in the run tag
`ollama/selection`:

- `--webserver URL` (or the web UI's button, with `pipeline.dagster_ui_url`): the request goes to that
  dagster-webserver over HTTP; missing partitions are added first with `addDynamicPartition`.
- otherwise: the same mutation runs through the `dagster-graphql` command of the dagster-graphql package on
  the local instance ($DAGSTER_HOME, as `ollama-pipeline run` uses) and this project's code location;
  missing partitions are added with `DagsterInstance.add_dynamic_partitions`.

Either way the backfill is on Dagster's Backfills page (cancellable there) and the Dagster daemon (`make ui`
runs one; a deployment has its own) launches its runs. `--wait` waits for them; `--daemon` starts a
`dagster-daemon` for the wait when none runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.errors import NetworkError, ValidationError

GraphQL = Callable[[str, dict[str, Any] | None], dict[str, Any]]
CODE_LOCATION_MODULE = "ollama_pipeline.definitions"
LAUNCH = """
mutation LaunchTargetedBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
MEDIA_NODE = """
query MediaPartitions {
  assetNodeOrError(assetKey: {path: ["media"]}) {
    __typename
    ... on AssetNode { partitionKeys repository { name location { name } } }
  }
}"""
BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status numCancelable runs(limit: 1000) { runId status tags { key value } } }
    ... on Error { message }
  }
}"""
CANCEL = """
mutation Cancel($id: String!) {
  cancelPartitionBackfill(backfillId: $id) { __typename ... on Error { message } }
}"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
ADD_BATCH = 200  # addDynamicPartition fields per request


def _error(message: str) -> NetworkError:
    return NetworkError(message, code="network.dagster")


def http_graphql(base_url: str, *, timeout: float = 60.0) -> GraphQL:
    """GraphQL over HTTP to a dagster-webserver (what its UI does)."""
    import requests

    url = base_url.rstrip("/") + "/graphql"

    def call(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=timeout)
        except requests.RequestException as exc:
            raise _error(f"Dagster webserver {base_url} does not answer ({type(exc).__name__}); nothing was "
                         "launched") from None
        if response.status_code != 200:
            raise _error(f"Dagster webserver {base_url} answered HTTP {response.status_code}; nothing was launched")
        return _data(response.json())

    return call


def cli_graphql(*, timeout: float = 300.0) -> GraphQL:
    """GraphQL through the `dagster-graphql` command on the local instance and this code location."""
    command = shutil.which("dagster-graphql", path=str(Path(sys.executable).parent)) or shutil.which("dagster-graphql")
    if command is None:
        raise _error("the dagster-graphql command is not installed (package dagster-graphql)")

    def call(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="ollama-backfill-") as tmp:
            out = Path(tmp) / "answer.json"
            proc = subprocess.run([command, "-m", CODE_LOCATION_MODULE, "-t", query, "-v", json.dumps(variables or {}),
                                   "-o", str(out)], capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                       f"{os.environ.get('PATH', '')}"})
            if proc.returncode != 0 or not out.exists():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
                raise _error(f"dagster-graphql failed (exit {proc.returncode}): {last}")
            return _data(json.loads(out.read_text()))

    return call


def _data(answer: dict[str, Any]) -> dict[str, Any]:
    if answer.get("errors"):
        raise _error("Dagster GraphQL error: " + "; ".join(str(e.get("message"))[:300] for e in answer["errors"]))
    return answer.get("data") or {}


@dataclass
class Launched:
    """What `launch` did."""

    backfill_id: str
    route: str  # webserver URL, or "dagster-graphql (local instance)"
    added_partitions: list[str] = field(default_factory=list)


def _register_remote(call: GraphQL, keys: Sequence[str]) -> list[str]:
    node = call(MEDIA_NODE, None).get("assetNodeOrError") or {}
    if node.get("__typename") != "AssetNode":
        raise _error("the Dagster webserver has no `media` asset: is this project's code location loaded?")
    missing = [k for k in keys if k not in set(node.get("partitionKeys") or [])]
    repo = node["repository"]
    selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}
    for start in range(0, len(missing), ADD_BATCH):
        chunk = missing[start:start + ADD_BATCH]
        fields = "\n".join(
            f'a{i}: addDynamicPartition(partitionsDefName: "media_blocks", partitionKey: {json.dumps(k)}, '
            f"repositorySelector: $repo) {{ __typename ... on Error {{ message }} }}" for i, k in enumerate(chunk))
        answer = call(f"mutation AddBlocks($repo: RepositorySelector!) {{\n{fields}\n}}", {"repo": selector})
        for value in answer.values():
            if value.get("__typename") not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
                raise _error(f"adding partitions failed: {value.get('message') or value.get('__typename')}")
    return missing


def _register_local(keys: Sequence[str]) -> list[str]:
    from ollama_pipeline.app.orchestrate import dagster_instance
    from ollama_pipeline.defs.partitions import register_partitions

    return register_partitions(dagster_instance(), keys).added


def launch(selection_id: str, keys: Sequence[str], stages: Sequence[str], *, where_text: str,
           webserver: str | None, call: GraphQL | None = None) -> Launched:
    """Register the partitions, then launch one asset backfill over them for the stages; returns its id."""
    if webserver:
        call = call or http_graphql(webserver)
        added = _register_remote(call, keys)
        route = webserver
    else:
        added = _register_local(keys)
        call = call or cli_graphql()
        route = "dagster-graphql (local instance)"
    params = {"assetSelection": [{"path": [name]} for name in stages], "partitionNames": list(keys),
              "tags": [{"key": "ollama/selection", "value": selection_id}],
              "title": f"ollama {selection_id}: " + " ".join(where_text.splitlines())[:200],
              "description": f"Targeted backfill: {' AND '.join(where_text.splitlines())}"}
    result = call(LAUNCH, {"params": params}).get("launchPartitionBackfill") or {}
    if result.get("__typename") != "LaunchBackfillSuccess":
        raise _error(f"Dagster refused the backfill ({result.get('__typename')}): {result.get('message', '')}"[:400])
    return Launched(result["backfillId"], route, added)


def backfill_state(call: GraphQL, backfill_id: str) -> dict[str, Any]:
    return call(BACKFILL, {"id": backfill_id}).get("partitionBackfillOrError") or {}


def cancel(call: GraphQL, backfill_id: str) -> str:
    """Cancel a backfill (what the Backfills page's Cancel does); returns the result type name."""
    return (call(CANCEL, {"id": backfill_id}).get("cancelPartitionBackfill") or {}).get("__typename", "")


def wait_for_runs(call: GraphQL, backfill_id: str, *, timeout: float, poll: float = 1.0) -> list[dict[str, Any]]:
    """Poll until the backfill has runs and every run finished; a deadline ends the wait (NetworkError)."""
    deadline = time.monotonic() + timeout
    while True:
        state = backfill_state(call, backfill_id)
        runs = state.get("runs") or []
        if runs and all(r["status"] in FINISHED for r in runs):
            return runs
        if state.get("status") in ("FAILED", "CANCELED", "COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED"):
            return runs
        if time.monotonic() > deadline:
            raise _error(f"backfill {backfill_id} did not finish within {timeout:g} s (status "
                         f"{state.get('status')}, {len(runs)} run(s)); it keeps going in Dagster")
        time.sleep(poll)


def start_daemon(dagster_home: Path, log: Path) -> subprocess.Popen[bytes]:
    """`dagster-daemon run` on this code location, in its own session (stop it with `stop_group`)."""
    command = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent)) or "dagster-daemon"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("ab") as out:
        return subprocess.Popen([command, "run", "-m", CODE_LOCATION_MODULE], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group, each with a deadline."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


# ---- the command ----------------------------------------------------------------------------------------


def webserver_url(text: str) -> str:
    """A dagster-webserver base URL (http or https, with a host); a ValidationError otherwise."""
    from urllib.parse import urlparse

    parsed = urlparse(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValidationError(f"--webserver {text!r} is not a URL such as http://127.0.0.1:3000",
                              code="validation.payload")
    return text.strip().rstrip("/")


def backfill_link(settings: Settings, backfill_id: str, webserver: str | None) -> str:
    return f"{(webserver or settings.pipeline.dagster_ui_url).rstrip('/')}/runs/b/{backfill_id}"


def run_backfill(settings: Settings, where: Sequence[str] | None, *, stages: str | None = None,
                 dry_run: bool = False, webserver: str | None = None, source: str = "cli",
                 extra: Sequence[Any] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Select, store and launch; returns what was printed as a dict (selection id, items, backfill id...)."""
    from ollama_pipeline.core import backfill as core
    from ollama_pipeline.core.db.engine import engine_for_settings
    from ollama_pipeline.core.selection import parse_job_types

    question = core.parse_where(where) if where is not None or not extra else None
    chosen = parse_job_types(stages, also=("media",)) if stages else None
    engine = engine_for_settings(settings)
    started = time.perf_counter()
    selection = core.select_items(engine, settings, question, extra=extra, stages=chosen, dry_run=dry_run,
                                  source=source)
    summary: dict[str, Any] = {**selection.as_dict(), "partition_keys": selection.partitions[:20]}
    shown = ", ".join(selection.partitions[:8]) + (f" and {len(selection.partitions) - 8} more"
                                                   if len(selection.partitions) > 8 else "")
    where_text = " AND ".join(selection.where_text.splitlines()) or "the web UI's filter"
    if dry_run:
        echo(f"dry run: {selection.items} item(s) in {len(selection.partitions)} partition(s) match {where_text}"
             f"; stages: {', '.join(selection.stages)}" + (f"; partitions: {shown}" if shown else ""))
        return summary
    if selection.items == 0:
        core.forget_selection(engine, selection.id or "")
        echo(f"0 items match {where_text}: no selection stored, no backfill launched")
        return {**summary, "selection_id": None}
    try:
        launched = launch(selection.id or "", selection.partitions, selection.stages, where_text=selection.where_text,
                          webserver=webserver)
    except BaseException:
        core.forget_selection(engine, selection.id or "")
        raise
    core.record_backfill(engine, selection.id or "", launched.backfill_id)
    summary.update(backfill_id=launched.backfill_id, route=launched.route,
                   link=backfill_link(settings, launched.backfill_id, webserver),
                   seconds=round(time.perf_counter() - started, 3))
    echo(f"selection {selection.id}: {selection.items} item(s) in {len(selection.partitions)} partition(s) "
         f"({shown}); stages: {', '.join(selection.stages)}")
    echo(f"backfill {launched.backfill_id} launched through {launched.route}"
         + (f" ({len(launched.added_partitions)} partition(s) added)" if launched.added_partitions else ""))
    echo(f"Dagster UI: {summary['link']}  (the Dagster daemon runs it; cancel it on the Backfills page)")
    return summary


def _cmd_backfill(args: argparse.Namespace) -> int:
    from ollama_pipeline.app.cli import settings_from_args

    settings = settings_from_args(args)
    if args.wait is not None and args.wait <= 0:
        raise ValidationError(f"--wait must be a positive number of seconds, got {args.wait}", code="validation.payload")
    if args.daemon and args.wait is None:
        raise ValidationError("--daemon runs a Dagster daemon only while waiting: give --wait SECONDS too",
                              code="validation.payload")
    if args.webserver is not None:
        args.webserver = webserver_url(args.webserver)
    summary = run_backfill(settings, args.where, stages=args.stages, dry_run=args.dry_run, webserver=args.webserver)
    if args.json:
        print(json.dumps(summary))
    if args.dry_run or not summary.get("backfill_id") or args.wait is None:
        return 0
    call = http_graphql(args.webserver) if args.webserver else cli_graphql()
    daemon = None
    if args.daemon:
        from ollama_pipeline.app.orchestrate import ensure_dagster_home

        home = ensure_dagster_home()
        daemon = start_daemon(home, home / "backfill-daemon.log")
    try:
        runs = wait_for_runs(call, summary["backfill_id"], timeout=args.wait, poll=2.0)
    finally:
        if daemon is not None:
            stop_group(daemon)
    print(f"backfill {summary['backfill_id']}: " + ", ".join(f"{r['runId'][:8]} {r['status']}" for r in runs))
    return 0 if all(r["status"] == "SUCCESS" for r in runs) else 1


def register(sub: Any) -> None:
    from ollama_pipeline.core.backfill import WHERE_HELP

    p = sub.add_parser("backfill", help="launch one Dagster backfill over the items a question selects",
                       description="Select items in SQL (every --where must hold), store the selection under an "
                       "id and launch one Dagster backfill over the partitions that hold them; its runs touch "
                       f"only the selected items. Clauses: {WHERE_HELP}.")
    p.add_argument("--where", action="append", metavar="KEY=VALUE", help=f"a clause (repeatable): {WHERE_HELP}")
    p.add_argument("--stages", help="the stages to materialize (default: the stages the clauses name, else all)")
    p.add_argument("--dry-run", action="store_true", help="count the items and partitions only")
    p.add_argument("--webserver", metavar="URL", help="launch through this dagster-webserver's GraphQL API "
                   "(default: the dagster-graphql command on the local instance)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the backfill's runs")
    p.add_argument("--daemon", action="store_true", help="with --wait: run a dagster-daemon while waiting "
                   "(when no `make ui` or deployment daemon runs)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(handler=_cmd_backfill)
