"""Decode-shape GEMM benchmark: the raw C++ ops at SmolLM2-135M's linear shapes, M = 1, bf16 activations.

    python -m benchmarks.bench_decode_gemm [--threads 1] [--calls 20] [--min-time 2] [--csv out.csv]

What a compiled decode step calls per layer (``torch.ops.qkernels.*.default``, no Python wrapper): the int4 g128
(asymmetric, int32 zero points: ``Int4WeightOnly``'s default) and int8 per-channel weight-only GEMMs, and bf16
``F.linear`` as the baseline, on (N x K) = 576x576 (q, o), 192x576 (k, v), 1536x576 (gate, up), 576x1536 (down),
the fused 960x576 (qkv) and 3072x576 (gate_up), the int8 output head 49152x576, and 4096x4096 for comparison with
benchmarks.bench_cpu_gemm. int4 layers with K = 576 run as QuantLinear stores them: padded to K = 640 (five whole
groups of 128, zero codes; x padded with zeros), so their byte count includes the padding. Two weight placements per shape:

* ``hot``: one weight copy, called back to back, so it stays in L2/L3: the time is mostly the per-call fixed cost
  plus the kernel's compute rate;
* ``stream``: copies rotating through > 96 MiB per method (more than the 32 MiB L3), as in a real decode step where
  all layers' weights (~80 MB for SmolLM2 int4 + int8 head) stream from DRAM once per token.

Each sample times ``--calls`` back-to-back calls (rotating copies in ``stream``); the methods of one (shape,
placement) are sampled round-robin in a shuffled order (bench_overhead.time_calls), and the reported time is the
median over samples. On a shared machine compare methods within one run (ratios), not across runs.
GB/s counts weight bytes read (codes + scales + zero points; bf16 weight for F.linear) per call, to compare with
the memcpy bandwidth measured in the same run (read + write bytes, harness.memcpy_bandwidth).
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F

import qkernels

from .bench_overhead import time_calls
from .harness import machine_info, memcpy_bandwidth, print_table, write_csv

# (name, N, K): SmolLM2-135M (hidden 576, intermediate 1536, 9 / 3 heads of 64), fused projections, the head
SHAPES = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
          ("qkv fused", 960, 576), ("gate_up fused", 3072, 576), ("head (int8)", 49152, 576),
          ("4096x4096", 4096, 4096)]
GROUP = 128
STREAM_BYTES = 96 << 20


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def methods_for(N: int, K: int, head: bool):
    """name -> (weights tuple, fn(x, weights) -> out, weight bytes). The head runs int8 only (as in the model)."""
    w = torch.randn(N, K) * 0.02
    out = {}
    wb = w.bfloat16()
    out["bf16 F.linear"] = ((wb,), lambda x, W: F.linear(x, W[0]), _nbytes(wb))
    q8, s8, _ = qkernels.quantize_affine(w, 8, -1, True)
    s8 = s8.reshape(N).float().contiguous()
    i8 = torch.ops.qkernels.int8_weight_only_mm.default
    out["int8 per-channel"] = ((q8, s8), lambda x, W: i8(x, W[0], W[1]), _nbytes(q8, s8))
    if not head:
        # QuantLinear stores K = 576 as 640 (whole groups of 128, zero codes) and pads x: the op sees K = 640
        Kp = -(-K // GROUP) * GROUP
        q4, s4, z4 = qkernels.quantize_affine(F.pad(w, (0, Kp - K)), 4, GROUP, False)
        p4, s4, z4 = qkernels.pack_int4(q4), s4.float().contiguous(), z4.to(torch.int32).contiguous()
        i4 = torch.ops.qkernels.int4_weight_only_mm.default
        pad = (lambda x: x) if Kp == K else (lambda x: F.pad(x, (0, Kp - K)))
        xs = {}  # the padded x is made once per x (the model's F.pad is the layer's cost, not the op's)
        out["int4 g128"] = ((p4, s4, z4), lambda x, W: i4(xs.setdefault(id(x), pad(x)), W[0], W[1], W[2], GROUP, True),
                            _nbytes(p4, s4, z4))
    return out, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed sample")
    ap.add_argument("--min-time", type=float, default=1.5, help="seconds per (shape, placement), at least")
    ap.add_argument("--shapes", default=None, help="comma-separated substrings of shape names (default: all)")
    ap.add_argument("--placements", default="hot,stream")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    info = machine_info()
    bw = memcpy_bandwidth("cpu")
    print(f"# {info['date']}  {info['cpu']}  torch {info['torch']}  threads {a.threads}  "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# measured memcpy bandwidth: {bw:.1f} GB/s (read + write); M = 1, bf16 x, median per call over "
          f"samples of {a.calls} calls")
    rows = []
    shapes = [s for s in SHAPES if a.shapes is None or any(k in s[0] for k in a.shapes.split(","))]
    with torch.inference_mode():
        for name, N, K in shapes:
            methods, w = methods_for(N, K, head="head" in name)
            x = torch.randn(1, K).bfloat16()
            want = F.linear(x.double(), w.double())
            for mname, (W, fn, nb) in methods.items():  # every method computes the product before it is timed
                err = ((fn(x, W).double() - want).norm() / want.norm()).item()
                if err > 0.2:  # int4 g128 of Gaussian weights: ~0.1
                    raise RuntimeError(f"{name} {mname}: relative error {err:.3f}: set up wrongly")
            for placement in a.placements.split(","):
                fns, nbytes = {}, {}
                for mname, (W, fn, nb) in methods.items():
                    copies = [W] if placement == "hot" else \
                        [tuple(t.clone() for t in W) for _ in range(max(1, -(-STREAM_BYTES // nb)))]
                    fns[mname] = (lambda fn, it: lambda: fn(x, next(it)))(fn, itertools.cycle(copies))
                    nbytes[mname] = nb
                t = time_calls(fns, a.calls, a.min_time, "median")
                base = t["bf16 F.linear"]
                for mname in methods:
                    rows.append({"shape": name, "N": N, "K": K, "weights": placement, "method": mname,
                                 "us/call": f"{t[mname] * 1e6:.1f}", "GB/s": f"{nbytes[mname] / t[mname] / 1e9:.2f}",
                                 "% memcpy": f"{100 * nbytes[mname] / t[mname] / 1e9 / bw:.0f}",
                                 "vs bf16 F.linear": f"{base / t[mname]:.2f}x"})
                del fns
    print(f"# load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cols = ["shape", "N", "K", "weights", "method", "us/call", "GB/s", "% memcpy", "vs bf16 F.linear"]
    print_table(rows, cols)
    if a.csv:
        write_csv(a.csv, rows, cols)
    return rows


if __name__ == "__main__":
    main()
