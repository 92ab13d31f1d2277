"""CPU dequant-GEMM benchmark: qkernels W4A16 / W8A16 / W8A8 vs fp32/bf16 F.linear, torch's own CPU kernels and
torchao's CPU weight-only configs (when torchao is installed; otherwise those rows say "missing" and why).

    python -m benchmarks.bench_cpu_gemm [--quick] [--csv out.csv]
    python -m benchmarks.bench_cpu_gemm --shapes 4096x11008 --ms 1,4 --methods "fp32,int8,W8A16" --repeat 3

Shapes are Llama-2-7B's linear layers ((N, K) = (4096, 4096), (11008, 4096), (4096, 11008)) at decode/prefill
batch sizes M = 1, 4, 16, 64. Every method runs in the same process on the same inputs; the methods of one
(shape, M) are timed round-robin (one call of each per round, so load from other processes on a shared machine
affects all of them alike) and each time is the median over the rounds after warm-up; --repeat prints the
speedups of several such measurements to show the spread. Weights rotate through several copies totalling
> 128 MiB per method so that they come from DRAM, not from the 32 MiB L3 (as in real decoding, where all layers'
weights stream through once per token).
Effective GB/s = weight bytes read (codes + scales) / time; compare with the measured memcpy bandwidth.
For the small decode shapes of SmolLM2-135M (M = 1, the raw ops, hot and streamed weights) see
benchmarks.bench_decode_gemm.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch
import torch.nn.functional as F

import qkernels

from .harness import machine_info, memcpy_bandwidth, print_table, time_cpu_interleaved, write_csv

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 64]
GROUP = 128
ROTATE_BYTES = 128 << 20


def _copies(nbytes: int) -> int:
    return max(1, min(16, -(-ROTATE_BYTES // max(nbytes, 1))))


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _with_env(var, value, fn):
    """Run fn with one kernel switch set (for A/B rows in the same run): QKERNELS_CPU_W4_K64=0 is the 32-k int4
    decode kernel, QKERNELS_CPU_I16=0 keeps bf16 activations on the fp32 int4 / int8 kernels."""
    os.environ[var] = value
    try:
        return fn()
    finally:
        del os.environ[var]


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
    m["qkernels W4A16 g128 (bf16 x, fp32 kernel)"] = (
        lambda: (p4.clone(), s4.clone(), z4.clone()),
        lambda xf, xb, W: _with_env("QKERNELS_CPU_I16", "0",
                                    lambda: qkernels.int4_weight_only_mm(xb, W[0], W[1], W[2], GROUP)),
        _nbytes(p4, s4, z4))
    m["qkernels W4A16 g128 (fp32 x, 32-k kernel)"] = (
        lambda: (p4.clone(), s4.clone(), z4.clone()),
        lambda xf, xb, W: _with_env("QKERNELS_CPU_W4_K64", "0",
                                    lambda: qkernels.int4_weight_only_mm(xf, W[0], W[1], W[2], GROUP)),
        _nbytes(p4, s4, z4))
    m["qkernels W8A16 (bf16 x)"] = (
        lambda: (q8.clone(), s8.clone()),
        lambda xf, xb, W: qkernels.int8_weight_only_mm(xb, W[0], W[1]), _nbytes(q8, s8))
    m["qkernels W8A16 (bf16 x, fp32 kernel)"] = (
        lambda: (q8.clone(), s8.clone()),
        lambda xf, xb, W: _with_env("QKERNELS_CPU_I16", "0", lambda: qkernels.int8_weight_only_mm(xb, W[0], W[1])),
        _nbytes(q8, s8))
    m["qkernels W8A8 dynamic (bf16 x)"] = (
        lambda: (q8.clone(), s8.clone()),
        lambda xf, xb, W: qkernels.int8_dynamic_mm(xb, W[0], W[1]), _nbytes(q8, s8))
    # fp8 / fp4 weights with float activations (the Fp8WeightOnly / Fp4(weight_only=True) layers' ops)
    f8, f8s = qkernels.quantize_fp8(w, torch.float8_e4m3fn, "row")
    m["qkernels fp8 e4m3 weight-only (bf16 x)"] = (
        lambda: (f8.clone(), f8s.clone()),
        lambda xf, xb, W: qkernels.fp8_weight_only_mm(xb, W[0], W[1]), _nbytes(f8, f8s))
    for fmt in ("mxfp4", "nvfp4"):
        fp, fs, fg = qkernels.quantize_fp4(w, fmt)
        m[f"qkernels {fmt} weight-only (bf16 x)"] = (
            (lambda fp=fp, fs=fs, fg=fg: (fp.clone(), fs.clone(), fg)),
            (lambda xf, xb, W, fmt=fmt: qkernels.fp4_weight_only_mm(xb, W[0], W[1], format=fmt, w_global_scale=W[2])),
            _nbytes(fp, fs))
        m[f"qkernels {fmt} weight-only (bf16 x, fp32 kernel)"] = (
            (lambda fp=fp, fs=fs, fg=fg: (fp.clone(), fs.clone(), fg)),
            (lambda xf, xb, W, fmt=fmt: _with_env("QKERNELS_CPU_I16", "0", lambda: qkernels.fp4_weight_only_mm(
                xb, W[0], W[1], format=fmt, w_global_scale=W[2]))),
            _nbytes(fp, fs))
    return m, w


def _torchao_linear(w: torch.Tensor, config) -> torch.nn.Linear:
    """A bf16 nn.Linear holding ``w`` (fp32 [N, K]), quantized in place by torchao's ``quantize_(linear, config)``."""
    from torchao.quantization import quantize_ as ao_quantize_

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    ao_quantize_(lin, config)
    return lin


def _torchao_nbytes(lin: torch.nn.Linear) -> int:
    # torchao's weight subclasses keep codes and scales as inner tensors (qdata, scale, zero_point)
    names, _ = lin.weight.__tensor_flatten__()
    return _nbytes(*(getattr(lin.weight, n) for n in names))


_TORCHAO_COMPILED = ("torchao Int8WeightOnlyConfig (bf16 x)", "torchao IntxWeightOnlyConfig int4 g128 (bf16 x)")


def torchao_methods(w: torch.Tensor, compiled: bool = False):
    """torchao's CPU weight-only rows on bf16 activations: (methods as build_methods returns them, {name: why it
    could not run}). torchao 0.18 on CPU: ``Int8WeightOnlyConfig`` per row converts the int8 codes to bf16 and runs
    ``mm`` then scales the output, per group it dequantizes first; ``IntxWeightOnlyConfig`` (its CPU int4 weight-only
    config) dequantizes to bf16 and calls ``F.linear``, so these rows measure torchao's eager CPU path as a user gets
    it from ``quantize_``. ``Int4WeightOnlyConfig`` has no CPU packing format in 0.18 (recorded as missing, with
    torchao's own error). ``compiled``: also the per-row int8 and the int4 configs under ``torch.compile`` (torchao's
    recommended use: inductor rewrites the int8 one into ``aten._weight_int8pack_mm``, the 'torch int8' row's kernel,
    and generates a dequantize kernel before ``mm`` for the int4 one)."""
    rows = {"torchao Int8WeightOnlyConfig (bf16 x)": "Int8WeightOnlyConfig()",
            "torchao Int8WeightOnlyConfig g128 (bf16 x)": f"Int8WeightOnlyConfig(granularity=PerGroup({GROUP}))",
            "torchao IntxWeightOnlyConfig int4 g128 (bf16 x)":
                f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup({GROUP}))",
            "torchao Int4WeightOnlyConfig g128 (bf16 x)": f"Int4WeightOnlyConfig(group_size={GROUP})"}
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
    except ImportError as e:
        return {}, {name: f"torchao not importable ({e}; pip install torchao)" for name in rows}
    configs = dict(zip(rows, (Int8WeightOnlyConfig(), Int8WeightOnlyConfig(granularity=PerGroup(GROUP)),
                              IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)),
                              Int4WeightOnlyConfig(group_size=GROUP))))
    m, missing = {}, {}
    for name, cfg in configs.items():
        try:
            lin = _torchao_linear(w, cfg)
            with torch.no_grad():
                lin(torch.zeros(1, w.shape[1], dtype=torch.bfloat16))  # formats that need another device fail here
        except Exception as e:  # noqa: BLE001 - any failure is the row's result, reported next to the others
            missing[name] = f"torchao {torchao.__version__} {rows[name]}: {type(e).__name__}: {str(e)[:120]}"
            continue
        m[name] = ((lambda lin=lin: (copy.deepcopy(lin),)), _run_torchao, _torchao_nbytes(lin))
        if compiled and name in _TORCHAO_COMPILED:
            # the same make(), so the compiled row runs on the same rotating copies as the eager one
            m[name.replace("(bf16 x)", "(bf16 x, torch.compile)")] = (m[name][0], _run_torchao_compiled, m[name][2])
    return m, missing


def _run_torchao(xf, xb, W):
    with torch.no_grad():
        return W[0](xb)


@torch.compile(fullgraph=True)
def _torchao_forward(lin, x):
    return lin(x)


def _run_torchao_compiled(xf, xb, W):
    # the modules are graph inputs (inline_inbuilt_nn_modules), so the rotating copies share one graph per shape
    # and M (M = 1 specialised, then one dynamic-M graph); the warm-up rounds of the timing loop pay the compiles.
    # Every (shape, config) adds graphs to the same function: no silent fall-back to eager at the recompile limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    with torch.no_grad():
        return _torchao_forward(W[0], xb)


def sanity_check(methods, w, K):
    """Every method must compute the same product (to quantization error) before its time means anything."""
    x = torch.randn(2, K)
    want = F.linear(x, w)
    for name, (make, run, _) in methods.items():
        out = run(x, x.bfloat16(), make()).float()
        err = ((out - want).norm() / want.norm()).item()
        if err > 0.2:
            raise RuntimeError(f"{name}: relative error {err:.3f} vs fp32 - baseline set up wrongly")


def _parse_shapes(text: str):
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK list, e.g. 4096x11008 (default: all three)")
    ap.add_argument("--ms", default=None, help="comma-separated M list (default: 1,4,16,64)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated substrings; only methods whose name contains one run (fp32 F.linear always)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each (shape, M) this many times; report medians")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--no-torchao-compile", action="store_true",
                    help="skip the torch.compile'd torchao rows (their compiles take ~20 s per shape)")
    args = ap.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [1, 16] if args.quick else MS
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    info = machine_info()
    bw = memcpy_bandwidth("cpu")
    print(f"# {info['date']}  {info['cpu']}  torch {info['torch']}  threads {info['threads']}  "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# measured memcpy bandwidth: {bw:.1f} GB/s (read + write)")
    rows = []
    for N, K in shapes:
        methods, w = build_methods(N, K)
        ao, missing = torchao_methods(w, compiled=not args.no_torchao_compile)
        methods.update(ao)
        if args.methods:
            keys = [k.strip() for k in args.methods.split(",")]
            methods = {n: v for n, v in methods.items() if n == "fp32 F.linear" or any(k in n for k in keys)}
            missing = {n: why for n, why in missing.items() if any(k in n for k in keys)}
        sanity_check(methods, w, K)
        # methods built by the same make() share their rotating weight copies
        copies_of = {}
        for name, (make, run, nbytes) in methods.items():
            if make not in copies_of:
                copies_of[make] = [make() for _ in range(_copies(nbytes))]
        for M in ms:
            xf = torch.randn(M, K)
            xb = xf.bfloat16()
            fns = {}
            for name, (make, run, nbytes) in methods.items():
                cs = copies_of[make]
                fns[name] = (lambda run, cs: lambda i: run(xf, xb, cs[i % len(cs)]))(run, cs)
            runs = [time_cpu_interleaved(fns) for _ in range(args.repeat)]
            for name, (make, run, nbytes) in methods.items():
                t = statistics.median(r[name] for r in runs)
                base = statistics.median(r["fp32 F.linear"] for r in runs)
                row = {
                    "N": N, "K": K, "M": M, "method": name,
                    "time_us": f"{t * 1e6:.0f}",
                    "GB/s": f"{nbytes / t / 1e9:.1f}",
                    "speedup_vs_fp32": f"{base / t:.2f}x",
                }
                if args.repeat > 1:
                    row["speedups_per_repeat"] = " ".join(f"{r['fp32 F.linear'] / r[name]:.2f}" for r in runs)
                rows.append(row)
            rows += [{"N": N, "K": K, "M": M, "method": name, "time_us": "missing", "note": why}
                     for name, why in missing.items()]
        del copies_of
    cols = ["N", "K", "M", "method", "time_us", "GB/s", "speedup_vs_fp32"]
    if args.repeat > 1:
        cols.append("speedups_per_repeat")
    if any("note" in r for r in rows):
        cols.append("note")
    print(f"# load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_table(rows, cols)
    if args.csv:
        write_csv(args.csv, rows, cols)
    return rows


if __name__ == "__main__":
    main()
