"""Decode-shape GEMM benchmark: the raw C++ ops at SmolLM2-135M's linear shapes, M = 1, bf16 activations.

    python -m benchmarks.bench_decode_gemm [--threads 1] [--calls 20] [--min-time 2] [--csv out.csv]

What a compiled decode step calls per layer (``torch.ops.qkernels.*.default``, no Python wrapper): the int4 g128
(asymmetric, int32 zero points: ``Int4WeightOnly``'s default) and int8 per-channel weight-only GEMMs, and bf16
``F.linear`` as the baseline, on (N x K) = 576x576 (q, o), 192x576 (k, v), 1536x576 (gate, up), 576x1536 (down),
the fused 960x576 (qkv) and 3072x576 (gate_up), the int8 output head 49152x576, and 4096x4096 for comparison with
benchmarks.bench_cpu_gemm. int4 layers with K = 576 run as QuantLinear stores them: padded to K = 640 (five whole
groups of 128, zero-point codes), so their byte count includes the padding; "int4 g128" gets x padded with zeros
(made once per x, as before 2026-12-04), "int4 g128 x unpadded" the 576-wide x (the kernel skips the padding
columns' k steps; what QuantLinear does now on the CPU); "int4 g128 W4A8" the same weight through
``int8_dynamic_int4_mm`` (x rounded to int8 per group inside the op: ``Int8DynamicInt4Weight``). ``--int4-head`` adds int4 g64 / g128 rows for the head,
``--pf-blocks 1,2,4`` repeats the int rows at each prefetch distance (QKERNELS_CPU_PF_BLOCKS, set around every call
of every int row so all carry the same cost). Two weight placements per shape:

* ``hot``: one weight copy, called back to back, so it stays in L2/L3: the time is mostly the per-call fixed cost
  plus the kernel's compute rate;
* ``stream``: copies rotating through > 96 MiB per method (more than the 32 MiB L3), as in a real decode step where
  all layers' weights (~80 MB for SmolLM2 int4 + int8 head) stream from DRAM once per token.

Each sample times ``--calls`` back-to-back calls (rotating copies in ``stream``); the methods of one (shape,
placement) are sampled round-robin in a shuffled order (bench_overhead.time_calls), and the reported time is the
median over samples (with the quartiles). On a shared machine compare methods within one run (ratios), not across
runs.
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


def _int4_method(w, N, K, group):
    """("int4 g<group>", padded-x method) and, for a ragged K, the unpadded-x method: name -> (weights, fn, bytes)."""
    # QuantLinear stores K = 576 as 640 (whole groups, zero-point codes): the op sees a 640-column weight
    Kp = -(-K // group) * group
    q4, s4, z4 = qkernels.quantize_affine(F.pad(w, (0, Kp - K)), 4, group, False)
    p4, s4, z4 = qkernels.pack_int4(q4), s4.float().contiguous(), z4.to(torch.int32).contiguous()
    i4 = torch.ops.qkernels.int4_weight_only_mm.default
    pad = (lambda x: x) if Kp == K else (lambda x: F.pad(x, (0, Kp - K)))
    xs = {}  # the padded x is made once per x (the model's F.pad is the layer's cost, not the op's)
    W, nb = (p4, s4, z4), _nbytes(p4, s4, z4)
    out = {f"int4 g{group}": (W, lambda x, W: i4(xs.setdefault(id(x), pad(x)), W[0], W[1], W[2], group, True), nb)}
    if Kp != K:
        out[f"int4 g{group} x unpadded"] = (W, lambda x, W: i4(x, W[0], W[1], W[2], group, True), nb)
    # W4A8: the same weight, x rounded to int8 per group inside the op (x unpadded, as QuantLinear passes it)
    i48 = torch.ops.qkernels.int8_dynamic_int4_mm.default
    out[f"int4 g{group} W4A8"] = (W, lambda x, W: i48(x, W[0], W[1], W[2], group, True), nb)
    return out


def _with_env(fn, name, value):
    def run(x, W):
        os.environ[name] = value
        return fn(x, W)
    return run


def methods_for(N: int, K: int, head: bool, int4_head: bool = False, pf_blocks=()):
    """name -> (weights tuple, fn(x, weights) -> out, weight bytes). The head runs int8 only (as in the model)
    unless int4_head. pf_blocks: the int rows once per QKERNELS_CPU_PF_BLOCKS value."""
    w = torch.randn(N, K) * 0.02
    out = {}
    wb = w.bfloat16()
    out["bf16 F.linear"] = ((wb,), lambda x, W: F.linear(x, W[0]), _nbytes(wb))
    q8, s8, _ = qkernels.quantize_affine(w, 8, -1, True)
    s8 = s8.reshape(N).float().contiguous()
    i8 = torch.ops.qkernels.int8_weight_only_mm.default
    out["int8 per-channel"] = ((q8, s8), lambda x, W: i8(x, W[0], W[1]), _nbytes(q8, s8))
    if not head:
        out.update(_int4_method(w, N, K, GROUP))
    elif int4_head:
        for g in (64, 128):
            out.update(_int4_method(w, N, K, g))
    if pf_blocks:
        ints = {k: v for k, v in out.items() if k.startswith("int")}
        for k in ints:
            del out[k]
        for d in pf_blocks:
            for k, (W, fn, nb) in ints.items():
                out[f"{k} pf={d}"] = (W, _with_env(fn, "QKERNELS_CPU_PF_BLOCKS", str(d)), nb)
    return out, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed sample")
    ap.add_argument("--min-time", type=float, default=1.5, help="seconds per (shape, placement), at least")
    ap.add_argument("--shapes", default=None, help="comma-separated substrings of shape names (default: all)")
    ap.add_argument("--placements", default="hot,stream")
    ap.add_argument("--int4-head", action="store_true", help="int4 g64 / g128 rows for the output head too")
    ap.add_argument("--pf-blocks", default=None, help="comma-separated QKERNELS_CPU_PF_BLOCKS values to compare")
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    pf_blocks = [int(v) for v in a.pf_blocks.split(",")] if a.pf_blocks else []
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
            methods, w = methods_for(N, K, head="head" in name, int4_head=a.int4_head, pf_blocks=pf_blocks)
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
                q = time_calls(fns, a.calls, a.min_time, "quartiles")
                t = {k: v[1] for k, v in q.items()}
                base = t["bf16 F.linear"]
                for mname in methods:
                    rows.append({"shape": name, "N": N, "K": K, "weights": placement, "method": mname,
                                 "us/call": f"{t[mname] * 1e6:.1f}",
                                 "q1-q3 us": f"{q[mname][0] * 1e6:.1f}-{q[mname][2] * 1e6:.1f}",
                                 "GB/s": f"{nbytes[mname] / t[mname] / 1e9:.2f}",
                                 "% memcpy": f"{100 * nbytes[mname] / t[mname] / 1e9 / bw:.0f}",
                                 "vs bf16 F.linear": f"{base / t[mname]:.2f}x"})
                del fns
    print(f"# load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if pf_blocks:
        os.environ.pop("QKERNELS_CPU_PF_BLOCKS", None)
    cols = ["shape", "N", "K", "weights", "method", "us/call", "q1-q3 us", "GB/s", "% memcpy", "vs bf16 F.linear"]
    print_table(rows, cols)
    if a.csv:
        write_csv(a.csv, rows, cols)
    return rows


if __name__ == "__main__":
    main()
