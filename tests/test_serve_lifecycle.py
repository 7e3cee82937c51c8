"""`ldmkit serve` as a process: SIGTERM during a job drains and exits 0 with nothing partial written; the CLI
options; the edits route on an inpainting pipeline (a tiny random-weight one: no inpainting model is bundled)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.cli import main
from ldmkit.serve.app import create_app
from ldmkit.serve.config import ServeConfig, api_key_from_env
from ldmkit.serve.errors import APIError
from ldmkit.serve.params import JobSpec
from ldmkit.serve.server import warn_if_exposed
from serve_utils import build_inpaint_folder, decode_png, free_port, running_server

SRC = Path(__file__).resolve().parent.parent / "src"


def test_sigterm_during_a_job_exits_cleanly_without_partial_files(tmp_path):
    port, out = free_port(), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "serve", "--port", str(port), "--no-page", "-o", str(out),
                             "--model", "ldmkit:emoji-text2img", "--drain-timeout", "0.3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        done = httpx.post(base + "/v1/images/generations", json={"prompt": "sun", "steps": 2, "seed": 1}).json()
        job = httpx.post(base + "/v1/jobs", json={"prompt": "x", "steps": 200, "seed": 2}).json()["id"]
        while httpx.get(f"{base}/v1/jobs/{job}").json()["step"] < 2:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "cancelling 1 unfinished job" in output
    files = sorted(p.name for p in out.iterdir())
    assert files == [Path(done["data"][0]["url"]).name]  # the finished job's PNG; nothing of the cancelled one
    assert decode_png((out / files[0]).read_bytes()).size == (32, 32)


def test_cli_serve_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--queue-depth" in capsys.readouterr().out
    assert main(["serve", "--queue-depth", "0"]) == 2
    assert "--queue-depth must be a positive" in capsys.readouterr().err


def test_edits_run_the_inpainting_pipeline(tmp_path, one_torch_thread):
    folder = build_inpaint_folder(tmp_path / "inpaint")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251
    rgba[..., 3] = 255
    rgba[8:24, 8:24, 3] = 0  # OpenAI's convention: transparent = repaint
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, format="PNG")
    with running_server(models=[folder], output=tmp_path / "out") as (base, _):
        r = httpx.post(base + "/v1/images/edits", data={"prompt": "fill", "n": "2", "steps": "2", "seed": "4",
                                                        "response_format": "b64_json"},
                       files={"image": ("a.png", png.getvalue(), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        images = [np.asarray(decode_png(d["b64_json"]).convert("RGB"), np.int16) for d in r.json()["data"]]
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 404 and "No text2img model" in r.json()["error"]["message"]
    keep = rgba[..., 3] == 255
    for image in images:
        assert image.shape == (32, 32, 3)
        assert np.abs(image[keep] - rgba[..., :3][keep]).max() <= 1  # the known pixels are kept
    assert not np.array_equal(images[0], images[1])  # seeds 4 and 5


def test_exposed_without_a_key_warns(caplog, monkeypatch):
    assert warn_if_exposed(ServeConfig(host="0.0.0.0")) and "without an API key" in caplog.text
    assert not warn_if_exposed(ServeConfig(host="0.0.0.0", api_key="k"))
    assert not warn_if_exposed(ServeConfig())  # 127.0.0.1
    monkeypatch.setenv("LDMKIT_API_KEY", "from-env")
    assert api_key_from_env(None) == "from-env" and api_key_from_env("given") == "given"
    monkeypatch.setenv("LDMKIT_API_KEY", "")
    assert api_key_from_env(None) is None


def test_loading_and_draining_answer_503(tmp_path):
    app = create_app(ServeConfig(output=tmp_path), page=False)
    client = TestClient(app)  # no lifespan: the models never load
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["Retry-After"] == "2"
    assert client.get("/health").status_code == 200
    queue = app.state.serve.queue
    queue.drain(0)
    with pytest.raises(APIError, match="shutting down") as caught:
        queue.submit(JobSpec(kind="text2img", model="m", seeds=[1], steps=1))
    assert caught.value.status == 503
