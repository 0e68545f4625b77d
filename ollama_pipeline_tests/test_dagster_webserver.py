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
from ollama_pipeline.defs.assets import ASSET_GROUP

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
def webserver_env() -> dict[str, str]:
    """Extra environment of the webserver (a test overrides this fixture to give it a settings file)."""
    return {}


@pytest.fixture
def webserver(tmp_path: Path, webserver_env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """dagster-webserver on a free loopback port, in its own session with SIGINT at its default."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           **webserver_env}
    log = (tmp_path / "webserver.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a generous deadline: a loaded machine takes over a minute to start it
        while True:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "webserver did not answer /server_info within 180 s"
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
    assert {n["groupName"] for n in nodes.values()} == {ASSET_GROUP}  # one group: the lineage opens expanded
    for stage in STAGES.values():
        deps = {"/".join(d["path"]) for d in nodes[stage.job_type]["dependencyKeys"]}
        assert deps == {"media", *stage.external_inputs, *stage.upstream}

    stopped_by = _stop_group(proc)
    assert stopped_by in (signal.SIGINT, signal.SIGTERM), f"needed {stopped_by!r} to stop"
    assert proc.returncode is not None
    assert not _group_alive(proc.pid), "a process of the webserver's group is still running"


RESOURCES = """{ allTopLevelResourceDetailsOrError(repositorySelector: {repositoryLocationName: "ollama_pipeline",
  repositoryName: "__repository__"}) { __typename ... on ResourceDetailsList { results { name
  configuredValues { key value type } nestedResources { name type } } } ... on PythonError { message } } }"""
SECRETS = ("ollama-file-pw", "host-file-pw", "db-file-pw", "env-ollama-pw")


class TestResourcePage:
    """The UI's resource page of a code location whose settings file and environment hold passwords."""

    @pytest.fixture
    def webserver_env(self, tmp_path: Path) -> dict[str, str]:
        config = tmp_path / "ollama_pipeline.yaml"
        config.write_text(json.dumps({
            "ollama": {"base_url": "http://alice:ollama-file-pw@127.0.0.1:9", "model": {"default": "llava:7b"},
                       "timeout_ms": 4000, "max_image_bytes": 1_000_000, "keep_alive": "45m",
                       "hosts": [{"base_url": "http://carol:host-file-pw@127.0.0.1:10", "parallel": 2}]},
            "database": {"url": "postgresql://bob:db-file-pw@127.0.0.1:5432/library"},
            "media_root": str(tmp_path / "media")}), encoding="utf-8")
        return {"OLLAMA_PIPELINE_CONFIG": str(config), "OLLAMA_PIPELINE_OLLAMA_PASSWORD": "env-ollama-pw"}

    def test_resource_page_shows_urls_models_timeouts_and_database_without_a_password(
            self, webserver: tuple[str, subprocess.Popen[bytes]]) -> None:
        """GraphQL's resource details: redacted URLs, the YAML's values, the password as an EnvVar name."""
        base, _ = webserver
        deadline = time.monotonic() + 60
        while True:  # the code location may still be loading right after /server_info answers
            data = _graphql(base, RESOURCES)
            found = (data.get("data") or {}).get("allTopLevelResourceDetailsOrError") or {}
            if found.get("results") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        text = json.dumps(data)
        assert not [s for s in SECRETS if s in text], text
        shown = {r["name"]: {v["key"]: (json.loads(v["value"]) if v["type"] == "VALUE" else v["value"], v["type"])
                             for v in r["configuredValues"]} for r in found["results"]}
        ollama, library = shown["ollama"], shown["library"]
        assert ollama["base_url"] == ("http://alice:***@127.0.0.1:9", "VALUE")
        assert ollama["password"] == ("OLLAMA_PIPELINE_OLLAMA_PASSWORD", "ENV_VAR")
        assert [(h["base_url"], h["parallel"]) for h in ollama["hosts"][0]] == [("http://carol:***@127.0.0.1:10", 2)]
        assert (ollama["model"][0], ollama["timeout_ms"][0], ollama["keep_alive"][0]) == ("llava:7b", 4000, "45m")
        assert library["database_url"][0] == "postgresql://bob:***@127.0.0.1:5432/library"
        nested = {r["name"]: {n["name"]: n["type"] for n in r["nestedResources"]} for r in found["results"]}
        assert nested["pipeline"] == {"ollama": "TOP_LEVEL", "library": "TOP_LEVEL"}
