"""fp8 casts (per-tensor, per-row, block-wise) and the fp8 scaled GEMM: public functions and fake kernels.

Semantics (rounding, saturation, NaN/inf, scales) are specified in :mod:`qkernels.reference.float8`. The ops carry
fp8 codes as uint8 bit patterns; these functions take and return torch's float8 dtypes (a free ``.view``).
"""

from __future__ import annotations

import torch

from .. import _ext
from . import autograd
from ..reference.float8 import FP8_DTYPES
from ._call import NATIVE, call, cpu_op
from ._validate import FLOAT_DTYPES, check_bias, check_bool, check_float_tensor, check_same_device, check_tensor

GRANULARITIES = ("tensor", "row", "block")
OUT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def check_fp8_dtype(dtype, name: str = "dtype"):
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch float8 dtype, got {type(dtype).__name__} {dtype!r}")
    if dtype not in FP8_DTYPES:
        names = ", ".join(_dtype_name(d) for d in FP8_DTYPES)
        raise ValueError(f"{name} must be one of {names}, got {dtype!r}")


def check_out_dtype(out_dtype):
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype, got {type(out_dtype).__name__} {out_dtype!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of float32/bfloat16/float16/float64, got {out_dtype!r}")


def _block_pair(block_size) -> tuple[int, int]:
    """block_size: int b (1 x b along the last dim) or (block_rows, block_cols)."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (1, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in block_size
    ):
        pair = (int(block_size[0]), int(block_size[1]))
    else:
        raise TypeError(f"block_size must be an int or a (block_rows, block_cols) pair of ints, got {block_size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return pair


def fp8_layout(shape, granularity, block_size, name="x"):
    """-> (R, C, block_rows, block_cols, public scale shape) for a tensor of ``shape`` seen as ``[R, C]``."""
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be one of {GRANULARITIES}, got {type(granularity).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = tuple(shape)
    if granularity == "tensor":
        n = 1
        for s in shape:
            n *= s
        return 1, n, 1, max(n, 1), ()
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least 1 dim for granularity={granularity!r}, got a 0-d tensor")
    C = shape[-1]
    R = 1
    for s in shape[:-1]:
        R *= s
    if granularity == "row":
        return R, C, 1, max(C, 1), (*shape[:-1], 1)
    br, bc = _block_pair(block_size)
    if C % bc:
        raise ValueError(f"block_size {block_size!r}: {bc} must divide the last dim of {name} ({C}); "
                         f"{name} has shape {shape}")
    if br == 1:
        return R, C, 1, bc, (*shape[:-1], C // bc)
    if R % br:
        raise ValueError(f"block_size {block_size!r}: {br} must divide the rows of {name} ({R} = prod of all "
                         f"but the last dim); {name} has shape {shape}")
    return R, C, br, bc, (R // br, C // bc)


def _scale_arg(scale, name, shape, device):
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32/bfloat16/float16, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {scale.device}")
    if tuple(scale.shape) != tuple(shape) and not (len(shape) == 0 and scale.numel() == 1):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(scale.shape)}")
    return scale.float()


def quantize_fp8(x, dtype=torch.float8_e4m3fn, granularity="tensor", block_size=128, saturate=True, *, scale=None,
                 backend=None):
    """Scaled cast to fp8: ``q = fp8(x / scale)``, round to nearest even.

    Args:
        x: float32/bf16/fp16 ``[..., K]``. NaN stays NaN; +-inf saturates (or overflows, see ``saturate``).
        dtype: torch.float8_e4m3fn (default), float8_e5m2, float8_e4m3fnuz or float8_e5m2fnuz.
        granularity: "tensor" (one scale), "row" (one per row of the last dim: per-token for activations
            ``[M, K]``, per-output-channel for weights ``[N, K]``) or "block".
        block_size: for "block": an int b (1 x b blocks along the last dim, e.g. 128 for activations) or a pair
            (block_rows, block_cols) over ``x`` viewed as ``[prod(leading dims), K]`` (e.g. (128, 128) for
            weights). Must divide the dims.
        saturate: clamp to the largest finite value (448 e4m3fn, 57344 e5m2, 240 e4m3fnuz, 57344 e5m2fnuz);
            False keeps IEEE overflow: inf for e5m2, NaN for the formats without inf.
        scale: optional precomputed fp32 scale of the shape returned below (static quantization); by default
            ``scale = amax(finite |x|) / fp8_max`` per block, 1 for an all-zero block.
    Returns:
        ``(q, scale)``: q of x's shape in ``dtype``; scale fp32 of shape ``()`` (tensor), ``[..., 1]`` (row),
        ``[..., K / b]`` (1 x b blocks) or ``[R / br, K / bc]`` (2-D blocks). ``x ~= q.float() * scale`` broadcast
        per block; :func:`dequantize_fp8` inverts it.
    """
    check_float_tensor(x, "x")
    check_fp8_dtype(dtype)
    saturate = check_bool(saturate, "saturate")
    R, C, br, bc, sshape = fp8_layout(x.shape, granularity, block_size)
    if scale is not None:
        scale = _scale_arg(scale, "scale", sshape, x.device).reshape(R // br, C // bc)
    if x.numel() == 0:
        s = torch.ones(sshape, dtype=torch.float32, device=x.device) if scale is None else scale.reshape(sshape)
        return torch.empty(x.shape, dtype=dtype, device=x.device), s
    with torch.no_grad():  # codes and scales of a rounding: no gradient (see qkernels.ops.autograd)
        q, s = call("quantize_fp8", (x.reshape(R, C), scale, dtype, br, bc, saturate), x.device, backend)
    return q.reshape(x.shape).view(dtype), s.reshape(sshape)


def _infer_granularity(q, scale):
    """(granularity, block_size) from the shapes returned by :func:`quantize_fp8`."""
    if scale.numel() == 1:
        return "tensor", None
    K = q.shape[-1] if q.dim() else 1
    if scale.dim() == q.dim() and tuple(scale.shape[:-1]) == tuple(q.shape[:-1]):
        S = scale.shape[-1]
        if S == 1:
            return "row", None
        if S == 0 or K % S:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not tile q of shape {tuple(q.shape)}: its last "
                             f"dim {S} must divide {K}")
        return "block", K // S
    if scale.dim() == 2 and q.dim() >= 1:
        R = q.numel() // max(K, 1)
        G0, G1 = scale.shape
        if G0 == 0 or G1 == 0 or R % G0 or K % G1:
            raise ValueError(f"scale shape {tuple(scale.shape)} does not tile q of shape {tuple(q.shape)} "
                             f"(viewed as [{R}, {K}])")
        return "block", (R // G0, K // G1)
    raise ValueError(f"scale shape {tuple(scale.shape)} matches no granularity for q of shape {tuple(q.shape)}: "
                     "expected () (tensor), q.shape[:-1] + (1,) (row), q.shape[:-1] + (K/b,) or [R/br, K/bc] (block)")


def dequantize_fp8(q, scale, out_dtype=torch.float32, granularity=None, block_size=None, *, backend=None):
    """``float32(q) * scale`` per block, in ``out_dtype``.

    Args:
        q: a float8 tensor (any of the four fp8 dtypes) ``[..., K]``.
        scale: fp32 scale as returned by :func:`quantize_fp8`.
        granularity, block_size: as for :func:`quantize_fp8`; when ``granularity`` is None they are inferred from
            the shapes of q and scale.
    """
    check_tensor(q, "q")
    check_fp8_dtype(q.dtype, "q.dtype")
    check_out_dtype(out_dtype)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"scale must be a torch.Tensor, got {type(scale).__name__}")
    if granularity is None:
        granularity, inferred = _infer_granularity(q, scale)
        block_size = inferred if block_size is None else block_size
    R, C, br, bc, sshape = fp8_layout(q.shape, granularity, block_size if block_size is not None else 128, "q")
    autograd.check_param_no_grad(scale, "scale", "dequantize_fp8")
    s = _scale_arg(scale, "scale", sshape, q.device).reshape(R // br, C // bc)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=out_dtype, device=q.device)
    out = call("dequantize_fp8", (q.view(torch.uint8).reshape(R, C), s, q.dtype, br, bc, out_dtype), q.device,
               backend)
    return out.reshape(q.shape)


def _scale_grid(scale, name, t2, lead_shape, dname, block_size=None):
    """Normalize an fp8_mm scale to the 2-D grid ``[G0, G1]`` that tiles the 2-D operand ``t2 [R, K]``.

    A 2-D grid with fewer rows than the operand (blocks of br > 1 rows) cannot be told apart by its shape from a
    per-row or 1 x b scale that lost rows (``w_scale[:12]`` of a ``[24, 1]`` scale tiles ``[24, K]`` as 2 x K
    blocks). Without ``block_size`` only square blocks (br == bc: 128 x 128 as DeepSeek-V3, torchao and
    QuantLinear use) are taken for such a grid; other block shapes must be named by ``block_size``."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32/bfloat16/float16, got {scale.dtype}")
    R, K = t2.shape
    if scale.numel() == 1:
        g = scale.reshape(1, 1)
    elif scale.dim() == len(lead_shape) + 1 and tuple(scale.shape[:-1]) == tuple(lead_shape):
        g = scale.reshape(R, scale.shape[-1])  # row ([..., 1]) or 1 x b blocks ([..., K / b])
    elif scale.dim() == 1 and scale.shape[0] == R:
        g = scale.reshape(R, 1)
    elif scale.dim() == 2:
        g = scale
    else:
        raise ValueError(f"{name} must be a single value, [{R}] / [{R}, 1] (per row), [{R}, K/b] or [{R}/br, K/bc] "
                         f"(blocks) for {dname} of shape {tuple(lead_shape) + (K,)}, got {tuple(scale.shape)}")
    G0, G1 = g.shape
    # an empty operand (R == 0, e.g. a batch with no tokens) has an empty per-row grid
    if G1 == 0 or K % G1 or (G0 == 0 and R != 0) or (G0 != 0 and R % G0):
        raise ValueError(f"{name} of shape {tuple(scale.shape)} must evenly tile {dname} viewed as [{R}, {K}]: "
                         f"its dims must divide {R} and {K}")
    br, bc = (R // G0 if G0 else 1), K // G1
    if block_size is not None:
        want = _block_pair(block_size)
        if (br, bc) != want and not (g.shape == (1, 1) and scale.numel() == 1 and want == (R, K)):
            rows = R // want[0] if R % want[0] == 0 else "?"
            cols = K // want[1] if K % want[1] == 0 else "?"
            raise ValueError(f"{name} of shape {tuple(scale.shape)} tiles {dname} [{R}, {K}] in {br} x {bc} blocks, "
                             f"but the block size given is {want[0]} x {want[1]}: expected shape [{rows}, {cols}]")
    elif br > 1 and G0 > 1 and br != bc:
        raise ValueError(f"{name} of shape {tuple(scale.shape)} matches no scale layout of {dname} [{R}, {K}]: "
                         f"expected one value, [{R}] / [{R}, 1] per row, [{R}, K/b] for 1 x b blocks or [{R}/b, {K}/b] "
                         f"for b x b blocks; it would tile {dname} in {br} x {bc} blocks: pass "
                         f"{name.split('_')[0]}_block_size=({br}, {bc}) if that is meant")
    return g.float().contiguous()


def _k_and_n(a, aname, w, wname) -> tuple[int, int]:
    """(K, N) of a GEMM of ``a [..., K]`` with a 2-D weight ``w [N, K]``."""
    if a.dim() == 0:
        raise ValueError(f"{aname} must have at least 1 dim [..., K], got a 0-d tensor")
    K = a.shape[-1]
    if K == 0:
        raise ValueError(f"{aname}'s last dim K must be positive (the reduction dim of the GEMM), got shape "
                         f"{tuple(a.shape)}")
    if w.shape[1] != K:
        raise ValueError(f"{wname} must have shape [N, K] with K={K} ({aname}'s last dim), got {tuple(w.shape)}")
    return K, w.shape[0]


def _blocks_of(grid, R, K) -> tuple[int, int]:
    """(block_rows, block_cols) of a scale grid tiling [R, K] (1 along an empty dim)."""
    G0, G1 = grid.shape
    return (R // G0 if G0 else 1), (K // G1 if G1 else 1)


def _granularity_of(ga, gb, M, N) -> str:
    if ga.shape == (1, 1) and gb.shape == (1, 1):
        return "tensor"
    if ga.shape[1] == 1 and gb.shape[1] == 1 and ga.shape[0] in (1, M) and gb.shape[0] in (1, N):
        return "row"
    return "block"


def _kernel_grid(scale, R: int, K: int):
    """``scale`` as the fp32 grid ``[R / br, K / bc]`` the kernels take, for an operand ``[R, K]`` (K > 0), when that
    needs no decision: a single value, a per-row or 1 x b grid ``[R, G]`` or square blocks; else None, and the
    checked path normalizes it (``[R]``, other float dtypes) or refuses it (see :func:`_scale_grid`). The kernel
    checks that the grid tiles the operand."""
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or not K:
        return None
    d = scale.dim()
    if d == 2:
        G0, G1 = scale.shape
        square = G0 and G1 and R * G1 == K * G0
        return scale if G0 == R or square or (G0 == 1 and G1 == 1) else None
    return scale.view(1, 1) if d == 0 else None


def _fp8_mm_fast(a_q, a_scale, b_q, b_scale, out_dtype, bias):
    """fp8_mm on the CPU kernel straight from the arguments when they need no normalization (2-D a_q, scales as
    :func:`_kernel_grid` takes them): the kernel checks every argument (TORCH_CHECK), so the Python checks are left
    out. None where that does not apply or the kernel refuses the arguments: the checked path then decides (and
    raises its ValueError / TypeError naming the argument). Decode calls a W8A8 layer's GEMM once per token."""
    try:
        fn = cpu_op("fp8_mm", a_q.device)
        if fn is None:
            return None
        M, K = a_q.shape
        ga, gb = _kernel_grid(a_scale, M, K), _kernel_grid(b_scale, b_q.shape[0], K)
        if ga is None or gb is None:
            return None
        return fn(a_q.view(torch.uint8), ga, a_q.dtype, b_q.view(torch.uint8), gb, b_q.dtype, bias, out_dtype)
    except Exception:  # noqa: BLE001  (the checked path reports it)
        return None


def _fp8_weight_only_fast(x, w_q, w_scale, bias):
    """fp8_weight_only_mm on the CPU kernel straight from the arguments, as :func:`_fp8_mm_fast`."""
    try:
        fn = cpu_op("fp8_weight_only_mm", x.device)
        if fn is None:
            return None
        N, K = w_q.shape
        grid = _kernel_grid(w_scale, N, K)
        if grid is None:
            return None
        if x.dim() == 2:
            return fn(x, w_q.view(torch.uint8), grid, w_q.dtype, bias)
        return fn(x.reshape(-1, K), w_q.view(torch.uint8), grid, w_q.dtype, bias).reshape(*x.shape[:-1], N)
    except Exception:  # noqa: BLE001  (the checked path reports it)
        return None


def fp8_mm(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, bias=None, *, a_block_size=None,
           b_block_size=None, backend=None):
    """Scaled fp8 GEMM: ``(a_q * a_scale) @ (b_q * b_scale)^T + bias`` with fp32 accumulation.

    Args:
        a_q: float8 activations ``[M, K]`` (or ``[..., K]``, flattened).
        a_scale: fp32 from :func:`quantize_fp8` of a: ``()`` tensor-wise, ``[M, 1]`` / ``[M]`` per token,
            ``[M, K / 128]`` for 1x128 blocks (any 2-D grid that tiles a works).
        b_q: float8 weight ``[N, K]`` (nn.Linear layout). The fp8 dtypes of a and b may differ.
        b_scale: ``()``, ``[N, 1]`` / ``[N]`` per channel, ``[N / 128, K / 128]`` for 128x128 blocks.
        out_dtype: float32/bfloat16/float16/float64. bias: float ``[N]`` or None, added in fp32.
        a_block_size, b_block_size: the (block_rows, block_cols) the scale was made with; checked against the
            scale's shape. Needed for blocks spanning several rows that are not square (e.g. 2 x 32): such a grid
            is otherwise indistinguishable from a per-row scale with rows missing, and refused.
    Returns: ``[..., N]`` in out_dtype.
    Runs ``torch._scaled_mm`` where the GPU has fp8 (see ``qkernels.explain("fp8_mm", ...)``), else the
    emulated path (decode to fp32, then matmul) with the same semantics.
    """
    if backend is None and a_block_size is None and b_block_size is None:
        out = _fp8_mm_fast(a_q, a_scale, b_q, b_scale, out_dtype, bias)
        if out is not None:
            return out
    check_tensor(a_q, "a_q")
    check_fp8_dtype(a_q.dtype, "a_q.dtype")
    check_tensor(b_q, "b_q", dim=2)
    check_fp8_dtype(b_q.dtype, "b_q.dtype")
    check_out_dtype(out_dtype)
    K, N = _k_and_n(a_q, "a_q", b_q, "b_q")
    a2 = a_q.reshape(-1, K)
    M = a2.shape[0]
    ga = _scale_grid(a_scale, "a_scale", a2, a_q.shape[:-1], "a_q", a_block_size)
    gb = _scale_grid(b_scale, "b_scale", b_q, b_q.shape[:-1], "b_q", b_block_size)
    check_bias(bias, N)
    for name, t in (("b_q", b_q), ("a_scale", a_scale), ("b_scale", b_scale), ("bias", bias)):
        check_same_device("a_q", a_q, name, t)
    gran = _granularity_of(ga, gb, M, N)
    args = (a2.view(torch.uint8), ga, a_q.dtype, b_q.view(torch.uint8), gb, b_q.dtype, bias, out_dtype)
    out = autograd.run("fp8_mm", args, lambda: call(
        "fp8_mm", args, a_q.device, backend, a_dtype=a_q.dtype, b_dtype=b_q.dtype, granularity=gran,
        out_dtype=out_dtype, M=M, K=K, N=N, a_blocks=_blocks_of(ga, M, K), b_blocks=_blocks_of(gb, N, K)))
    return out.reshape(*a_q.shape[:-1], N)


def fp8_weight_only_mm(x, w_q, w_scale, bias=None, *, w_block_size=None, backend=None):
    """Weight-only fp8 GEMM: ``x @ (w_q * w_scale)^T + bias`` with fp32 accumulation, x not quantized.

    Args:
        x: float32/bfloat16/float16 activations ``[..., K]``; the result has x's dtype.
        w_q: float8 weight ``[N, K]`` (any of the four fp8 dtypes) and w_scale as :func:`quantize_fp8` returns it
            for w: ``()``, ``[N, 1]`` / ``[N]`` per channel, ``[N, K / b]`` or ``[N / br, K / bc]`` blocks.
        bias: float ``[N]`` or None.
        w_block_size: the (block_rows, block_cols) w_scale was made with, checked against its shape; required
            for blocks spanning several rows that are not square (see :func:`fp8_mm`).
    Returns: ``[..., N]`` in x's dtype. On CPU a fused kernel decodes the weight in registers for decode-sized
    inputs (up to 16 rows of x); on a GPU the cast kernel decodes it to x's dtype for cuBLAS.
    """
    if backend is None and w_block_size is None:
        out = _fp8_weight_only_fast(x, w_q, w_scale, bias)
        if out is not None:
            return out
    check_float_tensor(x, "x")
    check_tensor(w_q, "w_q", dim=2)
    check_fp8_dtype(w_q.dtype, "w_q.dtype")
    K, N = _k_and_n(x, "x", w_q, "w_q")
    gw = _scale_grid(w_scale, "w_scale", w_q, w_q.shape[:-1], "w_q", w_block_size)
    check_bias(bias, N)
    for name, t in (("w_q", w_q), ("w_scale", w_scale), ("bias", bias)):
        check_same_device("x", x, name, t)
    x2 = x.reshape(-1, K)
    args = (x2, w_q.view(torch.uint8), gw, w_q.dtype, bias)
    out = autograd.run("fp8_weight_only_mm", args,
                       lambda: call("fp8_weight_only_mm", args, x.device, backend, M=x2.shape[0], K=K, N=N))
    return out.reshape(*x.shape[:-1], N)


# ---- the native backend: torch._scaled_mm (qkernels/dispatch.py fp8_native / fp8_native_blockwise pick it only where
# it can run). Same positional arguments as the qkernels op schema; call() in ops/_call.py runs it from NATIVE.


def _native_fp8_mm(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype):
    """torch._scaled_mm for tensor-wise and row-wise scales: a [M, K] row-major, b [N, K] -> b.t() column-major."""
    M, N = a.shape[0], b.shape[0]
    a8, b8 = a.contiguous().view(a_dtype), b.contiguous().view(b_dtype)
    if a_scale.numel() == 1 and b_scale.numel() == 1:
        # tensor-wise: ask for an fp32 result (cuBLAS accumulates in fp32) and add bias in fp32, like the emulation
        out = torch._scaled_mm(a8, b8.t(), a_scale.reshape(()), b_scale.reshape(()), out_dtype=torch.float32)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    if a_scale.shape[1] > 1 or b_scale.shape[1] > 1:
        return _native_fp8_mm_blockwise(a8, b8, a_scale, b_scale, bias)
    # row-wise (scale_a [M, 1], scale_b [1, N] fp32; bf16 output, bf16 bias fused): the table routes only bf16 here
    sa = a_scale.float().expand(M, 1).contiguous()
    sb = b_scale.float().reshape(-1).expand(N).reshape(1, N).contiguous()
    return torch._scaled_mm(a8, b8.t(), sa, sb, bias=None if bias is None else bias.to(torch.bfloat16),
                            out_dtype=torch.bfloat16).to(out_dtype)


def _native_fp8_mm_blockwise(a8, b8, a_scale, b_scale, bias):
    """sm90 block-wise fp8 (dispatch.fp8_native_blockwise): a_scale [M, K/128] (1x128 blocks), b_scale [N, K/128]
    (1x128) or [N/128, K/128] (128x128). Scale layouts as in torch's own scaled_mm samples
    (torch/testing/_internal/common_methods_invocations.py, sample_inputs_scaled_mm_v2): 1x128 scales "outer-dim
    major" ([K/128, rows] contiguous, seen transposed), 128x128 scales [N/128, K/128] contiguous, seen transposed.
    bf16 result; the bias is added in fp32 like the emulation, then rounded once more to bf16."""
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    N = b8.shape[0]
    sa = a_scale.float().t().contiguous().t()
    if b_scale.shape[0] == N:
        sb, rb = b_scale.float().t().contiguous().t(), ScalingType.BlockWise1x128
    else:
        sb, rb = b_scale.float().contiguous().t(), ScalingType.BlockWise128x128
    out = scaled_mm(a8, b8.t(), sa, ScalingType.BlockWise1x128, sb, rb, swizzle_a=SwizzleType.NO_SWIZZLE,
                    swizzle_b=SwizzleType.NO_SWIZZLE, output_dtype=torch.bfloat16)
    if bias is not None:
        out = (out.float() + bias.float()).to(torch.bfloat16)
    return out


NATIVE["fp8_mm"] = _native_fp8_mm


# ---- fake (meta) kernels ---------------------------------------------------------------------------------------
if _ext.HAS_C:

    @torch.library.register_fake("qkernels::quantize_fp8")
    def _(x, scale, dtype, block_rows, block_cols, saturate):
        grid = (x.shape[0] // block_rows, x.shape[1] // block_cols)
        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(grid, dtype=torch.float32)

    @torch.library.register_fake("qkernels::dequantize_fp8")
    def _(q, scale, dtype, block_rows, block_cols, out_dtype):
        return q.new_empty(q.shape, dtype=out_dtype)

    @torch.library.register_fake("qkernels::fp8_mm")
    def _(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype):
        torch._check(a.shape[1] == b.shape[1], lambda: "a and b must have the same K")
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("qkernels::fp8_weight_only_mm")
    def _(x, w, w_scale, w_dtype, bias):
        torch._check(x.shape[1] == w.shape[1], lambda: "x and w must have the same K")
        return x.new_empty((x.shape[0], w.shape[0]))
