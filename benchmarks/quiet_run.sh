#!/usr/bin/env bash
# Issue 12's speed measurements, in one run on a quiet machine: <= 15 minutes on 2 cores once the folder is
# built (the first run builds the full-size random-weight ldm-text2im-large-256 folder with diffusers: about
# 6 GB of disk in /tmp/ldmkit-bench, a few minutes, not timed).
#
#   benchmarks/quiet_run.sh           # the real run: JSON into benchmarks/results/
#   benchmarks/quiet_run.sh --smoke   # the same code on a tiny layout in ~2 minutes, nothing written
#
# What it measures (benchmarks/bench_text2img.py; each number from fresh one-thread processes that load the
# same saved folder with their own library's from_pretrained):
#   - per mode (exact fp32, bf16, the fast preset): load seconds and peak RSS (lean loading, issue 12 part 3),
#     the UNet step (batch 2), LDMBert, the KL decode and a 2-step guided call, 2 rounds alternating the
#     libraries; ratios against diffusers fp32 (and diffusers bf16)  -> results/text2img-modes.json
#   - the headline: the whole process to one image with the fast preset against diffusers' seed call (fp32,
#     50 DDIM steps, guidance 6, eta 0.3), load included, with each process's peak RSS
#                                                                      -> results/text2img-headline.json
# Budget (from the issue's one-core figures): modes ~6 min, headline ~4.5 min (diffusers' seed call alone is
# ~3.5 min), checks ~10 s. Nothing is written if another process uses a core (benchmarks/common.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1

if [[ "${1:-}" == "--smoke" ]]; then
    exec "$PY" benchmarks/bench_text2img.py --tiny --rounds 1 --repeats 1 --headline-rounds 1
fi

# Build the folder first (not timed), then refuse to spend 15 minutes measuring other processes.
"$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import bench_text2img as b
b.build_folder(Path('/tmp/ldmkit-bench/ldm-text2im-large-256'), 'full')"
if ! "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common
sys.exit(common.announce() > common.BUSY_LIMIT)"; then
    echo "The machine is not quiet: stop the other processes and run this again. Nothing measured." >&2
    exit 1
fi
start=$(date +%s)
"$PY" benchmarks/bench_text2img.py --modes fp32 bf16 fast compiled --steps 2 --repeats 3 --rounds 2 --headline-rounds 1
echo "quiet_run: $(( $(date +%s) - start )) s"
