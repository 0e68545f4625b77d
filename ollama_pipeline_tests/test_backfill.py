"""Targeted backfills (issue 13 item 3): `ollama-pipeline backfill --where ...` selects items in SQL, stores the
selection, launches ONE real Dagster backfill through the webserver's GraphQL `launchPartitionBackfill` (or
the `dagster-graphql` command), and the daemon's runs touch only the selected items."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import Engine, func, select

from ollama_pipeline.app.backfill import (
    backfill_state,
    cancel,
    http_graphql,
    run_backfill,
    stop_group,
    wait_for_runs,
)
from ollama_pipeline.app.cli import main
from ollama_pipeline.core.backfill import SELECTION_TAG, parse_where, select_items
from ollama_pipeline.core.config import Settings
from ollama_pipeline.core.db.models import OllamaBackfillItem, OllamaBackfillSelection, OllamaStageResult

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CAPTION = "ollama_caption"
OLD_MODEL, NEW_MODEL = "qwen2.5vl:7b", "llava:7b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_media_asset(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until the webserver answers and its code location lists the `media` asset (deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            answer = requests.post(f"{base}/graphql", timeout=5, json={
                "query": '{ assetNodeOrError(assetKey: {path: ["media"]}) { __typename } }'}).json()
            if (answer.get("data") or {}).get("assetNodeOrError", {}).get("__typename") == "AssetNode":
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"webserver did not load the code location in {timeout} s"
        time.sleep(0.5)


class Deployment:
    """A Dagster instance in tmp_path with a webserver (and optionally the daemon) on this code location."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.home = tmp_path / "dagster_home"
        self.home.mkdir(exist_ok=True)
        shutil.copy(REPO / "dagster.yaml", self.home / "dagster.yaml")
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "OLLAMA_PIPELINE_CONFIG": str(config),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.base = ""

    def start_webserver(self, *, wait: bool = True) -> str:
        port = _free_port()
        self.web_log = self.tmp / "webserver.log"
        self.web = _start([str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p",
                           str(port)], self.env, self.web_log)
        self.procs.append(self.web)
        self.base = f"http://127.0.0.1:{port}"
        if wait:
            self.wait_for_webserver()
        return self.base

    def wait_for_webserver(self) -> None:
        _wait_for_media_asset(self.base, self.web, self.web_log)

    def start_daemon(self) -> None:
        self.procs.append(_start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], self.env,
                                 self.tmp / "daemon.log"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)


def _write_config(path: Path, settings: Settings) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")), encoding="utf-8")
    return path


def _materialize(settings: Settings, ids: list[int], home: Path) -> None:
    """Caption the items in process on the deployment's instance (what `ollama-pipeline run` does)."""
    from dagster import DagsterInstance

    from ollama_pipeline.defs.launch import materialize_stages

    with DagsterInstance.from_config(str(home)) as instance:
        summary = materialize_stages(settings, ids, [CAPTION], instance)
    assert summary.ok, summary.render()


def _caption_models(engine: Engine) -> dict[int, str]:
    r = OllamaStageResult
    with engine.connect() as conn:
        return dict(conn.execute(select(r.media_id, r.model).where(r.stage == CAPTION)).all())


@pytest.fixture
def deployment(tmp_path: Path, library: tuple[Settings, Engine, list[int]]) -> Iterator[Deployment]:
    settings, _, _ = library
    d = Deployment(tmp_path, _write_config(tmp_path / "config.yaml", settings))
    try:
        yield d
    finally:
        d.stop()


def test_a_stale_subset_backfill_runs_only_those_items(
        library: tuple[Settings, Engine, list[int]], deployment: Deployment, emulator: Any,
        settings_factory: Callable[..., Settings], sqlite_url: str) -> None:
    """Captions of 3 items were made by an older model; `--where stale=caption` launches one Dagster backfill
    through the webserver's GraphQL API, the daemon runs it, and the emulator sees exactly 3 model calls."""
    settings, engine, ids = library
    assert settings.ollama.vision_model == NEW_MODEL
    base = deployment.start_webserver(wait=False)  # both load the code location while the items are captioned
    deployment.start_daemon()
    old, fresh = ids[:3], ids[3:]
    _materialize(settings_factory(sqlite_url, ollama__vision_model=OLD_MODEL), old, deployment.home)
    _materialize(settings, fresh, deployment.home)
    assert {i: m for i, m in _caption_models(engine).items() if i in old} == dict.fromkeys(old, OLD_MODEL)

    dry = run_backfill(settings, ["stale=caption"], dry_run=True, echo=lambda _: None)
    assert dry["items"] == 3 and dry["selection_id"] is None

    deployment.wait_for_webserver()
    emulator.reset_stats()
    printed: list[str] = []
    summary = run_backfill(settings, ["stale=caption"], webserver=base, echo=printed.append)
    assert summary["items"] == 3 and summary["stages"] == [CAPTION]
    assert summary["link"] == f"{base}/runs/b/{summary['backfill_id']}"
    assert any(summary["selection_id"] in line for line in printed)

    call = http_graphql(base)
    runs = wait_for_runs(call, summary["backfill_id"], timeout=240)
    assert runs and all(r["status"] == "SUCCESS" for r in runs), runs
    assert all({"key": SELECTION_TAG, "value": summary["selection_id"]} in r["tags"] for r in runs)
    assert emulator.stats()["model_calls"] == 3
    assert _caption_models(engine) == dict.fromkeys(ids, NEW_MODEL)
    assert run_backfill(settings, ["stale=caption"], dry_run=True, echo=lambda _: None)["items"] == 0


def test_failed_with_code_selects_exactly_the_items_that_failed_with_it(
        library: tuple[Settings, Engine, list[int]], emulator: Any, tmp_path: Path) -> None:
    """After a run where the emulator answered HTTP 500 for two items, `failed=<their code>` (and its
    channel) selects exactly those items and the stage they failed in; another code selects none."""
    settings, engine, ids = library
    home = tmp_path / "dagster_home"
    home.mkdir()
    from dagster import DagsterInstance

    from ollama_pipeline.defs.launch import materialize_stages

    with DagsterInstance.from_config(str(home)) as instance:
        materialize_stages(settings, ids[2:], [CAPTION], instance)
        emulator.set_faults([{"kind": "http_500"}])
        materialize_stages(settings, ids[:2], [CAPTION], instance)
    r = OllamaStageResult
    with engine.connect() as conn:
        failed = dict(conn.execute(select(r.media_id, r.error_code).where(r.status == "failed")).all())
    assert failed, "the faults made no item fail"
    assert sorted(failed) == ids[:2], failed
    code = failed[ids[0]]
    expected = sorted(i for i, c in failed.items() if c == code)

    selection = select_items(engine, settings, parse_where([f"failed={code}"]))
    with engine.connect() as conn:
        stored = list(conn.execute(select(OllamaBackfillItem.media_id).where(
            OllamaBackfillItem.selection_id == selection.id).order_by(OllamaBackfillItem.media_id)).scalars())
    assert stored == expected and selection.items == len(expected)
    assert selection.stages == [CAPTION]
    channel = code.split(".")[0]
    assert select_items(engine, settings, parse_where([f"failed={channel}", f"ids={expected[0]}"]),
                        dry_run=True).items == 1
    assert select_items(engine, settings, parse_where(["failed=network.no_such_code"]), dry_run=True).items == 0
    assert select_items(engine, settings, parse_where([f"failed=caption:{code}"]), dry_run=True).items == len(expected)


@pytest.mark.parametrize("args", [
    ["--where", "stale=nosuchstage"], ["--where", "colour=red"], ["--where", "failed="], ["--where", "quality=great"],
    ["--where", "ids=1-x"], ["--where", "ids=all"], ["--where", "never"], ["--where", "failed=Network Timeout"],
    [], ["--where", "ids=1", "--stages", "nosuchstage"], ["--where", "ids=1", "--webserver", "localhost:3000"],
    ["--where", "ids=1", "--daemon"], ["--where", "ids=1", "--wait", "-3"]])
def test_a_bad_where_clause_or_option_exits_2_with_one_line_and_stores_nothing(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        args: list[str]) -> None:
    """Every malformed clause or option is a typed one-line error with exit code 2; no selection is stored."""
    settings, engine, _ = library
    config = _write_config(tmp_path / "config.yaml", settings)
    assert main(["--config", str(config), "backfill", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error [validation/validation."), err
    assert "Traceback" not in err[0]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(OllamaBackfillSelection)).scalar() == 0


def test_an_unreachable_webserver_is_a_network_error_and_leaves_no_selection(
        library: tuple[Settings, Engine, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A webserver that does not answer: one line `network.dagster`, exit 2, the stored selection removed."""
    settings, engine, _ = library
    config = _write_config(tmp_path / "config.yaml", settings)
    assert main(["--config", str(config), "backfill", "--where", "ids=1-3", "--webserver",
                 f"http://127.0.0.1:{_free_port()}"]) == 2
    assert capsys.readouterr().err.startswith("error [network/network.dagster]: Dagster webserver")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(OllamaBackfillSelection)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(OllamaBackfillItem)).scalar() == 0


def test_the_gallery_button_launches_a_cancellable_backfill_for_its_filter(
        library: tuple[Settings, Engine, list[int]], deployment: Deployment, tmp_path: Path) -> None:
    """The gallery's "Backfill these in Dagster" form (CSRF as every POST) stores the items its current filter
    shows and launches a backfill on the webserver at pipeline.dagster_ui_url; Dagster lists it with the
    selection tag, and it can be cancelled the way the Backfills page does."""
    from fastapi.testclient import TestClient

    from ollama_pipeline.app.web import create_app

    settings, engine, ids = library
    base = deployment.start_webserver()
    web_settings = settings.model_copy(update={"pipeline": settings.pipeline.model_copy(
        update={"dagster_ui_url": base})})
    app = create_app(web_settings, thumb_dir=tmp_path / "thumbs")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/", params={"stage": CAPTION, "stage_status": "never"})
        assert "Backfill these in Dagster" in page.text
        token = client.cookies["op_csrf"]
        refused = client.post("/backfill", data={"stage": CAPTION, "stage_status": "never"})
        assert refused.status_code in (400, 403)
        answer = client.post("/backfill", data={"stage": CAPTION, "stage_status": "never", "csrf_token": token})
    assert answer.status_code == 200, answer.text
    with engine.connect() as conn:
        row = conn.execute(select(OllamaBackfillSelection.__table__)).one()
        members = conn.execute(select(func.count()).select_from(OllamaBackfillItem)).scalar()
    assert row.source == "web" and row.items == len(ids) == members and row.backfill_id
    assert f"/runs/b/{row.backfill_id}" in answer.text and row.id in answer.text

    call = http_graphql(base)
    listed = call("{ partitionBackfillsOrError { ... on PartitionBackfills { results { id tags { key value } } } } }",
                  None)["partitionBackfillsOrError"]["results"]
    assert [b["id"] for b in listed] == [row.backfill_id]
    assert {"key": SELECTION_TAG, "value": row.id} in listed[0]["tags"]
    assert cancel(call, row.backfill_id) == "CancelBackfillSuccess"
    assert backfill_state(call, row.backfill_id)["status"] in ("CANCELING", "CANCELED")


def test_the_selection_tables_migrate_up_from_0003_and_down_again(tmp_path: Path) -> None:
    """A library at revision 0003 gets the selection tables from init-db; downgrading to 0003 drops only them."""
    from alembic import command
    from sqlalchemy import inspect

    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.core.db.migrations import alembic_config, current_revision, head_revision

    engine = make_engine(f"sqlite:///{tmp_path / 'lib.sqlite'}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn, gallery_fk=False), "0003")
    assert "ollama_backfill_selections" not in inspect(engine).get_table_names()
    init_db(engine)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert {"ollama_backfill_selections", "ollama_backfill_items"} <= set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn, gallery_fk=False), "0003")
    tables = set(inspect(engine).get_table_names())
    assert not {"ollama_backfill_selections", "ollama_backfill_items"} & tables
    assert {"ollama_jobs", "ollama_stage_results", "ollama_run_heartbeats"} <= tables
    engine.dispose()


def test_each_clause_selects_its_items_in_sqlite_and_postgresql(
        db_url: str, settings_factory: Callable[..., Settings], engine_for: Callable[[str], Engine]) -> None:
    """stale (version or model), never, failed by code/channel/any, tag, quality and ids select exactly their
    items on both databases; clauses AND together, and a run's partitions get only the stored members."""
    from sqlalchemy import insert

    from ollama_pipeline.core.backfill import selection_members
    from ollama_pipeline.core.db.models import Media, MediaTag, Tag
    from ollama_pipeline.core.partitioning import Partitioning
    from ollama_pipeline.core.stages import STAGES

    settings = settings_factory(db_url)
    engine = engine_for(db_url)
    version = STAGES[CAPTION].version
    ok = {"stage": CAPTION, "status": "ok", "version": version, "model": NEW_MODEL, "error_channel": None,
          "error_code": None}
    results = {1: ok, 2: ok, 3: ok, 4: ok, 5: {**ok, "version": "caption-v0"}, 6: {**ok, "model": OLD_MODEL},
               7: {**ok, "status": "failed", "error_channel": "network", "error_code": "network.timeout"},
               8: {**ok, "status": "failed", "error_channel": "validation", "error_code": "validation.payload"}}
    with engine.begin() as conn:
        conn.execute(insert(Media), [{"id": i, "path": f"{i}.png", "type": "image",
                                      "quality_status": "rejected" if i in (4, 9) else "ok"} for i in range(1, 11)])
        conn.execute(insert(OllamaStageResult), [{"media_id": i, **row} for i, row in results.items()])
        conn.execute(insert(Tag), [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
        conn.execute(insert(MediaTag), [{"media_id": 2, "tag_id": 1}, {"media_id": 3, "tag_id": 1},
                                        {"media_id": 3, "tag_id": 2}])

    def members(*clauses: str) -> list[int]:
        selection = select_items(engine, settings, parse_where(clauses))
        return selection_members(engine, selection.id or "", selection.partitions, Partitioning(1000))

    assert members("stale=caption") == [5, 6]
    assert members("never=caption") == [9, 10]
    assert members("failed=network.timeout") == members("failed=network") == [7]
    assert members("failed=any") == [7, 8]
    assert members("tag=cat") == [2, 3] and members("tag=cat,dog", "tag=dog") == [3]
    assert members("quality=rejected") == [4, 9]
    assert members("ids=1-3,9", "never=caption") == [9]
    selection = select_items(engine, settings, parse_where(["ids=2-8"]))
    assert selection_members(engine, selection.id or "", ["1-5"], Partitioning(5)) == [2, 3, 4, 5]
    assert selection_members(engine, selection.id or "", ["6-10"], Partitioning(5)) == [6, 7, 8]
