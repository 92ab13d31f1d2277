"""GGUF (llama.cpp) block formats: public op functions and fake kernels.

``type`` is a ggml type id or name ("Q4_K", ...); block data is uint8 ``[rows, cols / block * type_size]`` laid out
exactly like ggml (and ``gguf.quants.quantize``). Semantics: :mod:`qkernels.reference.gguf`.
"""

from __future__ import annotations

import operator

import torch

from .. import _ext
from . import autograd
from ..reference.gguf import BLOCK, FP16_FIELDS, FP16_MAX, GGML_TYPES, MAX_ABS, TYPE_NAMES, TYPES, describe_types
from ._call import call
from ._validate import (
    FLOAT_DTYPES,
    check_dtype,
    check_float_tensor,
    check_int,
    check_same_device,
    check_shape_arg,
    check_tensor,
    has_values,
)

# per-type bounds and header fields: the one table in qkernels.reference.gguf (GGML_TYPES)
IMATRIX_SUB_BLOCK = {t.id: t.imatrix_sub_block for t in GGML_TYPES if t.imatrix == "weights"}
_NO_IMATRIX = tuple(t.id for t in GGML_TYPES if t.imatrix == "unimplemented")


def type_id(type) -> int:
    """ggml type id from a name ("Q4_K"), a gguf.GGMLQuantizationType or an int; ValueError if unsupported."""
    if isinstance(type, str):
        if type.upper() not in TYPES:
            raise ValueError(f"type must be one of the ggml types {describe_types()} (a name or an id), got {type!r}")
        return TYPES[type.upper()]
    if isinstance(type, bool):
        raise TypeError(f"type must be a ggml type name or int id, got {type!r}")
    try:
        t = operator.index(type)  # ints and IntEnums (gguf.GGMLQuantizationType), not 2.5 or "2"-like objects
    except TypeError:
        raise TypeError(f"type must be a ggml type name (str) or id (int), got {type.__class__.__name__} "
                        f"{type!r}") from None
    if t not in BLOCK:
        name = getattr(type, "name", str(t))
        raise ValueError(f"type must be one of the ggml types {describe_types()} (a name or an id), got {name} "
                         f"({t})")
    return t


def block_info(type) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    return BLOCK[type_id(type)]


def _check_cols(cols: int, t: int, what: str, allow_zero: bool = False):
    bs = BLOCK[t][0]
    if cols == 0 and not allow_zero:
        raise ValueError(f"{what} must be positive (a multiple of the {TYPE_NAMES[t]} block size {bs}), got 0")
    if cols % bs:
        raise ValueError(f"{what} ({cols}) must be a multiple of the {TYPE_NAMES[t]} block size {bs}")


def gguf_quantize(x, type, imatrix=None, *, backend=None):
    """Encode float ``x [..., cols]`` to ggml blocks ``uint8 [..., cols / block * type_size]`` with llama.cpp's
    reference quantizer (K-quants: its scale search, with importance weights ``imatrix [cols]`` if given)."""
    check_float_tensor(x, "x")
    t = type_id(type)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim [..., cols], got a 0-d tensor")
    cols = x.shape[-1]
    _check_cols(cols, t, "the last dim of x")
    if imatrix is not None and t in _NO_IMATRIX:
        # llama.cpp runs a different (weighted) search for these with an imatrix; we only implement the plain one
        raise NotImplementedError(f"imatrix is supported for {[TYPE_NAMES[i] for i in IMATRIX_SUB_BLOCK]} (the "
                                  f"other types ignore it, as in llama.cpp), not for {TYPE_NAMES[t]}")
    if imatrix is not None:
        _check_imatrix(imatrix, t, cols, x)
    if x.numel() and has_values(x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf; GGUF quantization needs finite values")
        amax = float(x.abs().max())
        if t in MAX_ABS and amax > MAX_ABS[t]:
            raise ValueError(f"x's largest magnitude {amax:.4g} exceeds {MAX_ABS[t]:.6g}, the largest {TYPE_NAMES[t]} "
                             f"can encode: its block scales are fp16 (largest finite value {FP16_MAX:g}), which "
                             f"llama.cpp would store as inf; scale x down or use a wider type (BF16, F32)")
    x2 = x.reshape(-1, cols)
    with torch.no_grad():  # block codes: no gradient
        out = call("gguf_quantize", (x2, t, imatrix), x.device, backend, type=t, imatrix=imatrix is not None)
    if t in FP16_FIELDS and out.numel() and has_values(out):
        _check_fp16_fields(out, t, x)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _check_imatrix(imatrix, t: int, cols: int, x):
    """llama.cpp's importance weights (mean squared activations per input column): finite, >= 0, and some weight in
    every sub-block the K-quant searches fit; an all-zero sub-block makes the weighted search return all-zero codes
    (and NaN/negative weights make the C++ and reference searches part ways), so these are refused."""
    check_tensor(imatrix, "imatrix", FLOAT_DTYPES, dim=1)
    if imatrix.shape[0] != cols:
        raise ValueError(f"imatrix must have shape [{cols}] (one weight per column of x), got {tuple(imatrix.shape)}")
    check_same_device("x", x, "imatrix", imatrix)
    if not has_values(imatrix) or t not in IMATRIX_SUB_BLOCK:
        return
    im = imatrix.float()
    if not bool(torch.isfinite(im).all()):
        raise ValueError("imatrix contains NaN or inf; importance weights must be finite and >= 0")
    if bool((im < 0).any()):
        raise ValueError(f"imatrix must be >= 0 (importance weights are mean squared activations), got a minimum of "
                         f"{float(im.min()):.4g}")
    sub = IMATRIX_SUB_BLOCK[t]
    zero = (im.reshape(-1, sub) > 0).sum(1) == 0
    if bool(zero.any()):
        j = int(zero.nonzero()[0]) * sub
        raise ValueError(f"imatrix[{j}:{j + sub}] is all zero: {TYPE_NAMES[t]} fits its scales per {sub} columns "
                         f"with these weights, and an all-zero sub-block would quantize to zeros; give every "
                         f"{sub}-column sub-block a positive weight (e.g. imatrix.clamp_min(eps))")


def _check_fp16_fields(out, t: int, x):
    """After encoding: every fp16 block field finite (the scale searches can land just above MAX_ABS's estimate)."""
    bs, ts = BLOCK[t]
    blocks = out.reshape(-1, ts)
    for off in FP16_FIELDS[t]:
        v = blocks[:, off:off + 2].contiguous().view(torch.float16)
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"x (largest magnitude {float(x.abs().max()):.4g}) overflows the fp16 block scales of "
                             f"{TYPE_NAMES[t]} (largest finite value {FP16_MAX:g}); scale x down or use a wider "
                             f"type (BF16, F32)")


def gguf_dequantize(data, type, shape, dtype=torch.float32, *, backend=None):
    """Decode ggml blocks ``data`` (uint8, ``[..., bytes per row]`` or flat) of a tensor of logical ``shape``
    ``[..., cols]`` to ``dtype`` (bit-identical to ggml's dequantize_row_* in float32)."""
    check_tensor(data, "data", (torch.uint8,))
    t = type_id(type)
    check_dtype(dtype, "dtype", FLOAT_DTYPES + (torch.float64,))
    shape = check_shape_arg(shape, "shape")
    if len(shape) == 0:
        raise ValueError("shape must have at least 1 dim [..., cols], got ()")
    cols = shape[-1]
    _check_cols(cols, t, "the last dim of shape", allow_zero=True)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    bs, ts = BLOCK[t]
    nbytes = rows * (cols // bs) * ts
    if data.numel() != nbytes:
        raise ValueError(f"data must hold {nbytes} bytes for a {TYPE_NAMES[t]} tensor of shape {shape}, "
                         f"got {data.numel()} (shape {tuple(data.shape)})")
    d2 = data.reshape(rows, (cols // bs) * ts)
    out = call("gguf_dequantize", (d2, t, rows, cols, dtype), data.device, backend, type=t)
    return out.reshape(shape)


def gguf_mm(x, data, type, N, K, *, backend=None):
    """``x [..., K] @ dequant(W)^T`` for a GGUF weight W ``[N, K]`` stored as blocks ``data [N, K/block*type_size]``.
    Returns ``[..., N]`` in x's dtype (fp32 accumulation)."""
    check_float_tensor(x, "x")
    t = type_id(type)
    N, K = check_int(N, "N"), check_int(K, "K")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K] with K={K}, got {tuple(x.shape)}")
    _check_cols(K, t, "K")
    bs, ts = BLOCK[t]
    check_tensor(data, "data", (torch.uint8,), dim=2)
    if tuple(data.shape) != (N, K // bs * ts):
        raise ValueError(f"data must have shape [N, K/{bs}*{ts}] = {(N, K // bs * ts)}, got {tuple(data.shape)}")
    check_same_device("x", x, "data", data)
    x2 = x.reshape(-1, K)
    args = (x2, data, t, N, K)
    out = autograd.run("gguf_mm", args, lambda: call("gguf_mm", args, x.device, backend, type=t, M=x2.shape[0]))
    return out.reshape(*x.shape[:-1], N)


if _ext.HAS_C:

    @torch.library.register_fake("qkernels::gguf_quantize")
    def _(x, type, imatrix):
        bs, ts = BLOCK[type]
        return x.new_empty((x.shape[0], x.shape[1] // bs * ts), dtype=torch.uint8)

    @torch.library.register_fake("qkernels::gguf_dequantize")
    def _(data, type, rows, cols, out_dtype):
        return data.new_empty((rows, cols), dtype=out_dtype)

    @torch.library.register_fake("qkernels::gguf_mm")
    def _(x, data, type, N, K):
        return x.new_empty((x.shape[0], N))
