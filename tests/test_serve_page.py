"""The web page at /: served from the same app and queue, nothing fetched from another host, and a real
headless Chromium (Debian's chromium, driven by Playwright) that types a prompt, clicks Generate and gets the
image. CI installs chromium (.ci/run); without it the browser test skips and says so."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from serve_utils import decode_png, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# docs/serve-screenshot.png is rewritten only with LDMKIT_UPDATE_SCREENSHOT=1 (so a test run leaves the tree clean)
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "serve-screenshot.png"
# <meta> previews (og:image, twitter:image) are read by link unfurlers, never loaded by the page itself.
META = re.compile(r"<meta[^>]+>", re.S)
# Gradio's config names sample files as the components' API examples ("example_inputs", for its API docs);
# the page never loads them (the browser test below records every request the page makes).
API_EXAMPLES = ("https://raw.githubusercontent.com/gradio-app/gradio/main/test/test_files/",
                "https://github.com/gradio-app/gradio/raw/main/test/test_files/")


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    with running_server(page=True, output=tmp_path_factory.mktemp("page-out")) as running:
        yield running


def external_urls(text: str, own: str) -> set[str]:
    urls = set(re.findall(r"""https?://[^\s"'<>)\\]+""", META.sub("", text)))
    # SVG namespace URLs are names, never fetched
    return {u for u in urls if not u.startswith((own, *API_EXAMPLES)) and "www.w3.org/" not in u}


def test_page_references_no_other_host(server):
    base, _ = server
    html = httpx.get(base + "/").text
    assert "ldmkit" in html and "gradio_config" in html
    assert external_urls(html, base) == set()
    for asset in re.findall(r'(?:src|href)="(\./assets/[^"]+\.css)"', html) + ["/theme.css"]:
        assert external_urls(httpx.get(f"{base}/{asset.lstrip('./')}").text, base) == set(), asset
    assert "fonts.googleapis" not in httpx.get(base + "/config").text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install "
                    "chromium; .ci/run installs it in CI)")
def test_a_real_browser_generates_an_image(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, _ = server
    other_hosts = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        page.on("request", lambda r: other_hosts.append(r.url) if urlparse(r.url).hostname not in
                ("127.0.0.1", None) and not r.url.startswith(("data:", "blob:")) else None)
        page.goto(base + "/", wait_until="networkidle")
        page.locator("#prompt textarea").fill("red apple")
        page.locator("#steps input[type=number]").fill("4")
        page.locator("#seed input").fill("3")
        page.locator("#generate").click()
        image = page.locator("#gallery img").first
        image.wait_for(timeout=60_000)
        src = image.get_attribute("src")
        data = page.evaluate("""async (src) => { const r = await fetch(src); const b = new Uint8Array(
            await r.arrayBuffer()); let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); }""",
                             src)
        page.evaluate("window.scrollTo(0, 0)")
        shot = SCREENSHOT if os.environ.get("LDMKIT_UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert decode_png(base64.b64decode(data)).size == (32, 32)
    assert other_hosts == []
    assert decode_png(shot.read_bytes()).size == (1000, 720) and shot.stat().st_size < 200_000
