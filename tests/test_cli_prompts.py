"""``ldmkit txt2img --prompts FILE``: prompt files, chunks, resume after SIGKILL, the manifest, and the split
between two ``accelerate launch`` processes, on the bundled emoji model with 2 steps.

The chunks are fixed by the file and --batch-size alone, so every run below (one process, two, killed and
resumed) computes each image in the same batch and must write the same bytes; only a different
--batch-size may move a pixel by one 8-bit level (CPU kernels round a batch differently, see test_cli.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from ldmkit.cli import batch, main, read_png_metadata
from ldmkit.cli.batch import Item, read_prompt_file
from ldmkit.pipelines import LDMTextToImagePipeline

SRC = Path(__file__).resolve().parent.parent / "src"
MODEL = ["--model", "ldmkit:emoji-text2img", "--steps", "2", "--quiet"]
JSONL = [
    {"prompt": "red apple"},
    {"prompt": "grinning face", "n": 2},
    {"prompt": "smiling cat", "seed": 100},
    {"prompt": "blue heart", "negative_prompt": "red"},
]
NAMES = ["00000-red-apple-0.png", "00001-grinning-face-1.png", "00002-grinning-face-2.png",
         "00003-smiling-cat-100.png", "00004-blue-heart-4.png"]

# In-process runs and the subprocesses (OMP_NUM_THREADS=1) use one thread, so that they compute alike.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*argv) -> tuple[int, list[str], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of JSONL in chunks of 2, recording the order of pipeline calls and PNG writes."""
    tmp = tmp_path_factory.mktemp("reference")
    prompts = write_jsonl(tmp / "prompts.jsonl", JSONL)
    events = []
    save = batch.save_png

    base_call = LDMTextToImagePipeline.__call__

    # The real pipeline, with each call recorded; wraps keeps __call__'s signature, which the presets read.
    @functools.wraps(base_call)
    def call(self, prompts, **kw):
        events.append(("chunk", len(prompts)))
        return base_call(self, prompts, **kw)

    def save_recording(image, path, meta):
        events.append(("png", path.name))
        return save(image, path, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LDMTextToImagePipeline, "__call__", call)
        mp.setattr(batch, "save_png", save_recording)
        code, out, err = cli("txt2img", "--prompts", prompts, "--batch-size", "2", *MODEL, "-o", tmp / "out")
    assert code == 0, err
    return {"prompts": prompts, "out": tmp / "out", "stdout": out, "stderr": err, "events": events}


def test_text_lines_skip_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("red apple\n\n# a comment\n  grinning face  \nsmiling cat # not a comment\n", encoding="utf-8")
    items = read_prompt_file(str(f), n=2, seed=10, negative_prompt="blurry")
    assert items == [Item(0, 1, "red apple", "blurry", 10), Item(1, 1, "red apple", "blurry", 11),
                     Item(2, 4, "grinning face", "blurry", 12), Item(3, 4, "grinning face", "blurry", 13),
                     Item(4, 5, "smiling cat # not a comment", "blurry", 14), Item(5, 5, "smiling cat # not a comment",
                                                                               "blurry", 15)]


def test_jsonl_by_suffix_or_first_brace(tmp_path):
    rows = JSONL
    by_suffix = read_prompt_file(str(write_jsonl(tmp_path / "p.jsonl", rows)), 1, None, None)
    by_brace = read_prompt_file(str(write_jsonl(tmp_path / "p.txt", rows)), 1, None, None)
    assert by_suffix == by_brace == [Item(0, 1, "red apple", None, 0), Item(1, 2, "grinning face", None, 1),
                                     Item(2, 2, "grinning face", None, 2), Item(3, 3, "smiling cat", None, 100),
                                     Item(4, 4, "blue heart", "red", 4)]
    assert [batch.file_name(i, len(by_suffix)) for i in by_suffix] == NAMES


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n\n{"seed": 3}\n', 'p.jsonl:3: no "prompt"'),
    ('{"prompt": 7}\n', 'p.jsonl:1: "prompt" is 7, it should be str'),
    ('{"prompt": "a", "seed": "x"}\n', 'p.jsonl:1: "seed" is "x", it should be int'),
    ('{"prompt": "a", "seed": true}\n', 'p.jsonl:1: "seed" is true'),
    ('{"prompt": "a", "seed": 1.5}\n', 'p.jsonl:1: "seed" is 1.5'),
    ('{"prompt": "a", "seed": -1}\n', 'p.jsonl:1: "seed" -1 is out of range'),
    ('{"prompt": "a", "n": 0}\n', 'p.jsonl:1: "n" is 0'),
    ('{"prompt": "a", "n": 600000}\n{"prompt": "b", "n": 600000}\n', "asks for 1200000 images; at most 1000000"),
    ('{"prompt": "a", "negative": "b"}\n', "p.jsonl:1: unknown key(s) negative"),
    ('{"prompt": "  "}\n', "p.jsonl:1: the prompt is empty"),
    ('["a"]\n', "p.jsonl:1: a JSON list, not an object"),
    ("", "holds no prompt"),
    ("\n# only a comment\n", "holds no prompt"),
])
def test_bad_prompt_files_are_one_line(tmp_path, text, message):
    f = tmp_path / "p.jsonl"
    f.write_text(text, encoding="utf-8")
    code, out, err = cli("txt2img", "--prompts", f, "-o", tmp_path / "out", *MODEL)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("extra, message", [
    (["a cat"], "both a prompt ('a cat') and --prompts"),
    (["--grid"], "--grid does not go with --prompts"),
    (["--batch-size", "0"], "--batch-size 0: give 1 or more"),
    (["--seed", str(2**64 - 1)], "--seed 18446744073709551615 is out of range"),
])
def test_bad_options_are_one_line(tmp_path, extra, message):
    f = tmp_path / "p.txt"
    f.write_text("red apple\ngrinning face\n", encoding="utf-8")
    code, _, err = cli("txt2img", "--prompts", f, *extra, "-o", tmp_path / "out", *MODEL)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_missing_file_and_batch_size_alone(tmp_path):
    code, _, err = cli("txt2img", "--prompts", tmp_path / "none.txt", *MODEL)
    assert code == 2 and err == [f"ldmkit txt2img: error: --prompts {tmp_path / 'none.txt'}: no such file."]
    code, _, err = cli("txt2img", "red apple", "--batch-size", "4", *MODEL, "-o", tmp_path / "out")
    assert code == 2 and len(err) == 1 and "--batch-size chunks a --prompts FILE" in err[0]


def test_chunks_are_bounded_and_each_image_is_written_when_its_chunk_ends(reference):
    assert reference["events"] == [("chunk", 2), ("png", NAMES[0]), ("png", NAMES[1]),
                                   ("chunk", 2), ("png", NAMES[2]), ("png", NAMES[3]),
                                   ("chunk", 1), ("png", NAMES[4])]
    assert reference["stdout"] == [str(reference["out"] / n) for n in NAMES]


def test_manifest_and_metadata(reference):
    out = reference["out"]
    assert sorted(files(out)) == sorted(NAMES + ["manifest.jsonl"])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["prompt"], r["seed"], r["negative_prompt"], r["line"]) for r in rows] == [
        (NAMES[0], "red apple", 0, None, 1), (NAMES[1], "grinning face", 1, None, 2),
        (NAMES[2], "grinning face", 2, None, 2), (NAMES[3], "smiling cat", 100, None, 3),
        (NAMES[4], "blue heart", 4, "red", 4)]
    for row in rows:
        meta = read_png_metadata(str(out / row["file"]))
        assert meta == {**row["settings"], "prompt": row["prompt"], "seed": row["seed"],
                        "negative_prompt": row["negative_prompt"]}
        assert row["settings"]["steps"] == 2 and row["settings"]["model"] == "ldmkit:emoji-text2img"
    pixels = [np.asarray(PIL.Image.open(out / n)) for n in NAMES]
    assert not np.array_equal(pixels[1], pixels[2])  # same prompt, seeds 1 and 2: different images


def test_batch_size_changes_no_image_beyond_rounding(reference, tmp_path):
    code, out, err = cli("txt2img", "--prompts", reference["prompts"], "--batch-size", "1", *MODEL, "-o", tmp_path)
    assert code == 0, err
    for name in NAMES:
        a, b = (np.asarray(PIL.Image.open(d / name), dtype=np.int16) for d in (reference["out"], tmp_path))
        # bf16 (--fast on this CPU) rounds differently per batch size. The decoder's float32 head passes those
        # differences on instead of snapping both images to the same bf16 values: up to 2 levels, well under
        # half a level on average (with a bf16 head: 1 level on under 1 % of the pixels).
        diff = np.abs(a - b)
        assert diff.max() <= 2 and diff.mean() < 0.5, name
    # In chunks of 1, the first image is the one `ldmkit txt2img PROMPT --seed 0` makes alone.
    code, single, _ = cli("txt2img", "red apple", "--seed", "0", *MODEL, "-o", tmp_path / "single")
    assert np.array_equal(np.asarray(PIL.Image.open(single[0])), np.asarray(PIL.Image.open(tmp_path / NAMES[0])))


def test_rerun_skips_complete_images_and_refuses_other_settings(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    before = {n: os.stat(out / n).st_mtime_ns for n in NAMES}
    code, written, err = cli("txt2img", "--prompts", reference["prompts"], "--batch-size", "2", *MODEL, "-o", out)
    assert code == 0 and written == [] and "0 image(s) made, 5 of 5 were already complete" in err[-1]
    assert {n: os.stat(out / n).st_mtime_ns for n in NAMES} == before

    other = ["txt2img", "--prompts", reference["prompts"], "--batch-size", "2", *MODEL, "--steps", "1", "-o", out]
    code, _, err = cli(*other)
    assert code == 2 and len(err) == 1 and f"{out / NAMES[0]} is in the way" in err[0]
    assert "steps is 2 there, 1 now" in err[0] and "--force" in err[0]
    code, written, _ = cli(*other, "--force")
    assert code == 0 and written == [str(out / n) for n in NAMES]
    assert read_png_metadata(str(out / NAMES[0]))["steps"] == 1


def test_sigkill_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    # 6 chunks of 2: about 1 s of work after the first image, to catch it part-way on a busy machine.
    rows = [{"prompt": p} for p in ("red apple", "grinning face", "smiling cat", "blue heart", "thumbs up",
                                    "green tree", "yellow star", "white cloud", "red car", "black cat",
                                    "pizza slice", "full moon")]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    argv = ["txt2img", "--prompts", prompts, "--batch-size", "2", *MODEL]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", *map(str, argv), "-o", str(killed)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(killed.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(p.name for p in killed.glob("*.png"))
    assert 0 < len(done) < len(rows), done  # killed part-way, or the test proves nothing
    assert not (killed / "manifest.jsonl").exists()
    # A damaged image (a copy cut short) and a SIGKILLed write's leftover, as a crash on a real disk leaves them.
    (killed / done[0]).write_bytes((killed / done[0]).read_bytes()[:200])
    (killed / f".{done[0]}.x1y2.tmp").write_bytes(b"")
    kept = {n: os.stat(killed / n).st_mtime_ns for n in done[1:]}

    code, written, err = cli(*argv, "-o", killed)
    assert code == 0, err
    assert sorted(Path(p).name for p in written) == sorted(set(files_named(rows)) - set(done[1:]))
    assert {n: os.stat(killed / n).st_mtime_ns for n in done[1:]} == kept  # complete images not remade
    code, _, err = cli(*argv, "-o", tmp_path / "whole")
    assert code == 0, err
    assert files(killed) == files(tmp_path / "whole")  # same names, same bytes, same manifest; no .tmp left


def files_named(rows: list[dict]) -> list[str]:
    items = [Item(i, i + 1, r["prompt"], None, i) for i, r in enumerate(rows)]
    return [batch.file_name(item, len(items)) for item in items]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_writes(reference, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "ldmkit", "txt2img", "--prompts",
           str(reference["prompts"]), "--batch-size", "2", *MODEL, "--device", "cpu", "-o", str(out)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # accelerate split the 3 chunks 2 + 1: process 0 made 4 images, process 1 the last one.
    assert "process 0: 4 image(s) made" in done.stderr and "process 1: 1 image(s) made" in done.stderr
    assert files(out) == files(reference["out"])


def test_upscale_in_chunks_and_its_settings_in_the_proof(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("red apple\ngrinning face\n", encoding="utf-8")
    argv = ["txt2img", "--prompts", prompts, "--batch-size", "2", *MODEL, "--steps", "1", "--upscale",
            "--upscale-steps", "1", "-o", tmp_path / "out"]
    code, written, err = cli(*argv)
    assert code == 0 and len(written) == 2, err
    meta = read_png_metadata(written[1])
    assert meta["upscale"] is True and meta["upscale_steps"] == 1 and meta["seed"] == 1
    assert PIL.Image.open(written[0]).size == (128, 128)  # 32 x 32, then 4x
    code, again, _ = cli(*argv)
    assert code == 0 and again == []  # the upscale settings match: both skipped
    code, _, err = cli(*argv[:-2], "--upscale-steps", "2", "-o", tmp_path / "out")
    assert code == 2 and "upscale_steps is 1 there, 2 now" in err[0]


def test_a_foreign_png_in_the_way_is_refused_before_any_work(reference, tmp_path):
    PIL.Image.new("RGB", (32, 32), "red").save(tmp_path / NAMES[3])  # a sound PNG, but not ldmkit's
    code, written, err = cli("txt2img", "--prompts", reference["prompts"], "--batch-size", "2", *MODEL,
                             "-o", tmp_path)
    assert code == 2 and written == [] and len(err) == 1
    assert f"{tmp_path / NAMES[3]} is in the way" in err[0] and "no ldmkit metadata" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAMES[3]]  # the scan comes before the first image
