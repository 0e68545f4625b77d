"""Browser tests: Debian's chromium driven by Playwright for Python against the real servers.

The first test serves the web UI with uvicorn over a demo library whose stages ran against the emulator,
and clicks through it as a user would (gallery, filter, item page, re-run, queue); the second starts the
Dagster webserver on the project's definitions and checks the asset lineage and the partitions page.
Screenshots go to `test-artifacts/` only; `make screenshots` copies the README's pictures to `docs/screenshots/`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from ollama_pipeline.app.web.app import create_app
from ollama_pipeline.core.partitioning import Partitioning
from ollama_pipeline.core.stages import STAGES, all_meta_keys
from ollama_pipeline_tests.test_web import (
    RERUN_STAGE,
    SCRIPT_CAPTION,
    SCRIPT_TITLE,
    THIRTEEN_KEYS,
    WebLibrary,
    build_web_library,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
# The deadline of a wait for the Dagster UI (Playwright's `expect` waits 5 s unless told; a loaded 2-core
# machine lays the graph out slower than that).
DEADLINE_MS = 60_000
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_screenshot(page: Page, name: str, *, full_page: bool = False) -> Path:
    """Screenshot into test-artifacts/ only (tests never touch tracked files; `make screenshots` copies the
    README's pictures to docs/screenshots/)."""
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / name
    page.screenshot(path=str(target), full_page=full_page)
    return target


def wait_for_images(page: Page, timeout_s: float = 10.0) -> None:
    """Poll (from Python: the page's CSP forbids eval) until every <img> finished loading."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate("Array.from(document.images).every(i => i.complete)"):
        assert time.monotonic() < deadline, "images did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, emulator_server: Any) -> WebLibrary:
    emulator_server.set_faults([])
    return build_web_library(tmp_path_factory.mktemp("browser"), emulator_server.base_url)


@pytest.fixture(scope="module")
def web_url(library: WebLibrary) -> Iterator[str]:
    """The web UI served by uvicorn in a thread on a free loopback port."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(library.settings, pipeline=library.pipeline),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_gallery_filter_item_rerun_and_queue_in_a_real_browser(browser: Browser, web_url: str,
                                                                library: WebLibrary) -> None:
    """A user sees captions, narrows the gallery, reads every stage's value, re-runs a stage and finds the job."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(web_url + "/")
    cards = page.locator("li.card")
    expect(cards).to_have_count(len(library.demo_ids) + len(library.outside_ids))
    for media_id in library.demo_ids[:6]:
        caption = library.text(media_id, "ollama.caption")
        expect(page.locator(f'li.card[data-media-id="{media_id}"] .caption')).to_have_text(caption)
    wait_for_images(page)
    save_screenshot(page, "gallery.png")

    page.select_option("select[name=stage]", "ollama_caption")
    page.select_option("select[name=stage_status]", "stale")
    page.click("form.filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"stage_status=stale"))
    expect(cards).to_have_count(1)
    expect(cards.first).to_have_attribute("data-media-id", str(library.stale_id))
    page.click("form.filters >> text=clear")
    expect(cards).to_have_count(len(library.demo_ids) + len(library.outside_ids))

    first = library.demo_ids[0]
    page.click(f'li.card[data-media-id="{first}"] a.title')
    expect(page).to_have_url(f"{web_url}/media/{first}")
    for key in THIRTEEN_KEYS:
        expect(page.locator(f'section.meta[id="{key}"]')).to_be_visible()
    for key in all_meta_keys():  # every value the registry's stages write
        expect(page.locator(f'section.meta[id="{key}"]')).not_to_contain_text("not computed yet")
    expect(page.locator('section.meta[id="ollama.caption"] p.text')).to_have_text(
        library.text(first, "ollama.caption"))
    for stage in STAGES:
        expect(page.locator("section.provenance")).to_contain_text(stage)
    names = page.locator('section.meta[id="ollama.tags_normalized"] .tag .name')
    assert names.count() > 0
    for index in range(names.count()):  # each tag name on one line (it once wrapped letter by letter)
        box = names.nth(index).bounding_box()
        line = float(names.nth(index).evaluate("e => parseFloat(getComputedStyle(e).lineHeight) || 20"))
        assert box is not None and box["height"] < 1.6 * line, (names.nth(index).inner_text(), box)
    wait_for_images(page)
    save_screenshot(page, "item.png", full_page=True)

    page.select_option("form.rerun select[name=stage]", RERUN_STAGE)
    page.click("form.rerun button[type=submit]")
    answer = page.locator("ul.results li")
    expect(answer).to_contain_text("queued")
    job_id = re.search(r"job (\d+)", answer.inner_text()).group(1)  # type: ignore[union-attr]
    page.click("header nav >> text=Queue")
    row = page.locator(f'table.jobtable tr[data-job-id="{job_id}"]').first
    expect(row).to_be_visible()
    expect(row).to_contain_text(RERUN_STAGE)
    expect(row).to_contain_text("queued")
    context.close()


def test_injected_script_caption_does_not_run(browser: Browser, web_url: str, library: WebLibrary) -> None:
    """With the CSP bypassed (escaping alone must hold), a <script> caption shows as text and no dialog opens."""
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{web_url}/media/{library.script_id}")
    expect(page.locator("h1.item-title")).to_have_text(SCRIPT_TITLE)
    expect(page.locator("figure.preview figcaption")).to_have_text(SCRIPT_CAPTION)
    page.goto(web_url + "/")
    expect(page.locator(f'li.card[data-media-id="{library.script_id}"] .caption')).to_have_text(SCRIPT_CAPTION)
    page.wait_for_load_state("load")  # an inline script, had one been injected, runs before the load event
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert dialogs == []
    context.close()


# ---- the Dagster UI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dagster_url(library: WebLibrary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """dagster-webserver on the project's workspace, with a fresh instance that knows the media partitions."""
    from dagster import DagsterInstance

    from ollama_pipeline.defs.partitions import MEDIA_PARTITIONS_NAME

    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.from_config(str(home))
        keys = Partitioning(size=library.settings.pipeline.partition_size).keys_of(library.demo_ids)
        instance.add_dynamic_partitions(MEDIA_PARTITIONS_NAME, keys)
        instance.dispose()
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved
    config = home / "ollama_pipeline.yaml"
    s = library.settings
    config.write_text(yaml.safe_dump({
        "ollama": {"base_url": str(s.ollama.base_url), "model": {"default": s.ollama.model.default},
                   "timeout_ms": s.ollama.timeout_ms, "max_image_bytes": s.ollama.max_image_bytes},
        "database": {"url": s.database.url}, "media_root": str(s.media_root), "logs_dir": str(s.logs_dir)}))
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "OLLAMA_PIPELINE_CONFIG": str(config),
           "PYTHONPATH": str(REPO_ROOT), "DAGSTER_DISABLE_TELEMETRY": "1"}
    webserver = Path(sys.executable).parent / "dagster-webserver"
    log = (home / "webserver.log").open("wb")
    # A new session, so that the whole process group (webserver and its code server) stops at the end.
    proc = subprocess.Popen([str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # a deadline, not a timing claim: a loaded 2-core machine is slow
        while True:
            try:
                if httpx.get(url + "/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (home / "webserver.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "dagster-webserver did not start"
            time.sleep(0.2)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _skip_community_dialog(page: Page) -> None:
    """Dismiss the first-visit "Join the Dagster community" dialog when it shows up."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=5000)
    except PlaywrightTimeoutError:
        return
    skip.click()
    expect(skip).to_be_hidden()


def _our_asset_names() -> list[str]:
    from ollama_pipeline.definitions import defs

    return sorted(key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys())


def test_dagster_ui_shows_asset_lineage_and_media_partitions(browser: Browser, dagster_url: str,
                                                             library: WebLibrary) -> None:
    """On first open the global lineage graph draws every asset of the code location (no collapsed group)
    with its full name readable on screen, with edges; a stage lists its partitions (blocks of media items)."""
    names = _our_asset_names()
    assert {"media", *STAGES} <= set(names)
    context = browser.new_context(viewport={"width": 1900, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(DEADLINE_MS)
    page.goto(dagster_url + "/asset-groups")
    try:
        expect(page.get_by_text("Global asset lineage")).to_be_visible(timeout=DEADLINE_MS)
        _skip_community_dialog(page)
        graph = page.locator("svg[class*=AssetGraphExplorer_svgContainer]")
        expect(graph).to_be_visible(timeout=DEADLINE_MS)
        for name in names:  # exact text: a name cut short ("ollama_…_assist") does not match
            label = graph.get_by_text(name, exact=True)
            expect(label).to_be_visible(timeout=DEADLINE_MS)
            expect(label).to_be_in_viewport(timeout=DEADLINE_MS)
            assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), f"{name} is clipped"
        expect(graph.locator("[aria-label=unfold_more]")).to_have_count(0)  # no collapsed group to open
        # lineage edges: every stage hangs off media
        expect(graph.locator("path").nth(len(STAGES) - 1)).to_be_attached(timeout=DEADLINE_MS)
    except AssertionError:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dagster_asset_graph_failure.png"))
        raise
    save_screenshot(page, "dagster_asset_graph.png")

    stage = list(STAGES)[-1]
    page.goto(f"{dagster_url}/assets/{stage}?view=partitions")
    _skip_community_dialog(page)
    keys = Partitioning(size=library.settings.pipeline.partition_size).keys_of(library.demo_ids)
    # Dagster's partition bar says "1 Partitions Selected" for one partition as for many
    expect(page.get_by_text(re.compile(rf"^{len(keys)} Partitions? Selected$"))).to_be_visible(timeout=DEADLINE_MS)
    for key in (keys[0], keys[-1]):
        expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=DEADLINE_MS)
    context.close()
