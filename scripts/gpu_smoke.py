"""Fallback for scripts/gpu_check.sh where pytest is not installed: the core of tests/test_cuda_kernels.py without
pytest (bit-exact quant ops, GEMMs over many M against the fp64 reference, Triton on GPU). Exit status 1 on any
failure. Tolerances as documented in tests/test_cuda_kernels.py."""

from __future__ import annotations

import sys
import traceback

import torch

import qkernels
from qkernels import reference as ref

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
FAILS: list[str] = []
PASSES = 0


def check(name, ok, detail=""):
    global PASSES
    if ok:
        PASSES += 1
    else:
        FAILS.append(f"{name} {detail}")
        print(f"FAIL {name} {detail}", flush=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def quant_ops(dev="cuda"):
    ops = torch.ops.qkernels
    for signed in (True, False):
        q = torch.randint(-8 if signed else 0, 8 if signed else 16, (37, 130), device=dev,
                          dtype=torch.int8 if signed else torch.uint8)
        p = ops.pack_int4(q)
        check(f"pack_int4 signed={signed}", torch.equal(p, ref.OPS["pack_int4"](q)))
        check(f"unpack_int4 signed={signed}", torch.equal(ops.unpack_int4(p, signed), q))
    for wdt in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(33, 768, device=dev) * 2).to(wdt)
        for bits, g, sym, signed, fz in [(4, 32, True, True, False), (4, 128, False, False, False),
                                         (8, 768, True, True, False), (4, 3, True, False, False),
                                         (4, 64, False, False, True)]:
            tag = f"{wdt} bits={bits} g={g} sym={sym} signed={signed} fz={fz}"
            s, z = ops.choose_qparams_affine(w, bits, g, sym, signed, fz)
            sr, zr = ref.OPS["choose_qparams_affine"](w, bits, g, sym, signed, fz)
            check(f"choose_qparams {tag}", torch.equal(s, sr) and torch.equal(z, zr))
            q = ops.quantize_affine(w, sr, zr, bits, g, signed, fz)
            check(f"quantize {tag}", torch.equal(q, ref.OPS["quantize_affine"](w, sr, zr, bits, g, signed, fz)))
            for od in (torch.float32, torch.bfloat16, torch.float16):
                check(f"dequantize {tag} -> {od}", torch.equal(ops.dequantize_affine(q, sr, zr, g, fz, od),
                                                             ref.OPS["dequantize_affine"](q, sr, zr, g, fz, od)))


def gemms(backend, dev="cuda"):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for N, K, g in [(264, 1024, 128), (200, 768, 32), (72, 4128, 64), (64, 96, 48)]:
            q = torch.randint(-8, 8, (N, K), dtype=torch.int8, device=dev)
            packed = ref.OPS["pack_int4"](q)
            s = torch.rand(N, K // g, device=dev) * 0.02 + 0.005
            z = torch.randint(-8, 17, (N, K // g), dtype=torch.int32, device=dev)
            q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev)
            s8 = torch.rand(N, device=dev) * 0.01
            ms = list(range(1, 17)) + [33, 64, 65, 300] if backend == "cuda" else [1, 16, 300]
            for M in ms:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                out = qkernels.int4_weight_only_mm(x, packed, s, z, g, signed=True, backend=backend)
                e = rel(out, ref.OPS["int4_weight_only_mm"](x.double(), packed, s, z, g, True))
                check(f"{backend} W4A16 {dtype} N={N} K={K} g={g} M={M}", e < TOL[dtype], f"rel err {e:.2e}")
                out = qkernels.int8_weight_only_mm(x, q8, s8, backend=backend)
                e = rel(out, ref.OPS["int8_weight_only_mm"](x.double(), q8, s8))
                check(f"{backend} W8A16 {dtype} N={N} K={K} M={M}", e < TOL[dtype], f"rel err {e:.2e}")


def float_casts(backend, dev="cuda"):
    """fp8 / fp4 casts bit-exact vs the reference (tests/test_cuda_float_kernels.py has the full set)."""
    if backend == "cuda":
        ops = torch.ops.qkernels
        get = lambda name: getattr(ops, name)  # noqa: E731
    else:
        from qkernels import triton as qtriton

        get = qtriton.get
    x = torch.randn(64, 512, device=dev) * torch.exp2(torch.randint(-12, 12, (64, 1), device=dev).float())
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), 1e-40
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        for blocks in ((64, 512), (1, 512), (1, 128), (32, 128)):
            for sat in (True, False):
                got = get("quantize_fp8")(x, None, dtype, *blocks, sat)
                want = ref.OPS["quantize_fp8"](x, None, dtype, *blocks, sat)
                check(f"{backend} quantize_fp8 {dtype} {blocks} sat={sat}",
                      torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
    for fmt in ("mxfp4", "nvfp4"):
        for elem in ("e2m1", "e1m2"):
            got = get("quantize_fp4")(x, fmt, elem, None)
            want = ref.OPS["quantize_fp4"](x, fmt, elem, None)
            check(f"{backend} quantize_fp4 {fmt} {elem}", all(torch.equal(a, b) for a, b in zip(got, want)))


def w8a8(dev="cuda"):
    for M, N, K in ((1, 40, 64), (17, 64, 100), (300, 256, 1024)):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        q_w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        w_s = torch.rand(N, device=dev) * 0.01
        out = torch.ops.qkernels.int8_dynamic_mm(x, q_w, w_s)
        cpu = torch.ops.qkernels.int8_dynamic_mm(x.cpu(), q_w.cpu(), w_s.cpu())
        check(f"W8A8 CUDA == CPU M={M} N={N} K={K}", torch.equal(out.cpu(), cpu))


def main():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    sections = [("quant ops (CUDA)", quant_ops), ("GEMMs (CUDA)", lambda: gemms("cuda")),
                ("fp8/fp4 casts (CUDA)", lambda: float_casts("cuda")), ("W8A8 (CUDA)", w8a8)]
    try:
        import triton  # noqa: F401

        sections.append(("GEMMs (Triton)", lambda: gemms("triton")))
        sections.append(("fp8/fp4 casts (Triton)", lambda: float_casts("triton")))
    except ImportError:
        print("triton not installed: Triton GEMMs skipped")
    for name, fn in sections:
        try:
            fn()
        except Exception:  # noqa: BLE001
            FAILS.append(f"{name}: exception")
            traceback.print_exc()
    print(f"gpu_smoke: {PASSES} passed, {len(FAILS)} failed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
