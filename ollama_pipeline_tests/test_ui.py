"""`ollama-pipeline ui`: after a demo run, both UIs answer on the chosen ports (the gallery shows the demo's
titles, Dagster lists the project's assets), and SIGTERM stops every process it started; plus the supervisor
underneath: a child that dies is named with its last output, one that ignores SIGTERM is killed."""

from __future__ import annotations

import html
import json
import os
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
from sqlalchemy import select

from ollama_pipeline.app.demo import BASE_URL_ENV, DEMO_DIR, _demo_config
from ollama_pipeline.app.demo_library import build_demo_library
from ollama_pipeline.app.supervise import StartError, remaining, start_child, stop_all, wait_ready
from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.db.engine import init_db
from ollama_pipeline.core.db.repository import values_table
from ollama_pipeline.core.jsontext import loads_or_none
from ollama_pipeline.core.runner import Pipeline, run_stage

PROC = Path("/proc")
ASSETS = "{ assetNodes { assetKey { path } } }"
RUNS = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"

pytestmark = pytest.mark.skipif(not PROC.is_dir(), reason="reads /proc to find leftover processes")


@pytest.fixture(autouse=True)
def _sigint_at_default() -> Iterator[None]:
    """pytest started in the background by a non-interactive shell inherits SIGINT ignored, which
    start_child refuses (its children would inherit it); `ollama-pipeline ui` installs its handlers first."""
    saved = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _answers(url: str) -> bool:
    try:
        return _get(url, timeout=1.0)[0] == 200
    except (urllib.error.URLError, OSError):
        return False


def _graphql(base: str, query: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _stats() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process."""
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            rest = raw[raw.rindex(")") + 2 :].split()
            out[int(entry.name)] = (int(rest[1]), rest[0], rest[19])
    return out


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live process below pid."""
    stats = _stats()
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state, start) in stats.items():
            if ppid == parent and state != "Z" and (child, start) not in found:
                found.add((child, start))
                todo.append(child)
    return found


def _still_running(processes: set[tuple[int, str]]) -> list[int]:
    stats = _stats()
    return [pid for pid, start in processes if pid in stats and stats[pid][2] == start and stats[pid][1] != "Z"]


@pytest.fixture
def demo_dir(tmp_path: Path, emulator: Any) -> tuple[Path, dict[int, str]]:
    """A folder as `make demo` leaves it (demo config, library in LocalSupervisor's schema, caption and title
    run); returns the titles."""
    config = tmp_path / DEMO_DIR / "ollama_pipeline.yaml"
    _demo_config(config)
    settings = load_settings(config, env={BASE_URL_ENV: emulator.base_url})
    pipeline = Pipeline.from_settings(settings)
    report = build_demo_library(pipeline.engine, settings.media_root, 3, sizes="small", max_side=256,
                                layout="localsupervisor")
    init_db(pipeline.engine)
    for stage in ("ollama_caption", "ollama_title"):
        assert all(o.status != "failed" for o in run_stage(pipeline, stage, report.media_ids))
    values = values_table(pipeline.engine)
    with pipeline.engine.connect() as conn:
        titles = {m: loads_or_none(v)["text"] for m, v in conn.execute(
            select(values.c.media_id, values.c.value).where(values.c.key == "ollama.title"))}
    pipeline.engine.dispose()
    assert len(titles) == 3
    return tmp_path, titles


@pytest.fixture
def ui(demo_dir: tuple[Path, dict[int, str]]) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    """`ollama-pipeline ui` on free ports in that folder, with no DAGSTER_HOME and no user config."""
    folder, _ = demo_dir
    web_port, dagster_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("OLLAMA_PIPELINE")}
    out = folder / "ui.out"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ollama_pipeline.app.cli", "ui", "--web-port", str(web_port),
                                 "--dagster-port", str(dagster_port), "--timeout", "240"],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, web_port, dagster_port, out
    finally:
        if proc.poll() is None:  # the test failed before stopping it: do not leave servers behind
            left = _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in _still_running(left):
                os.kill(pid, signal.SIGKILL)


def _click_rerun(web: str, media_id: int, stage: str) -> tuple[int, str]:
    """What the item page's Re-run button does: its form post, with the page's CSRF cookie."""
    import httpx

    with httpx.Client(base_url=web, timeout=30) as client:
        client.get(f"/media/{media_id}")
        response = client.post(f"/media/{media_id}/rerun",
                               data={"stage": stage, "csrf_token": client.cookies.get("op_csrf", "")})
    assert response.status_code == 200, response.text[:500]
    import re

    found = re.search(r"<strong>(queued|already queued)</strong> \(job (\d+)\)", response.text)
    assert found, response.text[:2000]
    return int(found.group(2)), found.group(1)


def _library(folder: Path) -> Pipeline:
    return Pipeline.from_settings(load_settings(folder / DEMO_DIR / "ollama_pipeline.yaml"))


def _job_status(library: Pipeline, job_id: int) -> str:
    """The job's status in the library's queue (LocalSupervisor's `jobs` table for the demo)."""
    from ollama_pipeline.core.queue import store

    return store.get_job(library, job_id).status


def test_ui_serves_the_demo_results_and_dagster_then_sigterm_stops_everything(
        ui: tuple[subprocess.Popen[bytes], int, int, Path], demo_dir: tuple[Path, dict[int, str]]) -> None:
    """Gallery shows the demo's titles, Dagster lists the assets, SIGTERM ends it all within 20 s."""
    proc, web_port, dagster_port, out = ui
    _, titles = demo_dir
    web, dagster = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{dagster_port}"
    deadline = time.monotonic() + 250  # a loaded 2-core machine starts dagster dev slowly
    while "is up" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.25)
    printed = out.read_text()
    assert f"{web}/" in printed and f"{dagster}/" in printed and "Ctrl-C" in printed, printed
    assert "bundled emulator" in printed and "(the demo's)" in printed and "3 media item(s)" in printed, printed

    status, gallery = _get(f"{web}/")
    assert status == 200
    assert all(html.escape(title) in gallery for title in titles.values()), gallery[:2000]
    status, page = _get(f"{web}/media/{min(titles)}")
    assert status == 200 and f"{dagster}/" in page, "item page links to the Dagster UI on the chosen port"
    assert _answers(f"{dagster}/server_info")
    deadline = time.monotonic() + 60
    while True:  # the code location may still be loading right after /server_info answers
        nodes = {"/".join(n["assetKey"]["path"]) for n in
                 (_graphql(dagster, ASSETS).get("data") or {}).get("assetNodes") or []}
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"media", "ollama_caption", "ollama_title"} <= nodes

    started = _descendants(proc.pid)
    assert len(started) >= 4, "web UI, dagster dev, its webserver and its daemon"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, out.read_text()  # the deadline of the wait, not a timing claim
    assert _still_running(started) == [], out.read_text()
    assert not _answers(f"{web}/healthz") and not _answers(f"{dagster}/server_info")
    printed = out.read_text()
    assert "stopped" in printed and "SIGKILL" not in printed, printed


def test_a_rerun_click_under_make_ui_is_processed_by_a_dagster_run(
        ui: tuple[subprocess.Popen[bytes], int, int, Path], demo_dir: tuple[Path, dict[int, str]]) -> None:
    """Under `ollama-pipeline ui` (`make ui`), the item page's Re-run queues a job; the queue sensor, running
    by default in `dagster dev`, turns it into a Dagster run that processes it: the job ends done."""
    proc, web_port, dagster_port, out = ui
    _, titles = demo_dir
    web, dagster = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{dagster_port}"
    deadline = time.monotonic() + 250
    while "is up" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.25)
    job_id, status = _click_rerun(web, min(titles), "ollama_title")
    assert status == "queued"
    library = _library(demo_dir[0])
    deadline = time.monotonic() + 240  # bound of the poll only: a tick is 30 s, a run a few seconds
    while (state := _job_status(library, job_id)) not in ("done", "failed"):
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, f"job {job_id} still {state}: " + out.read_text()[-3000:]
        time.sleep(1.0)
    assert state == "done"
    while True:  # the run that processed it shows in Dagster with the job's batch tag, and ends
        runs = (_graphql(dagster, RUNS).get("data") or {}).get("runsOrError", {}).get("results") or []
        if runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            break
        assert time.monotonic() < deadline, runs
        time.sleep(1.0)
    assert [r["status"] for r in runs] == ["SUCCESS"]
    assert any(t["key"] == "ollama_pipeline/batch" for t in runs[0]["tags"])
    library.engine.dispose()


def test_ui_refuses_a_port_in_use_naming_it(tmp_path: Path) -> None:
    """A busy --web-port stops start-up with exit 1 and a message naming the option and port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_PIPELINE")}
        result = subprocess.run([sys.executable, "-m", "ollama_pipeline.app.cli", "ui", "--web-port", str(port),
                                 "--no-dagster"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"--web-port port {port}" in result.stderr


def test_a_child_that_exits_is_named_with_its_last_output(tmp_path: Path) -> None:
    """wait_ready raises for the child that exited, with the lines it wrote to stderr."""
    child = start_child("broken server", [sys.executable, "-c", "import sys; sys.exit('cannot bind: boom')"],
                        env=dict(os.environ), cwd=tmp_path, log_path=tmp_path / "broken.log",
                        ready_url=f"http://127.0.0.1:{_free_port()}/")
    with pytest.raises(StartError) as caught:
        wait_ready([child], timeout=20, should_stop=lambda: False)
    assert caught.value.child.name == "broken server" and "exited with code 1" in caught.value.reason
    assert "cannot bind: boom" in child.tail()


def test_stop_kills_a_group_that_ignores_sigterm_and_a_grandchild_in_its_own_session(tmp_path: Path) -> None:
    """After the grace period SIGKILL ends the child and a grandchild that left its process group."""
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'], start_new_session=True)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    child = start_child("stubborn", [sys.executable, "-c", script], env=dict(os.environ), cwd=tmp_path,
                        log_path=tmp_path / "stubborn.log", ready_url="http://127.0.0.1:9/")
    deadline = time.monotonic() + 20
    while "ready" not in child.tail() or len(_descendants(child.proc.pid)) < 1:
        assert time.monotonic() < deadline, child.tail()
        time.sleep(0.05)
    below = _descendants(child.proc.pid)
    assert stop_all([child], grace=1.0) == ["stubborn"]
    assert child.proc.returncode == -signal.SIGKILL
    assert _still_running(below) == [] and remaining(child) == set()
