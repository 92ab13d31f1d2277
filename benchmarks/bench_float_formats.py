"""fp8 / fp4 benchmark: cast throughput (GB/s vs a measured memcpy) and emulated fp8 / fp4 GEMM time vs bf16 / fp32
F.linear, all measured in the same run (median of repeats after warm-up).

    python -m benchmarks.bench_float_formats [--device cpu|cuda] [--repeats N] [--csv out.csv]

On CPU this times the C++ kernels of csrc/cpu/float8.cpp / float4.cpp; on a GPU whatever qkernels.dispatch picks
(torch._scaled_mm where the chip has fp8/fp4, else the emulation).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import qkernels


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-up calls."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_casts(device, repeats, R=4096, C=4096):
    rows = []
    x32 = torch.randn(R, C, device=device)
    nbytes = x32.numel() * 4
    dst = torch.empty_like(x32)
    t_copy = timed(lambda: dst.copy_(x32), repeats, device)
    copy_gbs = 2 * nbytes / t_copy / 1e9
    rows.append(("memcpy fp32 (copy_ into an existing tensor)", t_copy, copy_gbs))
    # every cast returns a new tensor; on CPU, first-touching a fresh allocation of this size costs about as much as
    # the copy itself, so clone() is the fair ceiling for them
    t_clone = timed(lambda: x32.clone(), repeats, device)
    clone_gbs = 2 * nbytes / t_clone / 1e9
    rows.append(("clone fp32 (allocate + copy)", t_clone, clone_gbs))
    for in_dtype in (torch.float32, torch.bfloat16):
        x = x32.to(in_dtype)
        ib = x.numel() * x.element_size()
        # what a user has without qkernels: torch's own cast (no scaling) and an unscaled decode times the scale
        t = timed(lambda: x.to(torch.float8_e4m3fn), repeats, device)
        rows.append((f"torch {str(in_dtype)[6:]}.to(float8_e4m3fn) (no scale)", t, (ib + x.numel()) / t / 1e9))
        q8 = x.to(torch.float8_e4m3fn)
        t = timed(lambda: q8.to(in_dtype) * 2.0, repeats, device)
        rows.append((f"torch float8_e4m3fn.to({str(in_dtype)[6:]}) * scale", t, (x.numel() + ib) / t / 1e9))
        for gran, bs in (("tensor", None), ("row", None), ("block", 128)):
            t = timed(lambda: qkernels.quantize_fp8(x, torch.float8_e4m3fn, gran, bs or 128), repeats, device)
            # a per-tensor scale reads x twice (amax pass + cast pass); count the bytes the op must move once
            rows.append((f"quantize_fp8 {str(in_dtype)[6:]} {gran}", t, (ib + x.numel()) / t / 1e9))
        q, s = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row")
        t = timed(lambda: qkernels.dequantize_fp8(q, s, in_dtype), repeats, device)
        rows.append((f"dequantize_fp8 -> {str(in_dtype)[6:]}", t, (x.numel() + ib) / t / 1e9))
        for fmt in ("mxfp4", "nvfp4"):
            t = timed(lambda: qkernels.quantize_fp4(x, fmt), repeats, device)
            rows.append((f"quantize_fp4 {str(in_dtype)[6:]} {fmt}", t, (ib + x.numel() // 2) / t / 1e9))
            p, sc, g = qkernels.quantize_fp4(x, fmt)
            t = timed(lambda: qkernels.dequantize_fp4(p, sc, g, fmt, out_dtype=in_dtype), repeats, device)
            rows.append((f"dequantize_fp4 {fmt} -> {str(in_dtype)[6:]}", t, (x.numel() // 2 + ib) / t / 1e9))
    return rows, copy_gbs, clone_gbs


def bench_gemms(device, repeats, shapes):
    rows = []
    for M, N, K in shapes:
        x = torch.randn(M, K, device=device)
        w = torch.randn(N, K, device=device) * 0.02
        flops = 2 * M * N * K
        base = {}
        for name, dt in (("F.linear fp32", torch.float32), ("F.linear bf16", torch.bfloat16)):
            xd, wd = x.to(dt), w.to(dt)
            base[name] = timed(lambda: F.linear(xd, wd), repeats, device)
        for name, t in base.items():
            rows.append(((M, N, K), name, t, flops / t / 1e9, base["F.linear bf16"] / t))
        xb = x.to(torch.bfloat16)
        wq, ws = qkernels.quantize_fp8(w, torch.float8_e4m3fn, "row")
        wqt, wst = qkernels.quantize_fp8(w, torch.float8_e4m3fn, "tensor")
        wqb, wsb = qkernels.quantize_fp8(w, torch.float8_e4m3fn, "block", (128, 128))

        def fp8_dyn(wq=wq, ws=ws, gran="row", bs=128):
            xq, xs = qkernels.quantize_fp8(xb, torch.float8_e4m3fn, gran, bs)
            return qkernels.fp8_mm(xq, xs, wq, ws, torch.bfloat16)

        cands = [
            ("fp8 e4m3 tensor (quant x + mm)", lambda: fp8_dyn(wqt, wst, "tensor")),
            ("fp8 e4m3 row (quant x + mm)", lambda: fp8_dyn()),
            ("fp8 e4m3 block 1x128/128x128", lambda: fp8_dyn(wqb, wsb, "block", 128)),
            # weight-only (x stays bf16): the fused op (the Fp8WeightOnly layer's forward), and decoding the weight
            # to bf16 for F.linear on every call (what the layer did before the op existed)
            ("fp8 e4m3 weight-only (fp8_weight_only_mm)", lambda: qkernels.fp8_weight_only_mm(xb, wq, ws)),
            ("fp8 e4m3 weight-only (dequantize + F.linear)",
             lambda: F.linear(xb, qkernels.dequantize_fp8(wq, ws, torch.bfloat16))),
        ]
        for fmt in ("mxfp4", "nvfp4"):
            wp, wsc, wg = qkernels.quantize_fp4(w, fmt)

            def fp4_dyn(fmt=fmt, wp=wp, wsc=wsc, wg=wg):
                xp, xs, xg = qkernels.quantize_fp4(xb, fmt)
                return qkernels.fp4_mm(xp, xs, wp, wsc, torch.bfloat16, format=fmt, a_global_scale=xg,
                                       b_global_scale=wg)

            cands.append((f"{fmt} (quant x + mm)", fp4_dyn))
            cands.append((f"{fmt} weight-only (fp4_weight_only_mm)",
                          lambda fmt=fmt, wp=wp, wsc=wsc, wg=wg: qkernels.fp4_weight_only_mm(
                              xb, wp, wsc, format=fmt, w_global_scale=wg if fmt == "nvfp4" else None)))
        for name, fn in cands:
            t = timed(fn, repeats, device)
            rows.append(((M, N, K), name, t, flops / t / 1e9, base["F.linear bf16"] / t))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    dev = args.device
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if dev == "cuda" else
             f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"))
    print(f"fp8_mm dispatch: {qkernels.explain('fp8_mm', dev, a_dtype=torch.float8_e4m3fn, b_dtype=torch.float8_e4m3fn, granularity='row', out_dtype=torch.bfloat16, K=4096, N=4096).backend}")
    cast_rows, copy_gbs, clone_gbs = bench_casts(dev, args.repeats)
    print(f"\n### Casts, 4096 x 4096 (median of {args.repeats})\n")
    print("| op | time (ms) | GB/s | % of memcpy | % of clone |\n|---|---:|---:|---:|---:|")
    for name, t, gbs in cast_rows:
        print(f"| {name} | {t * 1e3:.2f} | {gbs:.2f} | {100 * gbs / copy_gbs:.0f}% | {100 * gbs / clone_gbs:.0f}% |")
    shapes = [(1, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)]
    gemm_rows = bench_gemms(dev, args.repeats, shapes)
    print(f"\n### GEMMs x [M, K] @ W[N, K]^T (median of {args.repeats}; emulated rows include quantizing x)\n")
    print("| M, N, K | kernel | time (ms) | GFLOP/s | speedup vs bf16 F.linear |\n|---|---|---:|---:|---:|")
    for shape, name, t, gf, sp in gemm_rows:
        print(f"| {shape} | {name} | {t * 1e3:.2f} | {gf:.1f} | {sp:.2f}x |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["kind", "shape", "name", "seconds", "rate"])
            for name, t, gbs in cast_rows:
                wr.writerow(["cast", "4096x4096", name, t, gbs])
            for shape, name, t, gf, _ in gemm_rows:
                wr.writerow(["gemm", "x".join(map(str, shape)), name, t, gf])


if __name__ == "__main__":
    main()
