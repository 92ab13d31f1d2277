"""Per-call overhead on tiny layers: ``F.linear`` vs the public qkernels op vs ``QuantLinear`` (module call).

    python -m benchmarks.bench_overhead [--n 64] [--k 64] [--m 1] [--dtype bfloat16] [--threads 1] [--calls 50]

On a 64 x 64 layer at M = 1 the GEMM itself takes well under a microsecond, so the times are the Python and
dispatcher cost of one call: what a decode step pays per linear layer on top of the kernel (issue 18: the eager
quantized model was no faster than bf16 because of it). For each scheme the same run times:

* ``F.linear``: ``F.linear(x, w)`` with the float weight in x's dtype (the baseline, once per run),
* ``nn.Linear``: the float module call (shows what ``nn.Module.__call__`` itself costs),
* ``op``: the public function the layer's forward runs, on the layer's own buffers (for the dynamic schemes the
  GEMM on pre-quantized activations: the activation quantization is a second op the layer has to call),
* ``forward``: ``layer.forward(x)`` (the issue's measure), and ``QuantLinear``: ``layer(x)``, the module call as a
  model makes it (compared with the ``nn.Linear`` module call: ``nn.Module.__call__`` costs both the same).

* ``kernel``: the ``torch.ops.qkernels`` op called directly on the layer's buffers (the dispatcher and the C++
  entry, no Python around it): the floor the Python side can reach. The integer ops take no bias: the layer adds
  it as a second op.

Each sample times ``--calls`` back-to-back calls; the methods are sampled round-robin in shuffled order and each
time is the **minimum** over the samples (``--stat median`` for the median): a per-call cost is fixed, and on a
shared machine preemption only ever adds to a sample, so the minimum estimates it best (as ``timeit`` advises).
Ratios are to ``F.linear`` within the same run. Goals (issue 18): ``QuantLinear.forward`` <= 1.5x and the public op <=
2x of ``F.linear``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import qkernels
from qkernels.nn import (Fp4, Fp8Dynamic, Fp8WeightOnly, GGUFLinear, Int4WeightOnly, Int8Dynamic, Int8WeightOnly,
                         IntWeightInt8Act, QuantLinear)

from .harness import machine_info, print_table


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
        "GGUFLinear Q4_0": "Q4_0",  # ggml types: a GGUFLinear
        "GGUFLinear Q8_0": "Q8_0",
    }


def make_layer(lin: torch.nn.Linear, scheme):
    return GGUFLinear.from_float(lin, scheme) if isinstance(scheme, str) else QuantLinear.from_linear(lin, scheme)


def op_name(layer) -> str:
    return "gguf_mm" if isinstance(layer, GGUFLinear) else layer.op


def public_op(layer: QuantLinear, x: torch.Tensor):
    """A zero-argument call of the public op the layer's forward runs, on the layer's buffers."""
    if isinstance(layer, GGUFLinear):
        data, t, N, K = layer.data, layer.type, layer.out_features, layer.in_features
        return lambda: qkernels.gguf_mm(x, data, t, N, K)
    s, op = layer.scheme, layer.op
    # buffers read once: a module attribute look-up in the timed call would count nn.Module.__getattr__
    w, sc, zp, bias, gs = layer.qweight, layer.scale, layer.zero_point, layer.bias, layer.global_scale
    g = layer.group_size
    if op == "int4_weight_only_mm":
        return lambda: qkernels.int4_weight_only_mm(x, w, sc, zp, g)
    if op == "int8_weight_only_mm":
        return lambda: qkernels.int8_weight_only_mm(x, w, sc)
    if op == "dequantize_affine":
        return lambda: qkernels.dequantize_affine(w, sc, zp, g, out_dtype=x.dtype)
    if op == "int8_dynamic_mm":
        return lambda: qkernels.int8_dynamic_mm(x, w, sc)
    w8 = w.view(torch.float8_e4m3fn)
    if op == "fp8_weight_only_mm":
        return lambda: qkernels.fp8_weight_only_mm(x, w8, sc, bias)
    if op == "fp8_mm":
        aq, asc = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row")
        return lambda: qkernels.fp8_mm(aq, asc, w8, sc, x.dtype, bias)
    if op == "fp4_weight_only_mm":
        return lambda: qkernels.fp4_weight_only_mm(x, w, sc, bias, format=s.format, w_global_scale=gs)
    ap, asc, ag = qkernels.quantize_fp4(x, s.format)
    return lambda: qkernels.fp4_mm(ap, asc, w, sc, x.dtype, bias, format=s.format, a_global_scale=ag,
                                   b_global_scale=gs)


def raw_kernel(layer: QuantLinear, x: torch.Tensor):
    """The torch.ops op the layer's forward runs, called directly on the layer's buffers with what the public
    function hands it (for the dynamic schemes: the GEMM on pre-quantized activations); None for the grouped int8
    layout (dequantize_affine + F.linear: no one GEMM op)."""
    if isinstance(layer, GGUFLinear):
        fn, data, t, N, K = torch.ops.qkernels.gguf_mm.default, layer.data, layer.type, layer.out_features, \
            layer.in_features
        return lambda: fn(x, data, t, N, K)
    op, g, s = layer.op, layer.group_size, layer.scheme
    w, sc, zp, bias = layer.qweight, layer.scale, layer.zero_point, layer.bias
    if op == "dequantize_affine":
        return None
    fn = getattr(torch.ops.qkernels, op).default
    if op == "int4_weight_only_mm":
        return lambda: fn(x, w, sc, zp, g, True)
    if op in ("int8_weight_only_mm", "int8_dynamic_mm"):
        return lambda: fn(x, w, sc)
    e4m3 = torch.float8_e4m3fn
    if op == "fp8_weight_only_mm":
        return lambda: fn(x, w, sc, e4m3, bias)
    if op == "fp8_mm":
        aq, asc = torch.ops.qkernels.quantize_fp8(x, None, e4m3, 1, x.shape[1], True)
        return lambda: fn(aq, asc, e4m3, w, sc, e4m3, bias, x.dtype)
    gs = layer.global_scale if layer.global_scale is not None else torch.ones(())
    if op == "fp4_weight_only_mm":
        return lambda: fn(x, w, sc, gs, s.format, "e2m1", bias)
    ap, asc, ag = torch.ops.qkernels.quantize_fp4(x, s.format, "e2m1", None)
    return lambda: fn(ap, asc, ag, w, sc, gs, s.format, "e2m1", bias, x.dtype)


def time_calls(fns: dict, calls: int, min_time_s: float, stat: str) -> dict:
    """Seconds per call of each zero-argument ``fns[name]``: samples of ``calls`` calls, round-robin in a shuffled
    order (fixed seed), at least 20 rounds and ``min_time_s`` seconds; min or median over the samples, or with
    stat="quartiles" the (q1, median, q3) of them."""
    for fn in fns.values():
        for _ in range(calls):
            fn()
    samples = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    start, rounds = time.perf_counter(), 0
    while rounds < 20 or (time.perf_counter() - start < min_time_s and rounds < 2000):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[k].append((time.perf_counter() - t0) / calls)
        rounds += 1
    if stat == "quartiles":  # (q1, median, q3)
        return {k: tuple(statistics.quantiles(v, n=4)) for k, v in samples.items()}
    pick = min if stat == "min" else statistics.median
    return {k: pick(v) for k, v in samples.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=50, help="back-to-back calls per timed sample")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per scheme (at least)")
    p.add_argument("--stat", default="min", choices=("min", "median"))
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
    layers = {name: make_layer(lin, scheme) for name, scheme in schemes(a.k).items()}  # as a model would
    with torch.inference_mode():
        for name, layer in layers.items():
            fns = {"F.linear": lambda: F.linear(x, w, b), "nn.Linear": lambda: lin_d(x),
                   "op": public_op(layer, x), "forward": lambda: layer.forward(x), "QuantLinear": lambda: layer(x)}
            raw = raw_kernel(layer, x)
            if raw is not None:
                fns["kernel"] = raw
            t = time_calls(fns, a.calls, a.min_time, a.stat)
            base = t["F.linear"]
            us = lambda k: f"{t[k] * 1e6:.1f}" if k in t else "-"  # noqa: E731
            rows.append({"scheme": name, "op": op_name(layer), "F.linear us": us("F.linear"), "nn.Linear us": us("nn.Linear"),
                         "kernel us": us("kernel"), "op us": us("op"), "forward us": us("forward"),
                         "QuantLinear us": us("QuantLinear"),
                         "kernel / F.linear": f"{t['kernel'] / base:.2f}" if "kernel" in t else "-",
                         "op / F.linear": f"{t['op'] / base:.2f}", "forward / F.linear": f"{t['forward'] / base:.2f}",
                         "QuantLinear / nn.Linear": f"{t['QuantLinear'] / t['nn.Linear']:.2f}"})
    print(f"# {a.stat} per call over samples of {a.calls} calls")
    print_table(rows, ["scheme", "op", "F.linear us", "nn.Linear us", "kernel us", "op us", "forward us",
                       "QuantLinear us", "kernel / F.linear", "op / F.linear", "forward / F.linear",
                       "QuantLinear / nn.Linear"])


if __name__ == "__main__":
    main()
