"""Per-call overhead on tiny layers: ``F.linear`` vs the public qkernels op vs ``QuantLinear`` (module call).

    python -m benchmarks.bench_overhead [--n 64] [--k 64] [--m 1] [--dtype bfloat16] [--threads 1] [--calls 50]

On a 64 x 64 layer at M = 1 the GEMM itself takes well under a microsecond, so the times are the Python and
dispatcher cost of one call: what a decode step pays per linear layer on top of the kernel (issue 18: the eager
quantized model was no faster than bf16 because of it). For each scheme the same run times, round-robin
(benchmarks.harness.time_cpu_interleaved, ``--calls`` back-to-back calls per sample, median over the rounds):

* ``F.linear``: ``F.linear(x, w)`` with the float weight in x's dtype (the baseline, once per run),
* ``nn.Linear``: the float module call (shows what ``nn.Module.__call__`` itself costs),
* ``op``: the public function the layer's forward runs, on the layer's own buffers (for the dynamic schemes the
  GEMM on pre-quantized activations: the activation quantization is a second op the layer has to call),
* ``QuantLinear``: ``layer(x)``, the module call as a model makes it.

Ratios are to ``F.linear`` within the same run (the machine is shared: absolute times drift, ratios much less).
Goals (issue 18): ``QuantLinear`` <= 1.5x and the public op <= 2x of ``F.linear``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qkernels
from qkernels.nn import (Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8WeightOnly,
                         IntWeightInt8Act, QuantLinear)

from .harness import machine_info, print_table, time_cpu_interleaved


def schemes(k: int):
    g = min(32, k)
    return {
        f"int4 g{g}": Int4WeightOnly(group_size=g),
        f"int4 g{g} sym": Int4WeightOnly(group_size=g, symmetric=True),
        "int8 per-channel": Int8WeightOnly(),
        f"int8 g{g} asym": Int8WeightOnly(group_size=g, symmetric=False),
        "int8 dynamic (W8A8)": Int8Dynamic(),
        f"W4A8 g{g} (QAT)": IntWeightInt8Act(bits=4, group_size=g),
        "fp8 weight-only": Fp8WeightOnly(),
        "fp8 dynamic row": Fp8Dynamic("row"),
        "mxfp4 weight-only": Fp4("mxfp4", weight_only=True),
        "nvfp4 weight-only": Fp4("nvfp4", weight_only=True),
        "nvfp4 (W4A4)": Fp4("nvfp4"),
    }


def public_op(layer: QuantLinear, x: torch.Tensor):
    """A zero-argument call of the public op the layer's forward runs, on the layer's buffers."""
    s, op = layer.scheme, layer.op
    w, sc, zp = layer.qweight, layer.scale, layer.zero_point
    if op == "int4_weight_only_mm":
        return lambda: qkernels.int4_weight_only_mm(x, w, sc, zp, layer.group_size)
    if op == "int8_weight_only_mm":
        return lambda: qkernels.int8_weight_only_mm(x, w, sc)
    if op == "dequantize_affine":
        return lambda: qkernels.dequantize_affine(w, sc, zp, layer.group_size, out_dtype=x.dtype)
    if op == "int8_dynamic_mm":
        return lambda: qkernels.int8_dynamic_mm(x, w, sc)
    w8 = w.view(torch.float8_e4m3fn)
    if op == "fp8_weight_only_mm":
        return lambda: qkernels.fp8_weight_only_mm(x, w8, sc, layer.bias)
    if op == "fp8_mm":
        aq, asc = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row")
        return lambda: qkernels.fp8_mm(aq, asc, w8, sc, x.dtype, layer.bias)
    if op == "fp4_weight_only_mm":
        return lambda: qkernels.fp4_weight_only_mm(x, w, sc, layer.bias, format=s.format,
                                                   w_global_scale=layer.global_scale)
    ap, asc, ag = qkernels.quantize_fp4(x, s.format)
    return lambda: qkernels.fp4_mm(ap, asc, w, sc, x.dtype, layer.bias, format=s.format, a_global_scale=ag,
                                   b_global_scale=layer.global_scale)


def _repeat(fn, calls: int):
    def run(_i):
        for _ in range(calls):
            fn()
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=50, help="back-to-back calls per timed sample")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per scheme (at least)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    lin = torch.nn.Linear(a.k, a.n, bias=True)
    lin_d = torch.nn.Linear(a.k, a.n, bias=True).to(dtype)
    x = torch.randn(a.m, a.k).to(dtype)
    w = lin_d.weight.detach()
    b = lin_d.bias.detach()
    info = machine_info()
    print(f"# per-call overhead, Linear({a.k}, {a.n}), M={a.m}, {a.dtype}, {a.threads} thread(s); "
          f"{info.get('cpu', '')}, torch {torch.__version__}")
    rows = []
    with torch.inference_mode():
        for name, scheme in schemes(a.k).items():
            layer = QuantLinear.from_linear(lin, scheme)
            fns = {
                "F.linear": _repeat(lambda: F.linear(x, w, b), a.calls),
                "nn.Linear": _repeat(lambda: lin_d(x), a.calls),
                "op": _repeat(public_op(layer, x), a.calls),
                "QuantLinear": _repeat(lambda: layer(x), a.calls),
            }
            t = {k: v / a.calls for k, v in time_cpu_interleaved(fns, min_time_s=a.min_time).items()}
            base = t["F.linear"]
            rows.append({"scheme": name, "op": layer.op, "F.linear us": f"{base * 1e6:.1f}",
                         "nn.Linear us": f"{t['nn.Linear'] * 1e6:.1f}", "op us": f"{t['op'] * 1e6:.1f}",
                         "QuantLinear us": f"{t['QuantLinear'] * 1e6:.1f}", "op / F.linear": f"{t['op'] / base:.2f}",
                         "QuantLinear / F.linear": f"{t['QuantLinear'] / base:.2f}"})
    print_table(rows, ["scheme", "op", "F.linear us", "nn.Linear us", "op us", "QuantLinear us", "op / F.linear",
                       "QuantLinear / F.linear"])


if __name__ == "__main__":
    main()
