"""The one bounded queue under load (every request answered, 200 or 429, none lost, bound kept), cancelling a
job alone, a dropped connection freeing its slot, and dynamic batching giving each request its own images."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np
import pytest

from serve_utils import assert_same_image, decode_png, pixels, running_server

DEPTH = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    # float32: the batched-vs-alone bound of assert_same_image is float32's (on a CPU with native bf16 the
    # fast preset's "auto" is bf16, whose batched matmuls round differently in a tenth of the pixels).
    with running_server(queue_depth=DEPTH, max_batch=4, dtype="fp32",
                        output=tmp_path_factory.mktemp("queue-out")) as running:
        yield running


def submit(base, **body) -> str:
    r = httpx.post(base + "/v1/jobs", json={"prompt": "red apple", "response_format": "b64_json", **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(base, job_id, until=("succeeded", "failed", "cancelled"), timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {job['status']}")


def result_pixels(job) -> list[np.ndarray]:
    return [pixels(d["b64_json"]) for d in job["result"]["data"]]


async def _load(base: str, count: int):
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        depths, stop = [], asyncio.Event()

        async def watch():
            while not stop.is_set():
                depths.append((await client.get("/v1/queue")).json()["depth"])
                await asyncio.sleep(0.01)

        async def one(i):
            start = time.perf_counter()
            r = await client.post("/v1/images/generations", json={"prompt": f"emoji {i % 7}", "seed": i, "steps": 2,
                                                                   "response_format": "b64_json"})
            return i, r, time.perf_counter() - start

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - start
        stop.set()
        await watcher
    return answers, depths, elapsed


def test_load_every_request_answered_within_the_bound(server):
    base, serve = server
    answers, depths, elapsed = asyncio.run(_load(base, 100))
    statuses = [r.status_code for _, r, _ in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert len(answers) == 100 and sorted(i for i, _, _ in answers) == list(range(100))
    accepted = [(i, r, t) for i, r, t in answers if r.status_code == 200]
    assert accepted, "no request got a slot"
    for i, r, _ in accepted:  # each answer is its own request's: its seed, one image, a job id of its own
        assert [d["seed"] for d in r.json()["data"]] == [i]
        assert decode_png(r.json()["data"][0]["b64_json"]).size == (32, 32)
    assert len({r.json()["job_id"] for _, r, _ in accepted}) == len(accepted)
    for _, r, _ in answers:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    assert max(depths) <= DEPTH and serve.queue.max_seen <= DEPTH
    latencies = sorted(t for _, _, t in accepted)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"\nload: 100 concurrent requests, queue depth {DEPTH}: {len(accepted)} accepted, "
          f"{statuses.count(429)} x 429, in {elapsed:.2f} s ({len(accepted) / elapsed:.1f} images/s accepted); "
          f"latency of accepted p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s; max depth {max(depths)}")


def test_batching_gives_each_request_its_own_images(server):
    base, _ = server
    blocker = submit(base, steps=40, seed=0)
    prompts = ["red apple", "cat face", "grinning face", "sun"]
    ids = [submit(base, prompt=p, seed=100 + k, steps=6) for k, p in enumerate(prompts)]
    batched = [wait(base, i) for i in ids]
    wait(base, blocker)
    assert [job["batch_size"] for job in batched] == [4] * 4  # ran as one pipeline call
    alone = []
    for k, p in enumerate(prompts):
        job = wait(base, submit(base, prompt=p, seed=100 + k, steps=6))
        assert job["batch_size"] == 1
        alone.append(job)
    for b, a in zip(batched, alone):
        assert_same_image(b["result"]["data"][0]["b64_json"], a["result"]["data"][0]["b64_json"])
    seconds = lambda jobs: sum(j["finished"] - j["started"] for j in jobs)  # noqa: E731
    print(f"\nbatching: 4 requests as one batch {batched[0]['finished'] - batched[0]['started']:.3f} s, "
          f"one at a time {seconds(alone):.3f} s (6 steps, 32x32, busy shared CPU)")


def test_cancel_one_of_two_running_jobs(server):
    base, serve = server
    a, b = {"seed": 7, "steps": 30, "prompt": "cat face"}, {"seed": 8, "steps": 30, "prompt": "sun"}
    blocker = submit(base, steps=30, seed=1)
    reference = [submit(base, **a), submit(base, **b)]
    wait(base, blocker)
    reference = [wait(base, i) for i in reference]
    assert reference[0]["batch_size"] == 2
    blocker = submit(base, steps=30, seed=1)
    first, second = submit(base, **a), submit(base, **b)
    wait(base, blocker)
    while httpx.get(f"{base}/v1/jobs/{first}").json()["step"] < 3:
        time.sleep(0.005)
    assert httpx.delete(f"{base}/v1/jobs/{first}").status_code == 200
    cancelled, kept = wait(base, first), wait(base, second)
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "job_cancelled"
    assert kept["status"] == "succeeded"
    assert np.array_equal(result_pixels(kept)[0], result_pixels(reference[1])[0])
    assert not list(serve.queue.output.glob(f"{first}-*"))  # nothing written for the cancelled job
    solo = submit(base, steps=200, seed=3)
    while httpx.get(f"{base}/v1/jobs/{solo}").json()["step"] < 2:
        time.sleep(0.005)
    httpx.delete(f"{base}/v1/jobs/{solo}")
    job = wait(base, solo)
    assert job["status"] == "cancelled" and job["step"] < 200  # stopped between steps, not run to the end


def test_a_dropped_connection_frees_its_slot(server):
    base, serve = server
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base + "/v1/images/generations", json={"prompt": "x", "steps": 200, "seed": 1}, timeout=0.5)
    job = httpx.get(base + "/v1/jobs").json()["data"][-1]
    job = wait(base, job["id"])
    assert job["status"] == "cancelled" and job["step"] < 200
    assert serve.queue.stats()["depth"] == 0
