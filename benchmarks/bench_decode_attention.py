"""Decode attention per call: the AVX2 kernel vs the portable loops (QKERNELS_CPU_ISA=scalar) vs torch's sdpa.

    python -m benchmarks.bench_decode_attention [--open 1,64,128,200] [--length 256] [--heads 9] [--kv-heads 3]
        [--head-dim 64] [--dtype bfloat16] [--layers 30] [--rounds 40] [--calls 30] [--threads 1] [--csv PATH]

SmolLM2-135M's decode step by default: ``torch.ops.qkernels.decode_attention(q [1, 9, 64], k, v [1, 3, 256, 64],
mask [1, 256], scale)`` in bf16 over a static cache of 256 slots of which ``--open`` are open (the rest hold
transformers' lowest-value mask), once per layer. Each call goes to the next of ``--layers`` distinct caches, as
the layers of a step do (30 x 2 x 96 KiB: the caches do not all stay in L2 as one repeated cache would). The op is
called directly (what a compiled graph calls), so the times include the dispatcher's per-call cost (~1-5 us: the
``--open 1`` row shows it), not the public function's Python checks.

Variants, measured in one process: ``avx2`` (the default dispatch), ``scalar`` (QKERNELS_CPU_ISA=scalar: the
portable loops, i.e. the kernel before the AVX2 path), ``sdpa`` (``F.scaled_dot_product_attention`` with the
additive mask over all ``--length`` slots, GQA, in the cache's dtype: what HF's sdpa attention runs). Every round
takes one sample of ``--calls`` calls per (open length, variant) in a shuffled order; the table gives the median and
quartiles of the per-call time over the rounds, and the median over rounds of the per-round ratio scalar / avx2,
with the load average before and after (the machine's speed drifts: only numbers from one run compare).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

import qkernels  # noqa: F401  (loads the ops)

from .harness import machine_info, print_table, write_csv

VARIANTS = ("avx2", "scalar", "sdpa")


def make_inputs(n_open, args, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, H, KVH, L, D = 1, args.heads, args.kv_heads, args.length, args.head_dim
    q = torch.randn(B, H, D, generator=g).to(dtype)
    layers = [(torch.randn(B, KVH, L, D, generator=g).to(dtype), torch.randn(B, KVH, L, D, generator=g).to(dtype))
              for _ in range(args.layers)]
    mask = torch.zeros(B, L, dtype=dtype)
    mask[:, n_open:] = torch.finfo(dtype).min
    return q, layers, mask


def sample(variant, inputs, calls, scale):
    """Seconds per call over `calls` calls, cycling through the layers' caches."""
    q, layers, mask = inputs
    op = torch.ops.qkernels.decode_attention.default
    nl = len(layers)
    if variant == "sdpa":
        q4, m4 = q[:, :, None, :], mask[:, None, None, :]
        t0 = time.perf_counter()
        for i in range(calls):
            k, v = layers[i % nl]
            F.scaled_dot_product_attention(q4, k, v, attn_mask=m4, scale=scale, enable_gqa=True)
        return (time.perf_counter() - t0) / calls
    if variant == "scalar":
        os.environ["QKERNELS_CPU_ISA"] = "scalar"
    try:
        t0 = time.perf_counter()
        for i in range(calls):
            k, v = layers[i % nl]
            op(q, k, v, mask, scale)
        return (time.perf_counter() - t0) / calls
    finally:
        os.environ.pop("QKERNELS_CPU_ISA", None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--open", default="1,64,128,200", help="open positions per call, comma-separated")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("QKERNELS_CPU_ISA"):
        raise SystemExit("unset QKERNELS_CPU_ISA: this benchmark sets it per variant")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim ** -0.5
    opens = [int(x) for x in args.open.split(",")]
    inputs = {n: make_inputs(n, args, dtype, seed=n) for n in opens}
    # the variants agree (a wrong fast path must not be timed as if it were right)
    for n, (q, layers, mask) in inputs.items():
        k, v = layers[0]
        fast = torch.ops.qkernels.decode_attention.default(q, k, v, mask, scale)
        os.environ["QKERNELS_CPU_ISA"] = "scalar"
        slow = torch.ops.qkernels.decode_attention.default(q, k, v, mask, scale)
        os.environ.pop("QKERNELS_CPU_ISA")
        sd = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale,
                                            enable_gqa=True)[:, :, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fast.float(), slow.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(fast.float(), sd.float(), rtol=tol, atol=tol)
    keys = [(n, v) for n in opens for v in VARIANTS]
    for key in keys:  # warm-up
        sample(key[1], inputs[key[0]], args.calls, scale)
    load0 = os.getloadavg()
    times = {key: [] for key in keys}
    ratios = {n: [] for n in opens}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = keys[:]
        rng.shuffle(order)
        got = {}
        for key in order:
            got[key] = sample(key[1], inputs[key[0]], args.calls, scale)
            times[key].append(got[key])
        for n in opens:
            ratios[n].append(got[(n, "scalar")] / got[(n, "avx2")])
    load1 = os.getloadavg()
    rows = []
    for n in opens:
        for v in VARIANTS:
            q1, med, q3 = statistics.quantiles([t * 1e6 for t in times[(n, v)]], n=4)
            rows.append({"open": n, "variant": v, "us_per_call": f"{med:.2f}", "q1": f"{q1:.2f}", "q3": f"{q3:.2f}",
                         "scalar_over_avx2": f"{statistics.median(ratios[n]):.2f}" if v == "avx2" else ""})
    info = machine_info()
    print(f"# {info['date']} {info['cpu']}, torch {info['torch']}, {args.threads} thread(s); B=1 H={args.heads} "
          f"KVH={args.kv_heads} D={args.head_dim} L={args.length} {args.dtype}, {args.layers} caches, "
          f"{args.rounds} rounds x {args.calls} calls; load {load0[0]:.2f} -> {load1[0]:.2f}")
    cols = ["open", "variant", "us_per_call", "q1", "q3", "scalar_over_avx2"]
    print_table(rows, cols)
    if args.csv:
        write_csv(args.csv, rows, cols)


if __name__ == "__main__":
    main()
