"""The OpenAI Images API as the official ``openai`` client speaks it, against a server on a loopback port;
bad inputs answered with OpenAI-shaped errors (never a traceback); the job API; /files."""

from __future__ import annotations

import io
import json
import zlib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_utils import assert_same_image, decode_png, pixels, running_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    with running_server(api_key=KEY, output=tmp_path_factory.mktemp("serve-out")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def generate(client, **kw):
    extra = {**FAST, **kw.pop("extra", {})}
    return client.images.generate(model="ldmkit:emoji-text2img", prompt=kw.pop("prompt", "red apple"),
                                  response_format="b64_json", extra_body=extra, **kw)


def test_n2_gives_two_pngs_of_the_size_deterministic_per_seed(client):
    first = generate(client, n=2, size="32x32", extra={"seed": 11})
    assert [d.seed for d in first.data] == [11, 12]
    images = [decode_png(d.b64_json) for d in first.data]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    again = generate(client, n=1, size="32x32", extra={"seed": 12})
    assert_same_image(again.data[0].b64_json, first.data[1].b64_json)  # seed 12 alone, as in the pair
    assert np.array_equal(pixels(generate(client, extra={"seed": 12}).data[0].b64_json), pixels(again.data[0].b64_json))
    assert not np.array_equal(pixels(first.data[0].b64_json), pixels(first.data[1].b64_json))
    meta = json.loads(images[0].text["ldmkit"])
    assert meta["seed"] == 11 and meta["prompt"] == "red apple" and meta["steps"] == 2


def test_typed_errors_of_the_client(server, client):
    with pytest.raises(openai.BadRequestError, match="multiples"):
        generate(client, size="33x33")
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.images.generate(model="no/such-model", prompt="x")
    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.images.generate(prompt="x")
    assert httpx.post(server[0] + "/v1/images/generations", json={"prompt": "x"}).status_code == 401


def test_models_list_and_url_response(server, client):
    assert [m.id for m in client.models.list()] == ["ldmkit:emoji-text2img", "ldmkit:emoji-superres-4x"]
    result = client.images.generate(prompt="grinning face", response_format="url", extra_body={**FAST, "seed": 1})
    url = result.data[0].url
    assert url.startswith(server[0] + "/files/job_")
    assert decode_png(httpx.get(url).content).size == (32, 32)


def test_upscale_field_and_upscale_route(server, client):
    big = generate(client, extra={"seed": 2, "upscale": True, "upscale_steps": 2})
    assert decode_png(big.data[0].b64_json).size == (128, 128)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(small, format="PNG")
    for route in ("/v1/images/upscale", "/v1/images/variations"):
        r = httpx.post(server[0] + route, headers=AUTH, files={"image": ("a.png", small.getvalue(), "image/png")},
                       data={"n": "2", "steps": "2", "seed": "5", "response_format": "b64_json"}, timeout=60)
        assert r.status_code == 200, r.text
        assert [decode_png(d["b64_json"]).size for d in r.json()["data"]] == [(128, 128)] * 2


def test_edits_without_an_inpainting_model_names_the_fix(server):
    png = io.BytesIO()
    Image.new("RGBA", (32, 32)).save(png, format="PNG")
    r = httpx.post(server[0] + "/v1/images/edits", headers=AUTH, data={"prompt": "x"},
                   files={"image": ("a.png", png.getvalue(), "image/png")})
    assert r.status_code == 404
    assert "No inpaint model is loaded" in r.json()["error"]["message"] and "--model" in r.json()["error"]["message"]


def _png(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels with a tiny compressed body (a decompression bomb)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 30001)) + \
        chunk(b"IEND", b"")


JSON_CASES = [
    ({}, 400, "prompt"), ({"prompt": ""}, 400, "prompt"), ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": 3}, 400, "prompt"), ({"prompt": "x", "n": 0}, 400, "n"), ({"prompt": "x", "n": 10**6}, 400, "n"),
    ({"prompt": "x", "n": "2"}, 400, "n"), ({"prompt": "x", "size": "0x0"}, 400, "size"),
    ({"prompt": "x", "size": "33x33"}, 400, "size"), ({"prompt": "x", "size": "100000x100000"}, 413, "size"),
    ({"prompt": "x", "size": "big"}, 400, "size"), ({"prompt": "x", "steps": 0}, 400, "steps"),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"), ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "scheduler": "nope"}, 400, "scheduler"), ({"prompt": "x", "response_format": "gif"}, 400,
                                                                "response_format"),
    ({"prompt": "x", "upscale": "yes"}, 400, "upscale"), ({"prompt": "x", "model": 5}, 404, "model"),
    ({"prompt": "x", "model": "ldmkit:emoji-superres-4x"}, 400, "model"),
]


@pytest.mark.parametrize("body,status,param", JSON_CASES, ids=[json.dumps(c[0])[:40] for c in JSON_CASES])
def test_bad_json_fields(server, body, status, param):
    r = httpx.post(server[0] + "/v1/images/generations", headers=AUTH, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


@pytest.mark.parametrize("content", [b"[1, 2]", b'"prompt"', b"{not json", b"\xff\xfe"])
def test_body_that_is_not_a_json_object(server, content):
    r = httpx.post(server[0] + "/v1/images/generations", headers={**AUTH, "Content-Type": "application/json"},
                   content=content)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_is_413(server):
    r = httpx.post(server[0] + "/v1/images/generations", headers=AUTH, json={"prompt": "x" * (9 << 20)})
    assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(10):
            yield b"x" * (1 << 20)
    r = httpx.post(server[0] + "/v1/images/generations", headers=AUTH, content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("name,data,status", [
    ("not-an-image", b"hello, this is text", 400), ("truncated", _png()[:60], 400), ("bomb", _bomb(), 413),
    ("empty", b"", 400)])
def test_bad_uploads(server, name, data, status):
    r = httpx.post(server[0] + "/v1/images/upscale", headers=AUTH, files={"image": ("a.png", data, "image/png")},
                   data={"steps": "2"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == "image" and "Traceback" not in r.text


def test_unknown_fields_are_ignored(client):
    result = generate(client, extra={"seed": 4, "quality": "hd", "style": "vivid", "made_up": {"x": [1]}})
    assert decode_png(result.data[0].b64_json).size == (32, 32)


def test_files_route_stays_in_the_output_folder(server):
    base, serve = server
    (serve.config.output.parent / "secret.png").write_bytes(_png())
    for path in ("/files/..%2Fsecret.png", "/files/../secret.png", "/files/%2e%2e%2fsecret.png",
                 "/files/.%2E/secret.png", "/files/secret.png", "/files/%2Fetc%2Fpasswd", "/files/a\\..\\b.png"):
        r = httpx.get(base + path)
        assert r.status_code == 404, path
        assert "error" in r.json()


def test_job_api_progress_events_and_result(server):
    base = server[0]
    r = httpx.post(base + "/v1/jobs", headers=AUTH, json={"prompt": "cat", "steps": 6, "seed": 9,
                                                           "response_format": "b64_json"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    events = []
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=AUTH, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "succeeded" and events[-1]["progress"] == 1.0
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and len(set(steps)) > 1
    job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["seeds"] == [9] and decode_png(job["result"]["data"][0]["b64_json"]).size == (32, 32)
    assert httpx.get(f"{base}/v1/jobs/job_nope", headers=AUTH).status_code == 404
    assert httpx.delete(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()["status"] == "succeeded"  # too late


def test_health_ready_and_unknown_routes(server):
    base = server[0]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json()["status"] == "ready"
    r = httpx.get(base + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"
    assert httpx.get(base + "/v1/images/generations", headers=AUTH).status_code == 405
