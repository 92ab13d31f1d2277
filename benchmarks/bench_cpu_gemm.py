"""CPU dequant-GEMM benchmark: qkernels W4A16 / W8A16 / W8A8 vs fp32/bf16 F.linear and torch's own CPU kernels.

    python -m benchmarks.bench_cpu_gemm [--quick] [--csv out.csv]

Shapes are Llama-2-7B's linear layers ((N, K) = (4096, 4096), (11008, 4096), (4096, 11008)) at decode/prefill
batch sizes M = 1, 4, 16, 64. Every method runs in the same process on the same inputs; times are medians after
warm-up. Weights rotate through several copies totalling > 128 MiB per method so that they come from DRAM, not
from the 32 MiB L3 (as in real decoding, where all layers' weights stream through once per token).
Effective GB/s = weight bytes read (codes + scales) / time; compare with the measured memcpy bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qkernels

from .harness import machine_info, memcpy_bandwidth, print_table, time_cpu, write_csv

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 64]
GROUP = 128
ROTATE_BYTES = 128 << 20


def _copies(nbytes: int) -> int:
    return max(1, min(16, -(-ROTATE_BYTES // max(nbytes, 1))))


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def build_methods(N: int, K: int):
    """name -> (make_weights() -> tuple, run(x_fp32, x_bf16, weights) -> out, bytes of one weight copy)."""
    w = torch.randn(N, K) * 0.02
    q4, s4, z4 = qkernels.quantize_affine(w, 4, GROUP, False)
    p4 = qkernels.pack_int4(q4)
    q8, s8, _ = qkernels.quantize_affine(w, 8, -1, True)
    s8 = s8.reshape(N)

    # torch's int4 CPU kernel: unsigned codes [0, 15], w = (q - 8) * scale + zero with scale/zero [K/g, N, 2]
    qu, su, zu = qkernels.quantize_affine(w, 4, GROUP, False, signed=False)
    t_scale = su.t().contiguous()
    t_zero = (-(zu.float() - 8) * su).t().contiguous()
    t_sz = torch.stack([t_scale, t_zero], dim=-1)
    t_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qu.to(torch.int32), 2)

    m = {}
    m["fp32 F.linear"] = (lambda: (w.clone(),), lambda xf, xb, W: F.linear(xf, W[0]), _nbytes(w))
    wb = w.bfloat16()
    m["bf16 F.linear"] = (lambda: (wb.clone(),), lambda xf, xb, W: F.linear(xb, W[0]), _nbytes(wb))
    m["torch int4 (_weight_int4pack_mm_for_cpu, bf16)"] = (
        lambda: (t_packed.clone(), t_sz.bfloat16()),
        lambda xf, xb, W: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, W[0], GROUP, W[1]),
        _nbytes(t_packed, t_sz.bfloat16()))
    m["torch int8 (_weight_int8pack_mm, bf16)"] = (
        lambda: (q8.clone(), s8.bfloat16()),
        lambda xf, xb, W: torch.ops.aten._weight_int8pack_mm(xb, W[0], W[1]), _nbytes(q8, s8.bfloat16()))
    m["qkernels W4A16 g128 (fp32 x)"] = (
        lambda: (p4.clone(), s4.clone(), z4.clone()),
        lambda xf, xb, W: qkernels.int4_weight_only_mm(xf, W[0], W[1], W[2], GROUP), _nbytes(p4, s4, z4))
    m["qkernels W4A16 g128 (bf16 x)"] = (
        lambda: (p4.clone(), s4.clone(), z4.clone()),
        lambda xf, xb, W: qkernels.int4_weight_only_mm(xb, W[0], W[1], W[2], GROUP), _nbytes(p4, s4, z4))
    m["qkernels W8A16 (bf16 x)"] = (
        lambda: (q8.clone(), s8.clone()),
        lambda xf, xb, W: qkernels.int8_weight_only_mm(xb, W[0], W[1]), _nbytes(q8, s8))
    m["qkernels W8A8 dynamic (bf16 x)"] = (
        lambda: (q8.clone(), s8.clone()),
        lambda xf, xb, W: qkernels.int8_dynamic_mm(xb, W[0], W[1]), _nbytes(q8, s8))
    # torchao's int4 CPU layout (Int4CPULayout) calls the same aten kernel as the 'torch int4' row above, so that
    # row stands for it; torchao is not a dependency of this benchmark.
    return m, w


def sanity_check(methods, w, K):
    """Every method must compute the same product (to quantization error) before its time means anything."""
    x = torch.randn(2, K)
    want = F.linear(x, w)
    for name, (make, run, _) in methods.items():
        out = run(x, x.bfloat16(), make()).float()
        err = ((out - want).norm() / want.norm()).item()
        if err > 0.2:
            raise RuntimeError(f"{name}: relative error {err:.3f} vs fp32 - baseline set up wrongly")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [1, 16] if args.quick else MS
    info = machine_info()
    bw = memcpy_bandwidth("cpu")
    print(f"# {info['date']}  {info['cpu']}  torch {info['torch']}  threads {info['threads']}")
    print(f"# measured memcpy bandwidth: {bw:.1f} GB/s (read + write)")
    rows = []
    for N, K in shapes:
        methods, w = build_methods(N, K)
        sanity_check(methods, w, K)
        for M in ms:
            xf = torch.randn(M, K)
            xb = xf.bfloat16()
            base = None
            for name, (make, run, nbytes) in methods.items():
                copies = [make() for _ in range(_copies(nbytes))]
                t = time_cpu(lambda i: run(xf, xb, copies[i % len(copies)]))
                del copies
                if name == "fp32 F.linear":
                    base = t
                rows.append({
                    "N": N, "K": K, "M": M, "method": name,
                    "time_us": f"{t * 1e6:.0f}",
                    "GB/s": f"{nbytes / t / 1e9:.1f}",
                    "speedup_vs_fp32": f"{base / t:.2f}x",
                })
    cols = ["N", "K", "M", "method", "time_us", "GB/s", "speedup_vs_fp32"]
    print_table(rows, cols)
    if args.csv:
        write_csv(args.csv, rows, cols)
    return rows


if __name__ == "__main__":
    main()
