"""The one bounded job queue behind the API and the page.

At most ``queue_depth`` jobs are admitted and unfinished (queued or running); past that a submit is refused
at once (429 with Retry-After), never left to hang. One worker thread per loaded model takes the oldest job
for its model together with the queued jobs of the same batch key, up to ``max_batch`` images, and runs
them as one pipeline call (dynamic batching). A job is cancelled alone: a queued one leaves the queue, a
running one stops contributing (and the batch stops between steps once all of its jobs are cancelled).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

from .config import ServeConfig
from .errors import APIError, shutting_down
from .images import new_job_id
from .models import ModelSet
from .params import JobSpec
from .runner import run_batch

log = logging.getLogger("ldmkit.serve")
KEEP_FINISHED = 1000  # finished jobs kept for GET /v1/jobs/{id}


class Job:
    def __init__(self, spec: JobSpec, notify: threading.Condition):
        self.id, self.spec, self._notify = new_job_id(), spec, notify
        self.state = "queued"  # queued -> running -> succeeded | failed | cancelled
        self.created, self.started, self.finished = time.time(), None, None
        self.step, self.total_steps = 0, spec.total_steps
        self.results: list = []
        self.error: APIError | None = None
        self.cancel_requested = False
        self.batch_size = 0
        self.done = threading.Event()
        self.version = 0  # bumped on every change (server-sent events poll it)

    def _changed(self) -> None:
        self.version += 1
        with self._notify:
            self._notify.notify_all()

    def set_step(self, step: int) -> None:
        self.step = min(step, self.total_steps)
        self._changed()

    def _end(self, state: str) -> None:
        self.state, self.finished = state, time.time()
        self.done.set()
        self._changed()

    def finish_ok(self, results: list, seconds: float, batch_size: int) -> None:
        self.results, self.step, self.batch_size = results, self.total_steps, batch_size
        self._end("succeeded")

    def finish_failed(self, error: APIError) -> None:
        self.error = error
        self._end("failed")

    def finish_cancelled(self, error: APIError | None = None) -> None:
        self.error = error or self.error or APIError(
            409, f"Job {self.id} was cancelled (DELETE /v1/jobs/{self.id} or its client went away); submit it again "
            "to get its images.", None, "job_cancelled")
        self._end("cancelled")

    @property
    def terminal(self) -> bool:
        return self.done.is_set()

    def snapshot(self) -> dict:
        """The job as GET /v1/jobs/{id} shows it."""
        return {"id": self.id, "object": "job", "status": self.state, "model": self.spec.model,
                "kind": self.spec.kind, "n": self.spec.n, "seeds": self.spec.seeds,
                "progress": round(self.step / self.total_steps, 4) if self.total_steps else 0.0, "step": self.step,
                "total_steps": self.total_steps, "created": int(self.created), "started": self.started,
                "finished": self.finished, "batch_size": self.batch_size,
                "error": self.error.body()["error"] if self.error else None}


class JobQueue:
    def __init__(self, models: ModelSet, config: ServeConfig):
        self.models, self.config = models, config
        self.output = Path(config.output)
        self.cond = threading.Condition()
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.accepting, self.stopped = True, False
        self.max_seen = 0                 # the deepest the queue has been (the load test reads it)
        self.seconds = deque(maxlen=32)   # recent batch durations (Retry-After)
        self.workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ admission
    @property
    def depth(self) -> int:
        return len(self.pending) + len(self.running)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent mean batch time times the batches ahead."""
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else 1.0
        batches = math.ceil(len(self.pending) / self.config.max_batch) / max(1, len(self.workers))
        return int(min(120, max(1, math.ceil(mean * batches))))

    def submit(self, spec: JobSpec) -> Job:
        with self.cond:
            if not self.accepting:
                raise shutting_down()
            if self.depth >= self.config.queue_depth:
                raise APIError(429, f"The queue is full ({self.config.queue_depth} jobs); retry after the "
                               "Retry-After seconds.", None, "queue_full",
                               {"Retry-After": str(self.retry_after())})
            job = Job(spec, self.cond)
            self.pending.append(job)
            self.jobs[job.id] = job
            while len(self.jobs) > KEEP_FINISHED + self.config.queue_depth:
                oldest = next(iter(self.jobs))
                if not self.jobs[oldest].terminal:
                    break
                self.jobs.pop(oldest)
            self.max_seen = max(self.max_seen, self.depth)
            self.cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job, error: APIError | None = None) -> None:
        """Cancel ``job`` alone: out of the queue if it waits, else stopped at the next step."""
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                job.finish_cancelled(error)
            elif not job.terminal:
                job.cancel_requested = True
                if error is not None:
                    job.error = error
            self.cond.notify_all()

    # ------------------------------------------------------------------ workers
    def start(self) -> None:
        """One worker per loaded model (after loading)."""
        for name in self.models.names():
            worker = threading.Thread(target=self._work, args=(name,), name=f"ldmkit-worker-{name}", daemon=True)
            worker.start()
            self.workers.append(worker)

    def _take(self, model: str) -> list[Job]:
        """The oldest queued job for ``model`` and the queued jobs that batch with it (caller holds the lock)."""
        first = next((j for j in self.pending if j.spec.model == model), None)
        if first is None:
            return []
        batch, images, key = [first], first.spec.n, first.spec.batch_key()
        for job in self.pending[self.pending.index(first) + 1:]:
            if job.spec.model == model and job.spec.batch_key() == key and images + job.spec.n <= self.config.max_batch:
                batch.append(job)
                images += job.spec.n
        for job in batch:
            self.pending.remove(job)
            job.state, job.started = "running", time.time()
        self.running += batch
        return batch

    def _work(self, model: str) -> None:
        while True:
            with self.cond:
                batch = self._take(model)
                while not batch and not self.stopped:
                    self.cond.wait()
                    batch = self._take(model)
                if not batch:
                    return
            start = time.perf_counter()
            try:
                run_batch(self.models, batch, self.output)
            except Exception as e:  # a bug, not a user mistake: the jobs fail, the worker lives on
                log.exception("batch on %s failed", model)
                for job in batch:
                    if not job.terminal:
                        job.finish_failed(APIError(500, f"The job failed inside the server ({type(e).__name__}); "
                                                   "see the server log.", None, "server_error"))
            with self.cond:
                self.seconds.append(time.perf_counter() - start)
                for job in batch:
                    self.running.remove(job)
                self.cond.notify_all()

    # ------------------------------------------------------------------ life cycle
    def drain(self, timeout: float) -> None:
        """SIGTERM: take no new jobs (503), let admitted ones finish within ``timeout`` seconds, cancel the
        rest (between steps: no image is half written), then stop the workers."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.accepting = False
            while self.depth and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            left = list(self.pending) + list(self.running)
        if left:
            log.warning("shutting down: cancelling %d unfinished job(s)", len(left))
        for job in left:
            self.cancel(job, shutting_down())
        with self.cond:
            while self.running:
                self.cond.wait(1.0)
            self.stopped = True
            self.cond.notify_all()
        for worker in self.workers:
            worker.join(timeout=5)

    def stats(self) -> dict:
        with self.cond:
            return {"object": "queue", "depth": self.depth, "queued": len(self.pending), "running": len(self.running),
                    "limit": self.config.queue_depth, "max_seen": self.max_seen, "max_batch": self.config.max_batch,
                    "accepting": self.accepting}
