"""Direct vs Winograd F(4x4, 3x3) 3x3 convs on this machine: prints one JSON line.

    python bench/winograd_conv.py [--batch 32] [--reps 5] [--shapes 128x32,256x32,512x32,...] [--nchw]

For every CxH (C channels in and out, HxH maps) it times forward and forward+backward (input and weight
gradients) of F.conv2d and of `winograd_conv3x3`, taking the fastest of `--reps` runs (the least
disturbed by other processes), and reports both speed-ups with the CPU's vector ISA; the dispatch rules
in `pipeline.layers.winograd.RULES` (per ISA, with and without backward) come from these figures.
Activations are NHWC (channels_last), as StyleGAN2 runs on CPU; `--nchw` measures NCHW instead. Freed memory is kept in the process, as gan-train does
(`pipeline.training.host_memory`), so page faults do not count against the path that allocates more.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.layers.winograd import cpu_isa, winograd_conv3x3  # noqa: E402
from pipeline.training.host_memory import keep_freed_memory  # noqa: E402


def _fastest(fn, reps: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(conv, x: torch.Tensor, w: torch.Tensor, reps: int) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            conv(x, w)

    def forward_backward():
        y = conv(x, w)
        torch.autograd.grad(y, (x, w), torch.ones_like(y))

    return _fastest(forward, reps), _fastest(forward_backward, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", default="128x32,128x16,256x32,256x16,256x8,512x32,512x16,512x8,512x4")
    parser.add_argument("--nchw", action="store_true", help="NCHW activations instead of channels_last")
    args = parser.parse_args()
    keep_freed_memory()
    layout = torch.contiguous_format if args.nchw else torch.channels_last
    direct = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    rows = []
    for shape in args.shapes.split(","):
        c, h = (int(v) for v in shape.split("x"))
        x = torch.randn(args.batch, c, h, h).contiguous(memory_format=layout).requires_grad_()
        w = (torch.randn(c, c, 3, 3) / (9 * c) ** 0.5).requires_grad_()
        d_f, d_fb = measure(direct, x, w, args.reps)
        w_f, w_fb = measure(winograd_conv3x3, x, w, args.reps)
        rows.append({"channels": c, "size": h, "direct_fwd_ms": round(d_f * 1e3, 2),
                     "winograd_fwd_ms": round(w_f * 1e3, 2), "direct_fwd_bwd_ms": round(d_fb * 1e3, 2),
                     "winograd_fwd_bwd_ms": round(w_fb * 1e3, 2), "speedup_fwd": round(d_f / w_f, 2),
                     "speedup_fwd_bwd": round(d_fb / w_fb, 2)})
    print(json.dumps({"bench": "winograd_conv", "batch": args.batch, "reps": args.reps,
                      "layout": "nchw" if args.nchw else "nhwc", "cpu_isa": torch.backends.cpu.get_cpu_capability(),
                      "rule_table": cpu_isa(),
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "layers": rows}))


if __name__ == "__main__":
    main()
