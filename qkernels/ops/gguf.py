"""GGUF (llama.cpp) block formats: public op functions and fake kernels.

``type`` is a ggml type id or name ("Q4_K", ...); block data is uint8 ``[rows, cols / block * type_size]`` laid out
exactly like ggml (and ``gguf.quants.quantize``). Semantics: :mod:`qkernels.reference.gguf`.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..reference.gguf import BLOCK, TYPE_NAMES, TYPES
from ._call import call
from ._validate import FLOAT_DTYPES, check_float_tensor, check_same_device, check_tensor


def type_id(type) -> int:
    """ggml type id from a name ("Q4_K"), a gguf.GGMLQuantizationType or an int; ValueError if unsupported."""
    if isinstance(type, str):
        if type.upper() not in TYPES:
            raise ValueError(f"type must be one of {sorted(TYPES)}, got {type!r}")
        return TYPES[type.upper()]
    try:
        t = int(type)
    except (TypeError, ValueError):
        raise TypeError(f"type must be a ggml type name or id, got {type!r}") from None
    if t not in BLOCK:
        name = getattr(type, "name", str(t))
        raise ValueError(f"type must be one of {sorted(TYPES)} (ggml ids {sorted(BLOCK)}), got {name} ({t})")
    return t


def block_info(type) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    return BLOCK[type_id(type)]


def _check_cols(cols: int, t: int, what: str):
    bs = BLOCK[t][0]
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
    if imatrix is not None and t in (2, 3, 6, 7):
        # llama.cpp runs a different (weighted) search for these with an imatrix; we only implement the plain one
        raise NotImplementedError(f"imatrix is supported for the K-quants (Q2_K..Q6_K; Q8_0/MXFP4 ignore it, as in "
                                  f"llama.cpp), not for {TYPE_NAMES[t]}")
    if imatrix is not None:
        check_tensor(imatrix, "imatrix", FLOAT_DTYPES, dim=1)
        if imatrix.shape[0] != cols:
            raise ValueError(f"imatrix must have shape [{cols}] (one weight per column of x), got {tuple(imatrix.shape)}")
        check_same_device("x", x, "imatrix", imatrix)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; GGUF quantization needs finite values")
    x2 = x.reshape(-1, cols)
    out = call("gguf_quantize", (x2, t, imatrix), x.device, backend, type=t, imatrix=imatrix is not None)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def gguf_dequantize(data, type, shape, dtype=torch.float32, *, backend=None):
    """Decode ggml blocks ``data`` (uint8, ``[..., bytes per row]`` or flat) of a tensor of logical ``shape``
    ``[..., cols]`` to ``dtype`` (bit-identical to ggml's dequantize_row_* in float32)."""
    check_tensor(data, "data", (torch.uint8,))
    t = type_id(type)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least 1 dim [..., cols], got ()")
    cols = shape[-1]
    _check_cols(cols, t, "the last dim of shape")
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
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K] with K={K}, got {tuple(x.shape)}")
    _check_cols(K, t, "K")
    bs, ts = BLOCK[t]
    check_tensor(data, "data", (torch.uint8,), dim=2)
    if tuple(data.shape) != (N, K // bs * ts):
        raise ValueError(f"data must have shape [N, K/{bs}*{ts}] = {(N, K // bs * ts)}, got {tuple(data.shape)}")
    check_same_device("x", x, "data", data)
    x2 = x.reshape(-1, K)
    out = call("gguf_mm", (x2, data, t, N, K), x.device, backend, type=t, M=x2.shape[0])
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
