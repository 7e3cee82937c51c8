"""3x3 convolutions in float32 on one CPU thread: oneDNN's direct convolution (F.conv2d, what diffusers runs)
against the two exact algorithms of ldmkit.models.conv, per layer shape; the rules in that module come from
this table.

Run by hand:
    python benchmarks/bench_conv.py            # writes benchmarks/results/conv-algorithms.json
Each row: the median of 7 interleaved calls of each algorithm on the same input, the speed-up over
F.conv2d, the max relative difference, and which algorithm ``ldmkit.models.conv.Conv2d`` picks.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import announce, write_result

from ldmkit.models.conv import Conv2d, conv3x3_im2col, conv3x3_winograd, winograd_weight

# (in, out, batch, size): the text-to-image UNet's layers at batch 2 (guidance), then a sweep.
UNET = [(320, 320, 2, 32), (640, 640, 2, 16), (1280, 1280, 2, 16), (1280, 1280, 2, 8), (1280, 1280, 2, 4),
        (2560, 1280, 2, 8), (2560, 1280, 2, 4), (640, 1280, 2, 8), (1920, 640, 2, 16)]
SWEEP = [(c, c, n, s) for c in (128, 256, 512) for n, s in ((2, 8), (2, 16), (1, 32), (2, 32), (1, 64))]


def _medians(fns, repeats: int = 7) -> list[float]:
    times = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def row(in_ch: int, out_ch: int, batch: int, size: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_ch, size, size, generator=gen)
    layer = Conv2d(in_ch, out_ch, 3, padding=1).eval()
    weight, bias = layer.weight.detach(), layer.bias.detach()
    transformed = winograd_weight(weight)
    with torch.inference_mode():
        expected = F.conv2d(x, weight, bias, padding=1)
        direct, im2col, winograd = _medians([lambda: F.conv2d(x, weight, bias, padding=1),
                                             lambda: conv3x3_im2col(x, weight, bias),
                                             lambda: conv3x3_winograd(x, transformed, bias)])
        err = {name: ((out - expected).abs().max() / expected.abs().max()).item()
               for name, out in (("im2col", conv3x3_im2col(x, weight, bias)),
                                 ("winograd", conv3x3_winograd(x, transformed, bias)))}
        picked = layer._pick(x)
    result = {"shape": f"{in_ch}->{out_ch} {batch}x{size}x{size}", "direct_ms": direct * 1e3,
              "im2col_speedup": direct / im2col, "winograd_speedup": direct / winograd,
              "max_rel_diff": err, "picked": picked,
              "gflops_direct": 2 * 9 * in_ch * out_ch * batch * size * size / direct / 1e9}
    print(f"{result['shape']:>24}: direct {direct * 1e3:7.2f} ms ({result['gflops_direct']:5.1f} GFLOP/s)  "
          f"im2col x{result['im2col_speedup']:.2f}  winograd x{result['winograd_speedup']:.2f}  -> {picked}",
          flush=True)
    return result


def main():
    torch.set_num_threads(1)
    busy = announce()
    row(*UNET[0])  # a throwaway row: the process's first large allocations are slower (fresh pages)
    rows = [row(*shape) for shape in UNET + SWEEP]
    write_result("conv-algorithms", {"threads": 1, "dtype": "float32", "rows": rows}, busy)


if __name__ == "__main__":
    main()
