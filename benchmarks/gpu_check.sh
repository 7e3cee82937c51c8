#!/usr/bin/env bash
# The GPU check of issue 12, for a CUDA machine (under 8 minutes on one H100):
#   1. the test suite's CUDA-marked tests (@pytest.mark.cuda: fp32 parity CUDA vs CPU, the fp16/bf16 decode
#      fall-back, the feature cache and dtype="auto" on CUDA), log in benchmarks/results/gpu-tests.txt;
#   2. benchmarks/bench_gpu.py: it/s of ldmkit against eager diffusers fp16 on the full-size
#      ldm-text2im-large-256 layout, eager, torch.compile and CUDA graphs -> benchmarks/results/gpu.json.
# Usage: benchmarks/gpu_check.sh [bench_gpu.py options, e.g. --no-compile]   (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA GPU here; run it on a machine with one." >&2
    exit 2
fi
if ! "$PY" -c "import diffusers, transformers, pytest" 2>/dev/null; then
    echo "gpu_check.sh: needs diffusers, transformers and pytest (pip install -e '.[test]')." >&2
    exit 2
fi
mkdir -p benchmarks/results
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

# Every test file with a CUDA-marked test; -m cuda runs only those tests.
mapfile -t files < <(grep -l "mark.cuda" tests/test_*.py)
status=0
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${files[@]}" 2>&1 | tee benchmarks/results/gpu-tests.txt \
    || status=$?
timeout 330 "$PY" benchmarks/bench_gpu.py "$@" || status=$?
exit "$status"
