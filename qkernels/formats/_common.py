"""Helpers shared by the checkpoint converters: bit unpacking, tensor checks, layer collection."""

from __future__ import annotations

import torch

from ..nn.linear import QuantLinear
from ..nn.schemes import Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8WeightOnly


class CheckpointError(ValueError):
    """A checkpoint cannot be converted: the message names the layer/tensor, what was expected and what came."""


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` unsigned ``bits``-bit values from each row of int32 words ``packed [R, W]``.

    Returns int32 ``[R, count]``.

    The words form one little-endian bit stream per row: value j occupies stream bits ``[bits*j, bits*(j+1))``, i.e.
    word ``bits*j // 32`` from bit ``bits*j % 32``, continuing into the low bits of the next word when it crosses a
    word boundary (3-bit values do, every 32 values fill exactly 3 words). This is the layout of AutoGPTQ's
    ``QuantLinear.pack`` (2/3/4/8 bits; github.com/AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py)
    and of compressed-tensors' ``pack_to_int32`` (before its 2^(b-1) offset is removed).
    """
    R, W = packed.shape
    need = (count * bits + 31) // 32
    if W < need:
        raise CheckpointError(f"packed rows hold {W} int32 words, {need} are needed for {count} {bits}-bit values")
    p = packed.to(torch.int64) & 0xFFFFFFFF  # reinterpret int32 as the unsigned word
    start = torch.arange(count, dtype=torch.int64, device=packed.device) * bits
    word, off = start // 32, start % 32
    mask = (1 << bits) - 1
    v = p[:, word] >> off
    crosses = off + bits > 32
    if bool(crosses.any()):
        nxt = torch.clamp(word + 1, max=W - 1)
        hi = p[:, nxt] << (32 - off)
        v = torch.where(crosses, v | hi, v)
    return (v & mask).to(torch.int32)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_bits`: unsigned values int ``[R, C]`` -> int32 ``[R, ceil(C*bits/32)]``."""
    R, C = values.shape
    W = (C * bits + 31) // 32
    out = torch.zeros(R, W + 1, dtype=torch.int64, device=values.device)
    v = values.to(torch.int64) & ((1 << bits) - 1)
    start = torch.arange(C, dtype=torch.int64, device=values.device) * bits
    word, off = start // 32, start % 32
    out.index_add_(1, word, v << off)  # no carries: the fields are disjoint
    spill = v >> (32 - off)
    out.index_add_(1, word + 1, torch.where(off + bits > 32, spill, torch.zeros_like(spill)))
    out = (out[:, :W] & 0xFFFFFFFF)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def need(tensors: dict, key: str, dtypes: tuple, dim: int) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{key} is missing from the checkpoint")
    t = tensors[key]
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise CheckpointError(f"{key} must have dtype {names}, got {t.dtype}")
    if t.dim() != dim:
        raise CheckpointError(f"{key} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def check_shape(key: str, t: torch.Tensor, shape: tuple):
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{key} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_finite(key: str, t: torch.Tensor):
    if not bool(torch.isfinite(t.float()).all()):
        raise CheckpointError(f"{key} contains NaN or inf")


def check_positive(key: str, t: torch.Tensor):
    """Finite and > 0: every quantizer whose checkpoints we read clamps its scales away from zero (AutoGPTQ, AutoAWQ,
    compressed-tensors, qkernels' own RTN/GPTQ/AWQ/QAT), so a zero, negative, NaN or inf scale is corruption."""
    check_finite(key, t)
    bad = ~(t.float() > 0)
    if bool(bad.any()):
        raise CheckpointError(f"{key} must be positive, got {int(bad.sum())} values <= 0 "
                              f"(e.g. {float(t.float()[bad][0])})")


def check_nonzero(key: str, t: torch.Tensor):
    """Finite and != 0: symmetric integer scales may be negative (the full-range grid, llama.cpp's Q4_0 rule
    ``d = max / -8``, puts the extreme on the -2^(b-1) level; qkernels.algorithms QuantConfig(full_range=True))."""
    check_finite(key, t)
    bad = t.float() == 0
    if bool(bad.any()):
        raise CheckpointError(f"{key} must be nonzero, got {int(bad.sum())} zero values")


def check_range(key: str, t: torch.Tensor, lo: int, hi: int, what: str):
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise CheckpointError(f"{key}: {what} must be in [{lo}, {hi}], got [{int(t.min())}, {int(t.max())}]")


def zero_point_range(bits: int) -> tuple[int, int]:
    """Zero points of b-bit signed codes lie in ``[-2^(b-1), 2^(b-1)]``: one more than the code range at the top,
    because GPTQ v1 stores ``zero - 1`` in b bits, so its zero 2^b (shifted: 2^(b-1)) is representable."""
    return -(1 << (bits - 1)), 1 << (bits - 1)


# fp8 e4m3fn codes that are NaN (e4m3fn has no inf); e8m0 0xFF is NaN (OCP MX v1.0)
_E4M3_NAN = (0x7F, 0xFF)


def check_quant_linear(name: str, layer, full: bool = True):
    """Check the decoded content of a converted :class:`qkernels.nn.QuantLinear` (any format ends here), from its
    state-dict buffers (``qweight``, ``scale``, ``zero_point``, ``global_scale``, ``bias``):

    * always (cheap, O(scales)): fp8 and asymmetric integer scales finite and positive, symmetric integer scales
      finite and nonzero (negative with the full-range grid); zero points in
      :func:`zero_point_range`; fp4 block scales not NaN and not negative (zero is a legitimate all-zero block);
      nvfp4 global scale finite and positive; bias finite.
    * ``full`` (one pass over the codes): integer codes in the scheme's ``bits`` range where the storage can hold more
      (2/3-bit codes in nibbles, 5..7-bit codes in int8), fp8 weight codes not NaN.
    """
    scheme = layer.scheme
    scale = layer.scale
    if isinstance(scheme, Fp4):
        codes = scale.view(torch.uint8)
        if scheme.format == "nvfp4":
            bad = (codes & 0x7F) == 0x7F
            neg = ((codes & 0x80) != 0) & ((codes & 0x7F) != 0)
        else:
            bad, neg = codes == 0xFF, torch.zeros_like(codes, dtype=torch.bool)
        if bool(bad.any()):
            raise CheckpointError(f"{name}.scale: {int(bad.sum())} {scheme.format} block scales are NaN")
        if bool(neg.any()):
            raise CheckpointError(f"{name}.scale: {int(neg.sum())} {scheme.format} block scales are negative")
        if layer.global_scale is not None:
            check_positive(f"{name}.global_scale", layer.global_scale)
    elif layer.zero_point is None and layer.scheme.layout != "fp8":
        check_nonzero(f"{name}.scale", scale)  # symmetric integer: the sign may carry the extreme's (full range)
    else:
        check_positive(f"{name}.scale", scale)
    if layer.zero_point is not None:
        check_range(f"{name}.zero_point", layer.zero_point, *zero_point_range(getattr(scheme, "bits", 8)),
                    f"zero points of {getattr(scheme, 'bits', 8)}-bit codes")
    if layer.bias is not None:
        check_finite(f"{name}.bias", layer.bias)
    if not full:
        return
    if isinstance(scheme, (Fp8WeightOnly, Fp8Dynamic)):
        q = layer.qweight.view(torch.uint8)
        bad = (q & 0x7F) == 0x7F
        if bool(bad.any()):
            raise CheckpointError(f"{name}.qweight: {int(bad.sum())} fp8 e4m3fn codes are NaN")
    elif not isinstance(scheme, Fp4):
        bits = getattr(scheme, "bits", 8)
        storage = 4 if layer.qweight.dtype == torch.uint8 else 8  # packed nibbles or int8 codes
        if bits < storage:
            check_range(f"{name}.qweight", layer.codes(), -(1 << (bits - 1)), (1 << (bits - 1)) - 1,
                        f"codes of {type(scheme).__name__}(bits={bits})")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def prefixes(tensors: dict, suffix: str) -> list[str]:
    """Layer names that own a ``<name>.<suffix>`` tensor."""
    s = "." + suffix
    return sorted(k[: -len(s)] for k in tensors if k.endswith(s))


def group_perm(g_idx: torch.Tensor, K: int, G: int, key: str, group_size: int | None = None
               ) -> tuple[torch.Tensor | None, int]:
    """From a per-input-feature group index (GPTQ ``g_idx``) to (permutation or None, group size).

    With act-order (``desc_act``) the groups are interleaved over the input features; sorting the features by group
    (stably) makes each group contiguous, as the packed int4 kernels need: stored column j is input feature
    ``perm[j]`` and group ``j // group_size``. Every group must then hold exactly ``group_size`` features but the
    last, which holds the remaining ``K - (G-1) * group_size`` (GPTQ fills groups in its quantization order, so they
    do). ``group_size`` None: K/G (equal groups).
    """
    if tuple(g_idx.shape) != (K,):
        raise CheckpointError(f"{key} must have shape ({K},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.to(torch.int64)
    if group_size is None or G == 1:
        if K % G:
            raise CheckpointError(f"{key}: {K} input features cannot form {G} equal groups")
        gs = K // G
    else:
        gs = group_size
        if G != -(-K // gs):
            raise CheckpointError(f"{key}: {K} input features form {-(-K // gs)} groups of {gs}, not {G}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise CheckpointError(f"{key} values must be in [0, {G}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    natural = torch.arange(K, device=g_idx.device) // gs
    if torch.equal(g_idx, natural):
        return None, gs
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], natural):
        raise CheckpointError(f"{key}: groups do not all hold {gs} input features (the last one the rest); cannot make "
                              "them contiguous")
    return perm, gs


def to_quant_linear(key: str, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                    perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, group_size: int | None = None):
    """Signed integer codes -> the QuantLinear that holds them exactly.

    Args:
        q: integer ``[N, K]`` signed codes, columns in stored (group-contiguous) order; 2..4-bit codes must lie in
            [-8, 7] (they become int4), 5..8-bit codes in [-128, 127] (int8).
        scale: float ``[N, G]``; zero_point: integer ``[N, G]`` in the codes' domain, or None.
        group_size: the columns per group when K is not a multiple of it (``G = ceil(K / group_size)``, ragged last
            group); None: K/G.
    2- and 3-bit codes are a subset of int4, so they are held as ``Int4WeightOnly(bits=2/3)`` without any loss; 8-bit
    codes with groups or zero points are kept as int8 codes (``Int8WeightOnly(group_size, symmetric)``).
    """
    N, K = q.shape
    G = scale.shape[1]
    check_positive(f"{key} scales", scale)
    if zero_point is not None:
        check_range(f"{key} zero points", zero_point, *zero_point_range(bits), f"zero points of {bits}-bit codes")
    if bias is not None:
        check_finite(f"{key} bias", bias)
    if zero_point is not None and not bool(zero_point.any()):
        zero_point = None  # all-zero zero points (symmetric checkpoints): the faster symmetric kernel path
    group = -1 if G == 1 else (group_size or K // G)
    if bits <= 4:
        scheme = Int4WeightOnly(group_size=group, symmetric=zero_point is None, bits=max(bits, 2))
    elif G == 1 and zero_point is None:
        scheme, scale = Int8WeightOnly(), scale[:, 0]
    else:
        scheme = Int8WeightOnly(group_size=group, symmetric=zero_point is None)
    why = scheme.check_shape(K, N)
    if why:
        raise CheckpointError(f"{key}: a {bits}-bit layer [{N}, {K}] cannot be held as {scheme!r}: {why}")
    lo, hi = int(q.min()), int(q.max())
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if 2 <= bits <= 4 else (-128, 127)
    if lo < qmin or hi > qmax:
        raise CheckpointError(f"{key}: codes out of range for {bits} bits: [{lo}, {hi}]")
    return QuantLinear.from_codes(q.to(torch.int8), scale.float(), None if zero_point is None else
                                  zero_point.to(torch.int32), scheme, bias, perm)
