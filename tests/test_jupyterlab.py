"""A JupyterLab server on 127.0.0.1 serves the notebooks and the kernelspec they name."""

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from paperlib import paths

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_serves_notebooks_and_kernelspec(tmp_path):
    port, token = _free_port(), secrets.token_hex(8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={paths.notebooks_dir()}",
         "--ServerApp.open_browser=False", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**__import__("os").environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)},
    )
    base = f"http://127.0.0.1:{port}"

    def get(path):
        req = urllib.request.Request(base + path, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())

    try:
        deadline = time.time() + 90
        while True:
            try:
                status, _ = get("/api/status")
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"JupyterLab did not start: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
                time.sleep(0.5)
        status, listing = get("/api/contents/")
        names = {item["name"] for item in listing["content"]}
        assert "01_datasets.ipynb" in names
        _, nb = get("/api/contents/01_datasets.ipynb")
        kernel = nb["content"]["metadata"]["kernelspec"]["name"]
        _, specs = get("/api/kernelspecs")
        assert kernel in specs["kernelspecs"]
        status = urllib.request.urlopen(f"{base}/lab?token={token}", timeout=5).status  # the Lab page itself
        assert status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
