"""What a command imports is part of its time: a fresh process pays every import before its first step.

Each check runs in a fresh interpreter, since this test process has long imported everything."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_serve_without_the_extra_names_the_install_command():
    done = run_python("import sys; sys.modules['fastapi'] = None\n"
                      "from ldmkit.cli import main\n"
                      "sys.exit(main(['serve', '--no-page']))")
    assert done.returncode == 2, done.stderr
    assert "ldmkit serve: error: ldmkit serve needs the serve extra (fastapi is missing)" in done.stderr
    assert "pip install 'ldmkit[serve]'" in done.stderr


@pytest.mark.parametrize("name", ["ldmkit:emoji-text2img", "ldmkit:emoji-class"])
def test_loading_a_model_with_an_embedding_does_not_import_dynamo(name):
    # On the meta device nn.Embedding's normal_ init falls back to Python code that imports torch._dynamo:
    # 1.5 s of every load of the text encoder, for an init the weights then overwrite.
    done = run_python("import sys\nfrom ldmkit import DiffusionPipeline\n"
                      f"pipe = DiffusionPipeline.from_pretrained({name!r})\n"
                      "assert sum(isinstance(m, __import__('torch').nn.Embedding) "
                      "for c in pipe.components.values() if hasattr(c, 'modules') for m in c.modules())\n"
                      "print('torch._dynamo' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
