"""Autograd for the GEMM ops: gradients with respect to the float activations (and the bias), never the weight.

Every GEMM here computes ``y = x @ W^T (+ bias)`` with a quantized weight ``W = dequant(codes, scales)``, so

    grad_x = grad_y @ W          grad_bias = grad_y summed over the rows

with ``W`` decoded by the same dequantization ops the forward's fallback paths use (``unpack_int4`` +
``dequantize_affine``, ``dequantize_fp8``, ``dequantize_fp4``, ``gguf_dequantize``) and the product accumulated in
fp32 (the forward's accumulation), rounded once to x's dtype. ``int8_dynamic_mm`` also quantizes x per token (and
``int8_dynamic_int4_mm`` per token and weight group): its
rounding has zero derivative almost everywhere, so it gets the straight-through estimator (the gradient of
``x @ W^T``), as quantization-aware training does.

Codes are integer tensors and cannot require grad. The scales, zero points and fp4 global scales are float tensors
that could: a gradient for them is not implemented (the ops are inference kernels; QAT trains a float weight), so
asking for one raises instead of silently leaving ``.grad`` None.

Two ways in, one formula:

* ``torch.library.register_autograd`` on the ``torch.ops.qkernels`` ops (the CPU/CUDA kernels, direct op calls and
  ``torch.compile``, which traces the backward through the dequant ops' fake kernels);
* :func:`run` for the public functions, whatever backend the dispatch table picks (Triton and ``torch._scaled_mm``
  are not differentiable themselves): a ``torch.autograd.Function`` around the chosen backend with the same
  backward. Under it the forward runs without grad, so the registered formula never fires twice.
"""

from __future__ import annotations

import torch

from .. import _ext
from .. import reference as _reference

# op -> (positions of the float activation inputs that get a gradient, position of the bias or None,
#        {position: name} of float quantization parameters that must not require grad)
GEMMS = {
    "int4_weight_only_mm": ((0,), None, {2: "scale"}),
    "int8_weight_only_mm": ((0,), None, {2: "scale"}),
    "int8_dynamic_mm": ((0,), None, {2: "w_scale"}),
    "int8_dynamic_int4_mm": ((0,), None, {2: "scale"}),
    "fp8_mm": ((), 6, {1: "a_scale", 4: "b_scale"}),
    "fp8_weight_only_mm": ((0,), 4, {2: "w_scale"}),
    "fp4_mm": ((), 8, {2: "a_global_scale", 5: "b_global_scale"}),
    "fp4_weight_only_mm": ((0,), 6, {3: "w_global_scale"}),
    "gguf_mm": ((0,), None, {}),
}


def _blocks(grid: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    G0, G1 = grid.shape
    return (rows // G0 if G0 else 1), (cols // G1 if G1 else 1)


def dequantized_weight(op: str, args: tuple) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` a GEMM op multiplies by, decoded with the qkernels ops (schema argument order)."""
    ops = torch.ops.qkernels if _ext.HAS_C else None
    if ops is None:  # pure-Python install: the reference ops are the only backend
        deq = _reference.OPS
    else:
        deq = {n: getattr(ops, n) for n in ("unpack_int4", "dequantize_affine", "dequantize_fp8", "dequantize_fp4",
                                            "gguf_dequantize")}
    if op in ("int4_weight_only_mm", "int8_dynamic_int4_mm"):
        _, packed, scale, zp, group_size, signed = args
        q = deq["unpack_int4"](packed, signed)
        return deq["dequantize_affine"](q, scale.float(), zp, group_size, False, torch.float32)
    if op in ("int8_weight_only_mm", "int8_dynamic_mm"):
        q_w, scale = args[1], args[2]
        # per output channel: scale[n] * q[n, k], the fp32 product every kernel forms
        return q_w.float() * scale.float().reshape(-1, 1)
    if op == "fp8_weight_only_mm":
        _, w, grid, w_dtype, _ = args
        return deq["dequantize_fp8"](w, grid, w_dtype, *_blocks(grid, *w.shape), torch.float32)
    if op == "fp4_weight_only_mm":
        _, w, w_scale, g, fmt, element, _ = args
        return deq["dequantize_fp4"](w, w_scale, g, fmt, element, torch.float32)
    if op == "gguf_mm":
        _, data, type, N, K = args
        return deq["gguf_dequantize"](data, type, N, K, torch.float32)
    raise KeyError(op)


def check_no_param_grad(op: str, args: tuple):
    """Raise if a float quantization parameter of ``op`` requires grad (its gradient is not implemented)."""
    for pos, name in GEMMS[op][2].items():
        t = args[pos]
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"{op}: {name} requires grad, but qkernels' GEMMs differentiate only with respect to "
                               f"the activations and the bias; the quantized weight's {name} is a constant here "
                               f"(detach it, or train a float weight / LoRA adapter instead)")


def check_param_no_grad(t, name: str, what: str):
    """For the dequantization functions: a scale that requires grad would silently get none."""
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{what}: {name} requires grad, but the gradient with respect to quantization "
                           f"parameters is not implemented (detach it)")


def _grads(op: str, args: tuple, grad_out: torch.Tensor, needs: tuple) -> list:
    """Gradients for every schema argument (None where not needed / not differentiable)."""
    x_pos, bias_pos, _ = GEMMS[op]
    grads = [None] * len(args)
    for p in x_pos:
        if needs[p]:
            x = args[p]
            # [:, :Kx]: an int4 weight stored padded past x's last dim (a ragged last group) gives x no gradient there
            w = dequantized_weight(op, args)[:, :x.shape[-1]]
            grads[p] = torch.matmul(grad_out.float(), w).to(x.dtype)
    if bias_pos is not None and needs[bias_pos]:
        bias = args[bias_pos]
        grads[bias_pos] = grad_out.float().sum(0).to(bias.dtype)
    return grads


# ---- the registered formulas (torch.ops.qkernels.*) -----------------------------------------------------------


def _setup_context(op):
    def setup_context(ctx, inputs, output):
        check_no_param_grad(op, inputs)
        ctx.op_args = tuple(inputs)  # codes and scales are inputs of the graph anyway: no copy
        ctx.needs = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)

    return setup_context


def _backward(op):
    def backward(ctx, grad_out):
        return tuple(_grads(op, ctx.op_args, grad_out, ctx.needs))

    return backward


# Ops whose outputs are codes or the parameters of a rounding: not differentiable. Without an Autograd kernel
# torch's fallback marks their outputs as requiring grad (with a grad_fn that warns, then fails, in backward), so
# an activation scale of a W8A8 layer would look like a trainable parameter; falling through makes them constants.
NON_DIFFERENTIABLE = ("choose_qparams_affine", "quantize_affine", "pack_int4", "unpack_int4", "quantize_per_token_int8",
                      "quantize_fp8", "fp4_encode", "quantize_fp4", "gguf_quantize")



def _define_with_grad(lib, op: str) -> None:
    """The ``with_grad`` overload of a GEMM op: same schema, same kernels (it calls the base op), and the gradient
    formula. The base op's Autograd kernel is the C++ gate of csrc/autograd_gate.cpp: it runs the backend kernel
    directly when nothing requires grad (no Python on that path: under no_grad and in compiled graphs the formula's
    Python kernel used to cost more than a small decode GEMM) and calls this overload otherwise."""
    base = getattr(torch.ops.qkernels, op).default
    schema = str(base._schema)  # "qkernels::op(args) -> ret"
    lib.define(f"{op}.with_grad" + schema[schema.index("("):])

    def kernel(*args):
        return base(*args)  # inside the autograd.Function's forward grad is off: the gate passes straight through

    kernel.__name__ = f"{op}_with_grad"
    lib.impl(f"{op}.with_grad", kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"qkernels::{op}.with_grad", kernel, lib=lib)
    torch.library.register_autograd(f"qkernels::{op}.with_grad", _backward(op), setup_context=_setup_context(op),
                                    lib=lib)


if _ext.HAS_C:
    _DEF = torch.library.Library("qkernels", "FRAGMENT")  # kept alive: the definitions last as long as the library
    for _op in GEMMS:
        _define_with_grad(_DEF, _op)
    _LIB = torch.library.Library("qkernels", "IMPL")  # kept alive: the registrations last as long as the library
    for _op in NON_DIFFERENTIABLE:
        _LIB.impl(_op, torch.library.fallthrough_kernel, "Autograd")


def _differentiable_reference(op: str, fn):
    """The reference GEMMs are plain torch and would differentiate on their own, but through their own quantization
    (int8_dynamic_mm's rounding of x: zero gradient) and into the scales; the reference backend gets the formula
    above instead, like every other backend."""

    def op_with_grad(*args):
        return run(op, args, lambda: fn(*args))

    op_with_grad.__name__ = op_with_grad.__qualname__ = op
    op_with_grad.__doc__ = fn.__doc__
    op_with_grad.__wrapped__ = fn
    return op_with_grad


# ---- the public functions' wrapper, for every backend ---------------------------------------------------------


class _BackendGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, forward, *args):
        ctx.op, ctx.op_args = op, args
        return forward()

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *_grads(ctx.op, ctx.op_args, grad_out, ctx.needs_input_grad[2:]))


def needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


def run(op: str, args: tuple, forward):
    """``forward()`` (the backend call for the schema arguments ``args``) made differentiable with respect to the
    activations and bias. A plain call when nothing requires grad; under torch.compile the registered formula
    applies (the public functions call the op itself there)."""
    if not needs_grad(args) or torch.compiler.is_compiling():
        return forward()
    check_no_param_grad(op, args)
    return _BackendGemm.apply(op, forward, *args)



class _ActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight):
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight() if callable(ctx.weight) else ctx.weight
            grad_x = torch.matmul(grad_y.float(), w.float()).to(ctx.x_dtype)
        return grad_x, grad_y, None


def activation_ste(x: torch.Tensor, y: torch.Tensor, weight) -> torch.Tensor:
    """``y`` (a GEMM of the *quantized* ``x``, e.g. ``fp8_mm(quantize_fp8(x), ...)``) with the straight-through
    gradient ``grad_x = grad_y @ W``: the rounding of x has zero derivative almost everywhere, so W8A8 / W4A4
    layers train like the float linear layer. ``weight``: the dequantized ``[N, K]`` weight or a callable giving it
    (decoded only in backward). ``y``'s own graph (the bias gradient) is kept."""
    if not needs_grad((x,)) or torch.compiler.is_compiling():
        return y
    return _ActivationSTE.apply(x, y, weight)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_rounded):
        return x_rounded.view_as(x_rounded)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, x_rounded: torch.Tensor) -> torch.Tensor:
    """``x_rounded`` (x fake-quantized, e.g. rounded per token to int8 and decoded) with the gradient passed to
    ``x`` unchanged (bit-exact forward, unlike ``x + (x_rounded - x).detach()``)."""
    if not needs_grad((x,)) or torch.compiler.is_compiling():
        return x_rounded
    return _StraightThrough.apply(x, x_rounded)


for _op in GEMMS:
    _reference.OPS[_op] = _differentiable_reference(_op, _reference.OPS[_op])


__all__ = ["GEMMS", "activation_ste", "check_no_param_grad", "check_param_no_grad", "dequantized_weight",
           "needs_grad", "run", "straight_through"]
