"""Signals and permissions (issue 15, cases 10, 16, 17): Ctrl-C while the command starts is one line, SIGTERM or
SIGINT while PNGs or a converted pipeline are written leaves no temporary file or folder and no partial output,
and atomic writes get the umask's permissions. The signals go to real ``python -m ldmkit`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldmkit.io import atomic_folder, atomic_path, current_umask

SRC = str(Path(__file__).resolve().parent.parent / "src")
BUNDLED = Path(SRC) / "ldmkit" / "bundled" / "emoji-text2img"

# Run the command line in a child whose writer stops half-way: it writes some bytes, says WRITING, and waits to
# be signalled. argv[1] names the writer to stop in ("png" or "convert"); the rest is the ldmkit command line.
DRIVER = r"""
import sys, time
import PIL.Image
from ldmkit.cli import main
from ldmkit.pipelines import DiffusionPipeline

def stop(note):
    print(note, flush=True)
    time.sleep(60)

if sys.argv[1] == "png":
    def save(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        stop("WRITING")
    PIL.Image.Image.save = save
else:
    original = DiffusionPipeline.save_pretrained
    def save_pretrained(self, folder, **kwargs):
        original(self, folder, **kwargs)
        stop("WRITING")
    DiffusionPipeline.save_pretrained = save_pretrained
sys.exit(main(sys.argv[2:]))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _signal_when_writing(argv: list[str], sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", (line, proc.stderr.read() if proc.poll() is not None else "")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_a_png_is_written_leaves_nothing(tmp_path, sig, code):
    out = tmp_path / "out"
    done = _signal_when_writing(["png", "txt2img", "red apple", "--steps", "1", "--seed", "1", "--quiet",
                                 "-o", str(out)], sig)
    assert done.returncode == code, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no .NAME.png.XXXX.tmp, no half PNG


def test_sigterm_during_convert_leaves_no_folder(tmp_path):
    done = _signal_when_writing(["convert", "convert", str(BUNDLED), "-o", str(tmp_path / "out")], signal.SIGTERM)
    assert done.returncode == 143, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a hidden .out.XXXX.tmp/


def test_ctrl_c_while_the_command_starts_is_one_line():
    # 0.3 s is inside `import torch` on any machine this runs on; were the import done, main()'s own handler
    # must give the same answer, so the test holds either way.
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "txt2img", "red apple", "-o", os.devnull],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_library_import_changes_no_signal_handler():
    code = "import signal, ldmkit; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_umasks_permissions(tmp_path, umask, file_mode, folder_mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "a.png") as tmp:
            tmp.write_bytes(b"x")
        with atomic_folder(tmp_path / "pipe") as folder:
            (folder / "model_index.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "pipe").stat().st_mode & 0o777 == folder_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "pipe"]


def test_convert_output_is_readable_by_others(tmp_path, capsys):
    from ldmkit.cli import main

    old = os.umask(0o022)
    try:
        assert main(["convert", str(BUNDLED), "-o", str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes["out"] == 0o755 and modes["out/unet"] == 0o755
    assert all(m == 0o644 for name, m in modes.items() if (tmp_path / name).is_file()), modes


def test_a_failed_atomic_folder_leaves_nothing_and_keeps_the_old_one(tmp_path):
    dest = tmp_path / "pipe"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(dest) as folder:
        (folder / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"] and (dest / "old.txt").read_text() == "old"
    with atomic_folder(dest) as folder:
        (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"] and [p.name for p in dest.iterdir()] == ["new.txt"]
