"""A run SIGKILLed after a checkpoint and resumed with ``--resume latest`` ends with exactly the weights of an
uninterrupted run with the same seed and vocabulary (fp32: bit-identical, no tolerance): for text (caption
dropout, a trained tokenizer) and for inpainting (random masks drawn per step and sample)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ldmkit.training import build_recipe, train_ldm
from ldmkit.training.checkpoints import list_checkpoints
from training_utils import final_weights, ldm_dict, metrics, tiny_autoencoder, toy_data, write_yaml

MAX_STEPS = 24


# Training tests run on one torch thread (the shared fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(config, output_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    return [sys.executable, "-m", "ldmkit", "train", "ldm", "--config", str(config),
            "--output-dir", str(output_dir), *extra], env


@pytest.mark.parametrize("conditioning", ["text", "inpaint"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, conditioning):
    data = toy_data(tmp_path / "toy", size=16, variants=1)
    ae = tiny_autoencoder(tmp_path / "ae", levels=3, kind="kl" if conditioning == "text" else "vq")
    recipe = ldm_dict(data, ae, tmp_path / "unused", conditioning=conditioning, max_steps=MAX_STEPS,
                      checkpoint_every=4, keep_last=2, log_every=2, warmup_steps=3)
    recipe["train"]["ema"] = {"decay": 0.99}
    recipe["text"]["caption_dropout"] = 0.3
    config = write_yaml(tmp_path / "recipe.yaml", recipe)

    out = tmp_path / "killed"
    cmd, env = _cli(config, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = list_checkpoints(out)[-1][0]
    assert killed_at < MAX_STEPS and not (out / "final").exists()

    cmd, env = _cli(config, out, "--resume", "latest")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from" in done.stderr and f"(step {killed_at})" in done.stderr

    # The uninterrupted run. It reuses the vocabulary the killed run trained: the tokenizers library's WordPiece
    # trainer breaks frequency ties in hash order, so two separately trained vocabularies may differ (a run
    # keeps its tokenizer, which is how the resumed run got the same one).
    if conditioning == "text":
        recipe["text"]["tokenizer"] = str(out / "tokenizer")
    reference = train_ldm(build_recipe("ldm", recipe, output_dir=tmp_path / "reference"))
    ours, theirs = final_weights(out / "final"), final_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # The raw (non-EMA) weights and the optimizer agree too, and the log has each step once.
    last = f"checkpoints/step-{MAX_STEPS:08d}"
    for name in ("models.pt", "optimizers.pt"):
        a = torch.load(out / last / name, weights_only=True)
        b = torch.load(tmp_path / "reference" / last / name, weights_only=True)
        assert _equal(a, b), name
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(2, MAX_STEPS + 1, 2))
    assert len(list_checkpoints(out)) == 2  # keep_last


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
