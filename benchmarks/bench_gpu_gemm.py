"""GPU W4A16 / W8A16 GEMM benchmark on Llama-3-8B linear shapes.

    python -m benchmarks.bench_gpu_gemm [--quick] [--csv out.csv]

For every (N, K) and M it times, in the same run and on the same card:
  * bf16 ``F.linear`` (the baseline; cuBLAS),
  * torch's own int4 GEMM ``aten._weight_int4pack_mm`` (weights from ``aten._convert_weight_to_int4pack``),
  * qkernels CUDA ``int4_weight_only_mm`` (group 128, asymmetric) and ``int8_weight_only_mm`` (per channel), and
    W4A16 with the split-K decode kernel forced (``QKERNELS_CUDA_DECODE=splitk``) as an A/B row,
  * W8A8 ``int8_dynamic_mm`` and rowwise fp8 e4m3 (``quantize_fp8`` of x + ``fp8_mm``; sm90+), x quantized in the call,
  * the same two ops through the Triton kernels (autotuned; the first call per shape pays the tuning).
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) when triton is present,
else of CUDA-event timings. Reported: time (us), TFLOP/s, effective GB/s (weights + scales + x + out, each read or
written once), % of the peak bandwidth measured here with a large device-to-device copy, speedup vs bf16.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K): o/qkv-ish, up/gate, down, qkv
MS = [1, 2, 4, 8, 16, 32, 64, 128, 1024, 4096]
QUICK = {(4096, 4096): [1, 16, 1024], (14336, 4096): [1, 16]}  # --quick: about a minute with Triton autotuning
GROUP = 128


def _bench(fn, reps_ms=100):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=reps_ms, return_mode="median") * 1e3  # ms -> us
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return sorted(times)[len(times) // 2]


def _splitk(fn):
    """fn with the split-K decode kernel forced (QKERNELS_CUDA_DECODE=splitk): the A/B row against the default, which
    takes the one-launch direct kernel where N fills the GPU (csrc/cuda/int_gemm.cu)."""
    os.environ["QKERNELS_CUDA_DECODE"] = "splitk"
    try:
        return fn()
    finally:
        del os.environ["QKERNELS_CUDA_DECODE"]


def peak_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_us = _bench(lambda: dst.copy_(src), reps_ms=200)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (t_us * 1e-6) / 1e9


def _aten_int4(w_codes_u4, scale, zero, N, K):
    """torch's tinygemm int4 path; returns a callable x -> out, or None where this torch/card lacks it."""
    try:
        # pack [N, K] uint4 codes as [N, K/2] uint8, even element in the high nibble (torch's convention)
        w_u8 = ((w_codes_u4[:, ::2] << 4) | w_codes_u4[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
        # qScaleAndZeros [K/g, N, 2]: w = (q - 8) * scale + zero
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

        def run(x):
            return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)

        run(torch.randn(1, K, device="cuda", dtype=torch.bfloat16))
        return run
    except (RuntimeError, AttributeError, TypeError) as e:  # pragma: no cover - depends on torch build
        print(f"# aten._weight_int4pack_mm unavailable: {str(e).splitlines()[0][:120]}")
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset (used by scripts/gpu_check.sh)")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() or torch.version.hip is not None:
        raise SystemExit("bench_gpu_gemm needs an NVIDIA GPU (torch.cuda.is_available() is False here); nothing to "
                         "measure on this machine")

    import qkernels

    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"# card: {props.name} (sm{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB)")
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}, "
          f"qkernels._C archs {qkernels._ext.compiled_cuda_archs() or 'none'}")
    peak = peak_bandwidth_gbs()
    print(f"# measured peak bandwidth (1 GiB D2D copy): {peak:.0f} GB/s")

    has_cuda = qkernels._ext.has_kernel("int4_weight_only_mm", "CUDA") and qkernels.dispatch.arch_runs(
        (props.major, props.minor), qkernels._ext.compiled_cuda_archs())
    has_w8a8 = has_cuda and qkernels._ext.has_kernel("int8_dynamic_mm", "CUDA")
    use_triton = triton_version is not None and not args.no_triton
    if use_triton:
        from qkernels import triton as qtriton

    plan = QUICK if args.quick else {shape: MS for shape in SHAPES}
    rows = []
    dev = "cuda"
    for (N, K), ms in plan.items():
        torch.manual_seed(0)
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev)
        packed = qkernels.pack_int4(codes.to(torch.uint8))
        scale = torch.rand(N, K // GROUP, device=dev) * 0.01 + 1e-3
        zp = torch.randint(0, 16, (N, K // GROUP), dtype=torch.int32, device=dev)
        q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev)
        s8 = torch.rand(N, device=dev) * 0.01
        w_bf16 = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        fp8_w = qkernels.quantize_fp8(w_bf16, torch.float8_e4m3fn, "row") if props.major >= 9 else None
        aten_int4 = _aten_int4(codes, scale, (8 - zp).float() * scale, N, K)
        w4_bytes = N * K // 2 + scale.numel() * 4 + zp.numel() * 4
        w8_bytes = N * K + N * 4
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            io = M * K * 2 + M * N * 2
            cands = [("bf16 F.linear", lambda: F.linear(x, w_bf16), N * K * 2)]
            if aten_int4 is not None:
                cands.append(("aten int4pack", lambda: aten_int4(x), N * K // 2 + scale.numel() * 4))
            if has_cuda:
                cands.append(("cuda W4A16", lambda: torch.ops.qkernels.int4_weight_only_mm(x, packed, scale, zp,
                                                                                              GROUP, False), w4_bytes))
                cands.append(("cuda W4A16 splitK", lambda: _splitk(lambda: torch.ops.qkernels.int4_weight_only_mm(
                    x, packed, scale, zp, GROUP, False)), w4_bytes))
                cands.append(("cuda W8A16", lambda: torch.ops.qkernels.int8_weight_only_mm(x, q8, s8), w8_bytes))
            if has_w8a8:  # dynamic per-token int8 x (quantized inside the timed call) times int8 W; torch._int_mm
                cands.append(("cuda W8A8", lambda: torch.ops.qkernels.int8_dynamic_mm(x, q8, s8), w8_bytes))
            if fp8_w is not None:  # rowwise fp8 e4m3: quantize x per token inside the timed call, then fp8_mm
                cands.append(("fp8 rowwise", lambda: qkernels.fp8_mm(
                    *qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row"), *fp8_w), w8_bytes))
            if use_triton:
                t4, t8 = qtriton.get("int4_weight_only_mm"), qtriton.get("int8_weight_only_mm")
                cands.append(("triton W4A16", lambda: t4(x, packed, scale, zp, GROUP, False), w4_bytes))
                cands.append(("triton W8A16", lambda: t8(x, q8, s8), w8_bytes))
            base_us = None
            for name, fn, wbytes in cands:
                try:
                    fn()  # compile / autotune outside the timing
                    us = _bench(fn)
                except Exception as e:  # noqa: BLE001 - report and keep going: one failing kernel is a result too
                    print(f"# {name} N={N} K={K} M={M} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                base_us = us if name == "bf16 F.linear" else base_us
                gbs = (wbytes + io) / (us * 1e-6) / 1e9
                rows.append(dict(N=N, K=K, M=M, kernel=name, us=round(us, 2),
                                 tflops=round(2 * M * N * K / (us * 1e-6) / 1e12, 2), gbs=round(gbs, 1),
                                 pct_peak=round(100 * gbs / peak, 1),
                                 speedup_vs_bf16=round(base_us / us, 2) if base_us else None))
                print(f"N={N:6d} K={K:6d} M={M:5d} {name:14s} {us:10.2f} us {rows[-1]['tflops']:8.2f} TFLOP/s "
                      f"{gbs:8.1f} GB/s {rows[-1]['pct_peak']:6.1f}% peak  x{rows[-1]['speedup_vs_bf16']}",
                      flush=True)
        del packed, q8, w_bf16, codes
        torch.cuda.empty_cache()

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)

    # short table last: speedup vs bf16 per (shape, M), one column per kernel
    kernels = [k for k in dict.fromkeys(r["kernel"] for r in rows) if k != "bf16 F.linear"]
    print("\n# speedup vs bf16 F.linear (>1 is faster); bf16 time in us")
    print(f"{'N x K':>13s} {'M':>5s} {'bf16 us':>9s} " + " ".join(f"{k:>14s}" for k in kernels))
    for (N, K), ms in plan.items():
        for M in ms:
            sel = {r["kernel"]: r for r in rows if r["N"] == N and r["K"] == K and r["M"] == M}
            if "bf16 F.linear" not in sel:
                continue
            cells = [f"{sel[k]['speedup_vs_bf16']:>14}" if k in sel else f"{'-':>14s}" for k in kernels]
            print(f"{f'{N}x{K}':>13s} {M:5d} {sel['bf16 F.linear']['us']:9.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
