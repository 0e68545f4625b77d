"""The real Dagster UI server: `dagster-webserver -w workspace.yaml` loads the code location, its GraphQL API
lists media and every stage asset with their lineage, and the whole process group stops cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ollama_pipeline.core.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSET_NODES = "{ assetNodes { assetKey { path } dependencyKeys { path } groupName } }"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> signal.Signals | None:
    """SIGINT to the whole group (webserver and its code server), escalating until none is left; returns
    the signal that ended it (None if it was already gone)."""
    pgid = proc.pid  # the leader of its own session and group
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        proc.poll()
        if not _group_alive(pgid):
            return None if sig == signal.SIGINT else sig
        os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
            time.sleep(0.1)
        if not _group_alive(pgid):
            return sig
    return signal.SIGKILL


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """dagster-webserver on a free loopback port, in its own session with SIGINT at its default."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "webserver.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "webserver did not answer /server_info within 60 s"
            time.sleep(0.25)
        yield base, proc
    finally:
        _stop_group(proc)
        log.close()


def _graphql(base: str, query: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_webserver_shows_media_and_every_stage_with_lineage_then_stops_cleanly(
        webserver: tuple[str, subprocess.Popen[bytes]]) -> None:
    """GraphQL lists media + all registry stages, each stage below media and its upstream stages."""
    base, proc = webserver
    deadline = time.monotonic() + 60
    while True:  # the code location may still be loading right after /server_info answers
        data = _graphql(base, ASSET_NODES)
        nodes = {"/".join(n["assetKey"]["path"]): n for n in (data.get("data") or {}).get("assetNodes") or []}
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"media", "scan_results", *STAGES} <= set(nodes), data
    assert nodes["media"]["groupName"] == "library"
    for stage in STAGES.values():
        deps = {"/".join(d["path"]) for d in nodes[stage.job_type]["dependencyKeys"]}
        assert deps == {"media", *stage.external_inputs, *stage.upstream}
        assert nodes[stage.job_type]["groupName"] == stage.group

    stopped_by = _stop_group(proc)
    assert stopped_by in (signal.SIGINT, signal.SIGTERM), f"needed {stopped_by!r} to stop"
    assert proc.returncode is not None
    assert not _group_alive(proc.pid), "a process of the webserver's group is still running"
