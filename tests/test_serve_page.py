"""The page of ``sshq serve`` (GET /), in a real headless browser: Debian's
chromium driven by Playwright (issue 11, section 3).  Jobs are submitted
through the API on the real Slurm; the page must show them appear, change
state from the event stream, show a job's log, and kill one after a
confirmation.
"""
# ruff: noqa: F401, F811  (the fixtures imported from serve_helpers)

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import Server, make_token, serve_env, server

CHROMIUM = os.environ.get("SSHQ_TEST_CHROMIUM", "/usr/bin/chromium")
#: Debian's chromium as root, on a machine with no network but loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A page of a headless chromium (skipped, or failed under CI, without one)."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("SSHQ_REQUIRE_TESTBED") == "1":
            pytest.fail(f"no chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            yield page
        finally:
            browser.close()


def test_page_live_table_log_and_kill(slurm_testbed: dict[str, str], server: Server,
                                      serve_env: dict[str, str], browser_page: Any,
                                      tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    token, _ = make_token(serve_env, "page")
    page.goto(server.url + "/")
    expect(page.locator("h1")).to_have_text("sshq")
    page.fill("#token", token)
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
    expect(page.locator("#empty")).to_be_visible()

    with server.client(token) as c:
        r = c.post("/api/v1/jobs", json={"platform": "slurm", "jobs": [
            {"command": "echo hello from the page; sleep 3; echo bye", "name": "pagejob"},
            {"command": "echo started; sleep 300", "name": "victim"}]})
        assert r.status_code == 201, r.text
        ok, victim = r.json()

    # the jobs appear without a reload, and the first turns succeeded
    row = page.locator(f'#jobs tr[data-id="{ok["id"]}"]')
    expect(row).to_be_visible(timeout=30_000)
    expect(row.locator("td").nth(1)).to_have_text("pagejob")
    expect(row.locator("td").nth(3)).to_have_text(ok["job_id"])
    expect(row.locator("td.state")).to_have_text("succeeded", timeout=180_000)
    expect(row.locator("td.exit")).to_have_text("exit 0")
    # its log
    row.click()
    expect(page.locator("#detail-id")).to_have_text(str(ok["id"]))
    expect(page.locator("#log")).to_have_text("hello from the page\nbye\n", timeout=60_000)
    expect(page.locator("#kill")).to_be_hidden()

    # the other: running, its log followed live, killed after confirmation
    vrow = page.locator(f'#jobs tr[data-id="{victim["id"]}"]')
    expect(vrow.locator("td.state")).to_have_text("running", timeout=180_000)
    vrow.click()
    expect(page.locator("#kill")).to_be_visible()
    expect(page.locator("#log")).to_have_text("started\n", timeout=60_000)  # while it runs
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        if len(dialogs) == 1:
            dialog.dismiss()  # the first time: "cancel"
        else:
            dialog.accept()

    page.on("dialog", on_dialog)
    page.click("#kill")
    assert len(dialogs) == 1 and f"Kill job {victim['id']}" in dialogs[0]
    with server.client(token) as c:
        assert c.get(f"/api/v1/jobs/{victim['id']}").json()["state"] == "running"
    page.click("#kill")
    expect(vrow.locator("td.state")).to_have_text("failed", timeout=120_000)
    expect(vrow.locator("td.exit")).to_have_text("signal TERM")
    expect(page.locator('dd[data-field="signal"]')).to_have_text("TERM")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert token not in server.log_text()


def test_page_is_package_data_without_cdn() -> None:
    """The page and its script ship inside the package and load nothing from elsewhere."""
    from sshq.server.app import static_file

    html = static_file("index.html").decode()
    for name in ("index.html", "app.js", "style.css"):
        text = static_file(name).decode()
        assert "http://" not in text and "https://" not in text, name
    assert '<script src="/static/app.js">' in html
    assert "innerHTML" not in static_file("app.js").decode()
