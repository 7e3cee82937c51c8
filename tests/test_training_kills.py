"""Ten SIGKILLs at seeded random moments of a toy ``ldmkit train ldm`` run, some during steps and some in the
middle of a checkpoint write, each followed by ``--resume latest``: the run ends with exactly the weights,
optimizer state and log of an uninterrupted run (fp32: bit-identical, no tolerance), and leaves no temporary
file behind (issue 15, training faults).

A kill during a checkpoint write is aimed with the test hook LDMKIT_TEST_CHECKPOINT_DELAY (checkpoints.py),
which pauses after each file of a checkpoint, so the kill lands between two of its files.

Each run is ``ldmkit.cli.main(["train", "ldm", ...])`` in a process forked from one that has imported ldmkit
once (:class:`Forkserver`): eleven interpreters importing torch would spend 30 s of this test starting up."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmkit.training import build_recipe, train_ldm
from ldmkit.training.checkpoints import CHECKPOINTS, checkpoint_dir, list_checkpoints
from training_utils import final_weights, ldm_dict, metrics, tiny_autoencoder, toy_data, write_yaml

MAX_STEPS = 18
KILLS = 10
PAUSE = 0.06  # seconds after each checkpoint file, in the runs killed during a checkpoint write

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _last_step(out: Path, since: float) -> int:
    """The newest step that a run started at ``since`` logged (older lines are the killed runs')."""
    log = out / "metrics.jsonl"
    step = -1
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "loss" in record and record["time"] >= since:
            step = max(step, record["step"])
    return step


def _writing(out: Path, step: int, since: float) -> bool:
    """Whether a run started at ``since`` is writing the checkpoint of ``step`` (or a later one)."""
    folder = out / CHECKPOINTS
    for path in folder.glob(".step-*.partial") if folder.is_dir() else []:
        try:
            if int(path.name[6:14]) >= step and path.stat().st_mtime >= since:
                return True
        except (FileNotFoundError, ValueError):
            continue
    return False


SERVER = """
import json, os, sys
import ldmkit.cli, ldmkit.training.ldm, accelerate, torch._dynamo, torch.distributed.tensor  # what every run imports
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os._exit(ldmkit.cli.main(job["argv"]))
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Forkserver:
    """A process with ldmkit imported that forks one ``ldmkit`` command line per :meth:`start`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.runs = 0

    def start(self, argv: list[str], env: dict) -> Run:
        self.runs += 1
        stderr = self.folder / f"stderr-{self.runs}.txt"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "stderr": str(stderr)}) + "\n")
        self.proc.stdin.flush()
        return Run(self, int(self.proc.stdout.readline()), stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a run still going after a failed assertion
            self.proc.kill()
            self.proc.wait()


class Run:
    def __init__(self, server: Forkserver, pid: int, stderr: Path):
        self.server, self.pid, self.stderr_file, self.returncode = server, pid, stderr, None

    def running(self) -> bool:
        # The server writes the exit status as soon as the run ends: nothing to read yet means still running.
        return not select.select([self.server.proc.stdout], [], [], 0)[0]

    def wait(self) -> int:
        self.returncode = int(self.server.proc.stdout.readline())
        return self.returncode

    def stderr(self) -> str:
        return self.stderr_file.read_text()[-3000:]


def _kill_when(run: Run, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if not run.running() or time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGKILL)
            run.wait()
            raise AssertionError(f"the run ended (or stalled) before {what}: {run.stderr()}")
        time.sleep(0.005)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_ten_sigkills_and_resumes_end_bit_identical(tmp_path):
    data = toy_data(tmp_path / "toy", size=16, variants=1)
    ae = tiny_autoencoder(tmp_path / "ae", levels=3)
    recipe = ldm_dict(data, ae, tmp_path / "reference", max_steps=MAX_STEPS, checkpoint_every=2, keep_last=2,
                      warmup_steps=3)
    recipe["train"]["ema"] = {"decay": 0.99}
    recipe["text"]["caption_dropout"] = 0.3  # draws from the step's random stream: resumed exactly or not at all
    reference = train_ldm(build_recipe("ldm", recipe))
    recipe["text"]["tokenizer"] = str(tmp_path / "reference" / "tokenizer")  # one vocabulary for every run
    recipe["output_dir"] = str(tmp_path / "killed")
    config = write_yaml(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "killed"
    argv = ["train", "ldm", "--config", str(config), "--resume", "latest"]
    server = Forkserver(tmp_path)
    try:
        landed = _kill_ten_times(server, argv, out)
        done = server.start(argv, {})
        assert done.wait() == 0, done.stderr()
    finally:
        server.close()
    checkpoint_kills = [mid for kind, *_, mid in landed if kind == "checkpoint"]
    assert sum(checkpoint_kills) >= 3, landed  # most of them landed inside a checkpoint write

    ours, theirs = final_weights(out / "final"), final_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}; kills: {landed}"
    for name in ("models.pt", "optimizers.pt", "ema.pt"):
        a = torch.load(checkpoint_dir(out, MAX_STEPS) / name, weights_only=True)
        b = torch.load(checkpoint_dir(tmp_path / "reference", MAX_STEPS) / name, weights_only=True)
        assert _equal(a, b), name
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert [s for s, _ in list_checkpoints(out)] == [MAX_STEPS - 2, MAX_STEPS]  # keep_last
    assert not list(out.rglob(".*")), list(out.rglob(".*"))  # no temporary file or folder left


def _kill_ten_times(server: Forkserver, argv: list[str], out: Path) -> list[tuple]:
    """Start, SIGKILL at a seeded moment, and start again with --resume latest, KILLS times; returns
    ``(kind, start step, target, whether a checkpoint was half-written)`` per kill."""
    rng = random.Random(15)
    kinds = ["step", "checkpoint"] * (KILLS // 2)
    rng.shuffle(kinds)
    moments = sorted(rng.sample(range(2, MAX_STEPS - 4), KILLS))  # spread over the run
    landed = []
    for kind, moment in zip(kinds, moments):
        start = list_checkpoints(out)[-1][0] if list_checkpoints(out) else 0
        env = {}
        if kind == "checkpoint":
            env["LDMKIT_TEST_CHECKPOINT_DELAY"] = str(PAUSE)
        since = time.time() - 0.01
        proc = server.start(argv, env)
        if kind == "step":
            target = max(moment, start + 1)
            _kill_when(proc, lambda t=target, s=since: _last_step(out, s) >= t, f"step {target}")
            time.sleep(rng.uniform(0, 0.05))
        else:
            target = min(MAX_STEPS, max(moment, start + 1) + max(moment, start + 1) % 2)  # checkpoints: even steps
            _kill_when(proc, lambda t=target, s=since: _writing(out, t, s), f"writing checkpoint {target}")
            time.sleep(rng.uniform(0, 5 * PAUSE))  # a checkpoint is 6 files: this lands between two of them
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, proc.stderr()
        mid_write = any((out / CHECKPOINTS).glob(".step-*.partial"))
        landed.append((kind, start, target, mid_write))
        assert not (out / "final").exists(), landed

    return landed
