"""Every committed notebook, opened in JupyterLab in a real browser and run top to bottom.

JupyterLab runs on 127.0.0.1 (a free port, a token) and serves *copies* of the notebooks from a
temporary folder, so its autosave can never write over the committed files; figures and tables go
to a temporary ``$PAPERLIB_FIGURES`` that holds a copy of ``figures/results/``. Headless Chromium
(Debian's ``chromium``, driven by Playwright) opens each notebook, clears its outputs, runs every
cell through the Run menu in the project's ``python3`` kernel, and the test checks what a reader
sees: every code cell executed once, top to bottom; as many tables and figures as the committed
notebook shows; no error and no stderr output. A screenshot of each notebook is saved into
pytest's ``tmp_path`` and its path is part of every failure message.

``make test`` installs the browser (``make browser``: ``apt-get install chromium`` as root) and
Playwright (the ``dev`` extra). The test is skipped only where Playwright is missing or no browser
can be installed (no ``/usr/bin/chromium``, and not root or no ``apt-get``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from paperlib import paths

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium keeps calling home on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KERNEL = "python3"
#: discovered, so that a new notebook is checked with no change here
NOTEBOOKS = sorted(paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
LAB_START_S = 90  # JupyterLab answering its API
OPEN_S = 90  # the notebook shown with its kernel idle
RUN_S = 120  # every cell run (render mode takes seconds; the first imports take longest)

#: JupyterLab user settings for the test server: no autosave (belt and braces: it serves copies),
#: every cell attached to the page (so all outputs can be counted), no news or update checks
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}

# What the page shows, read from the DOM of the open notebook: per code cell its prompt ("[3]:",
# "[*]:", "[ ]:"), its tables, its images (and whether they loaded) and its stderr/error outputs
# (JupyterLab renders both with the stderr mime type).
PAGE_STATE_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  if (!panel) return null;
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const out = '.jp-OutputArea-output';
  return {
    status: indicator ? indicator.dataset.status : null,
    kernel: (panel.querySelector('.jp-Toolbar-kernelName') || {innerText: ''}).innerText.trim(),
    cells: [...panel.querySelectorAll('.jp-Cell.jp-CodeCell')].map(c => ({
      prompt: (c.querySelector('.jp-InputArea-prompt') || {innerText: ''}).innerText.trim(),
      outputs: c.querySelectorAll(out).length,
      tables: c.querySelectorAll(out + '[data-mime-type="text/html"] table').length,
      images: [...c.querySelectorAll(out + '[data-mime-type^="image/"] img')]
        .map(i => i.complete && i.naturalWidth > 0),
      stderr: [...c.querySelectorAll(out + '[data-mime-type="application/vnd.jupyter.stderr"]')]
        .map(o => o.innerText.slice(-3000)),
    })),
  };
}"""
EXECUTED = re.compile(r"^\[(\d+)\]:?$")


def _browser_or_skip():
    """Playwright's sync API; skips only where no browser can be had."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("playwright is not installed: `make setup` installs it (the dev extra)")
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                        "install Debian's chromium package to run this test")
        pytest.fail(f"{CHROMIUM} is missing: `make browser` (part of `make test`) installs it")
    return sync_api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    base: str
    token: str
    root: Path  # the folder JupyterLab serves: copies only
    kernel_display_name: str = ""

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    root, figures, settings = tmp / "notebooks", tmp / "figures", tmp / "settings"
    root.mkdir()
    shutil.copytree(paths.results_dir(), figures / "results")  # render mode reads these
    for plugin, values in LAB_SETTINGS.items():
        target = settings / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    env = {**os.environ, "PAPERLIB_FIGURES": str(figures), "PAPERLIB_BUILD": str(tmp / "build"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp / "lab.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--MappingKernelManager.default_kernel_name={KERNEL}",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        deadline = time.monotonic() + LAB_START_S
        while True:
            try:
                server.api("/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; its log ({log}):\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        server.kernel_display_name = server.api("/api/kernelspecs")["kernelspecs"][KERNEL]["spec"]["display_name"]
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile."""
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1280, "height": 1600})
        try:
            yield context
        finally:
            context.close()


def expected_outputs(nb_path: Path) -> dict[str, int]:
    """Code cells, tables and figures in the outputs the notebook file carries."""
    book = nbformat.read(nb_path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    tables = images = 0
    for cell in code:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if any(mime.startswith("image/") for mime in data):
                images += 1  # JupyterLab shows the richest of the bundle: the image
            elif "text/html" in data:
                tables += len(re.findall(r"<table\b", data["text/html"], flags=re.I))
    return {"cells": len(code), "tables": tables, "images": images}


def run_in_browser(lab: Lab, browser, nb_path: Path, screenshot: Path) -> dict:
    """Open ``nb_path`` (a copy of it) in JupyterLab, clear its outputs, run all cells and check
    what the page then shows against the outputs the file carries. Raises AssertionError, naming
    the screenshot, when a check fails; returns the page state otherwise."""
    from playwright.sync_api import Error as PlaywrightError

    expected = expected_outputs(nb_path)
    shutil.copyfile(nb_path, lab.root / nb_path.name)
    page = browser.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}") if msg.type == "error" else None)
    state = None
    where = f"screenshot: {screenshot}"

    def fail(message: str):
        try:
            errs = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
            if errs.count():
                errs.first.scroll_into_view_if_needed(timeout=5000)
            page.screenshot(path=str(screenshot))
        except PlaywrightError as exc:
            message += f"\n(no screenshot: {exc})"
        tail = "\n".join(console[-10:])
        raise AssertionError(f"{nb_path.name}: {message}\n{where}" + (f"\nbrowser console errors:\n{tail}" if tail else ""))

    def wait_for(condition_js: str, timeout_s: float, what: str):
        try:
            page.wait_for_function(f"""() => {{ const s = ({PAGE_STATE_JS})(); return s && ({condition_js}); }}""",
                                   timeout=timeout_s * 1000, polling=250)
        except PlaywrightError as exc:
            fail(f"{what} within {timeout_s} s ({type(exc).__name__}); page state: {page.evaluate(PAGE_STATE_JS)}")

    def menu(menu_label: str, item_label: str) -> bool:
        """Click a menu item; False (menu closed again) where the item is disabled."""
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu_label}$")).click()
        item = page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item_label}$")))
        if "lm-mod-disabled" in (item.get_attribute("class") or ""):
            page.keyboard.press("Escape")
            return False
        item.click()
        return True

    try:
        # a workspace of its own, so no notebook opened before is restored beside it
        page.goto(f"{lab.base}/lab/workspaces/{nb_path.stem}/tree/{nb_path.name}?token={lab.token}")
        wait_for(f"s.status === 'idle' && s.kernel === {json.dumps(lab.kernel_display_name)} && "
                 f"s.cells.length === {expected['cells']}", OPEN_S,
                 f"the notebook was not shown with {expected['cells']} code cells and an idle "
                 f"{lab.kernel_display_name!r} kernel")
        deadline = time.monotonic() + OPEN_S  # and the server agrees
        while not [s for s in lab.api("/api/sessions") if s["path"].endswith(nb_path.name)
                   and s["kernel"]["name"] == KERNEL and s["kernel"]["execution_state"] == "idle"]:
            if time.monotonic() > deadline:
                fail(f"no idle {KERNEL!r} kernel session on the server: {lab.api('/api/sessions')}")
            time.sleep(0.25)
        menu("Edit", "Clear Outputs of All Cells")
        wait_for("s.cells.every(c => c.outputs === 0 && !/\\d/.test(c.prompt))", 10, "outputs were not cleared")
        t0 = time.monotonic()
        attempts = []
        for _ in range(3):
            clicked = menu("Run", "Run All Cells")
            try:  # started: a cell queued, run or failed
                page.wait_for_function(f"() => {{ const s = ({PAGE_STATE_JS})(); return s && s.cells.some("
                                       "c => /[*\\d]/.test(c.prompt) || c.stderr.length); }", timeout=15_000, polling=100)
                break
            except PlaywrightError:
                attempts.append("disabled" if not clicked else "clicked, nothing ran")
                time.sleep(1)
        else:
            fail(f"Run All Cells did not start a run: {attempts}")
        # done: kernel idle, nothing queued, and either every cell has a count or one shows an error
        wait_for("s.status === 'idle' && !s.cells.some(c => c.prompt.includes('*')) && "
                 "(s.cells.every(c => /^\\[\\d+\\]/.test(c.prompt)) || s.cells.some(c => c.stderr.length))",
                 RUN_S, "the run did not finish")
        state = page.evaluate(PAGE_STATE_JS)
        state["run_s"] = time.monotonic() - t0
        state["run_all_retries"] = attempts
        page.screenshot(path=str(screenshot))

        cells = state["cells"]
        for i, cell in enumerate(cells, 1):
            if cell["stderr"]:
                fail(f"code cell {i} shows an error or stderr output:\n" + "\n".join(cell["stderr"]))
        counts = [int(m.group(1)) if (m := EXECUTED.match(c["prompt"])) else None for c in cells]
        if counts != list(range(1, len(cells) + 1)):
            fail(f"the code cells were not all run once, top to bottom, in a fresh kernel: prompts {[c['prompt'] for c in cells]}")
        shown = {"tables": sum(c["tables"] for c in cells), "images": sum(len(c["images"]) for c in cells)}
        if shown != {"tables": expected["tables"], "images": expected["images"]}:
            fail(f"shows {shown}, the committed notebook {expected}")
        if not all(ok for c in cells for ok in c["images"]):
            fail("an image output did not load")
        sessions = [s for s in lab.api("/api/sessions") if s["path"].endswith(nb_path.name)]
        if [s["kernel"]["name"] for s in sessions] != [KERNEL]:
            fail(f"expected one session in the {KERNEL!r} kernel, got {sessions}")
        return state
    finally:
        page.close()
        for s in lab.api("/api/sessions"):  # free the kernel (2 shared cores)
            if s["path"].endswith(nb_path.name):
                lab.api(f"/api/sessions/{s['id']}", method="DELETE")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_browser(nb_path, browser, lab, tmp_path):
    state = run_in_browser(lab, browser, nb_path, tmp_path / f"{nb_path.stem}.png")
    assert state["cells"], "no code cell"


def test_browser_check_fails_on_an_error(browser, lab, tmp_path):
    """The check above must fail when a cell raises (and must not hang on the cells not run)."""
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                           nbformat.v4.new_code_cell("raise ValueError('injected failure')"),
                                           nbformat.v4.new_code_cell("x + 1")])
    book.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_injected.ipynb"
    nbformat.write(book, path)
    with pytest.raises(AssertionError, match=r"(?s)code cell 2 shows an error.*ValueError.*injected failure.*screenshot"):
        run_in_browser(lab, browser, path, tmp_path / "99_injected.png")
    assert (tmp_path / "99_injected.png").exists()


def test_lab_serves_the_notebooks_and_the_kernel_they_name(lab):
    """The server side alone (it needs no browser): a notebook is listed, the kernelspec its
    metadata names exists, and the Lab page loads."""
    nb_path = NOTEBOOKS[0]
    shutil.copy(nb_path, lab.root / nb_path.name)
    assert nb_path.name in {item["name"] for item in lab.api("/api/contents/")["content"]}
    kernel = lab.api(f"/api/contents/{nb_path.name}")["content"]["metadata"]["kernelspec"]["name"]
    assert kernel == KERNEL and kernel in lab.api("/api/kernelspecs")["kernelspecs"]
    assert urllib.request.urlopen(f"{lab.base}/lab?token={lab.token}", timeout=10).status == 200
