"""Triton GGUF decode (qkernels/triton/gguf.py) against qkernels.reference.gguf on CPU under TRITON_INTERPRET=1.
Run by tests/test_triton.py in the same subprocess as tests/triton_interpret_cases.py (see that file for why a
subprocess); not collected on its own. Small shapes: the interpreter runs each kernel in numpy."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - only when someone runs this file by hand
    pytest.skip("run through tests/test_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

pytest.importorskip("triton")

import qkernels  # noqa: E402
from qkernels import triton as qtriton  # noqa: E402
from qkernels.reference import gguf as R  # noqa: E402

TYPES = [R.TYPE_NAMES[t] for t in R.types_with("triton", "gguf_dequantize")]
# byte offsets of the fp16 d / dmin fields of each block (MXFP4's e8m0 scale is always finite)
FP16_FIELDS = {R.TYPE_NAMES[t]: R.GGML[t].fp16_fields for t in R.TYPES.values()}
from tests.conftest import GEMM_RTOL  # noqa: E402


def _random_blocks(name: str, rows: int, nblocks: int, seed: int, finite: bool = True) -> torch.Tensor:
    """Every byte random (as test_gguf.test_decoder_matches_gguf_py_on_random_bytes); with ``finite`` the fp16
    fields get their top exponent bit cleared, so d/dmin are finite; block 0 has subnormal fields, block 1 negative."""
    t = R.TYPES[name]
    bs, ts = R.BLOCK[t]
    g = torch.Generator().manual_seed(1000 + t)
    data = torch.randint(0, 256, (rows, nblocks, ts), dtype=torch.uint8, generator=g)
    for off in FP16_FIELDS[name]:
        if finite:
            data[:, :, off + 1] &= 0xBF
        data[0, 0, off + 1] &= 0x83  # a subnormal (random sign)
        data[0, 1, off + 1] |= 0x80  # a negative d
    return data.reshape(rows, nblocks * ts)


def _decode(data, t, rows, cols, dtype):
    return qtriton.get("gguf_dequantize")(data, t, rows, cols, dtype), R.gguf_dequantize(data, t, rows, cols, dtype)


@pytest.mark.parametrize("name", TYPES)
def test_decode_random_bytes_bit_exact(name):
    t = R.TYPES[name]
    bs = R.BLOCK[t][0]
    rows, nblocks = (3, 3) if bs == 256 else (5, 7)  # 9 / 35 blocks: not a multiple of a program's 4 / 32
    data = _random_blocks(name, rows, nblocks, t)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got, want = _decode(data, t, rows, nblocks * bs, dtype)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), (name, dtype, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("name", ["Q4_1", "Q2_K", "Q6_K"])
def test_decode_inf_nan_scales_like_reference(name):
    t = R.TYPES[name]
    bs = R.BLOCK[t][0]
    data = _random_blocks(name, 2, 3, t, finite=False)
    for off in FP16_FIELDS[name]:  # force inf / NaN d in the first blocks
        data[0, off:off + 2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)
        data[1, off:off + 2] = torch.tensor([0x01, 0xFE], dtype=torch.uint8)
    got, want = _decode(data, t, 2, 3 * bs, torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(want).any())
    assert torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))


@pytest.mark.parametrize("name", TYPES)
def test_decode_encoder_output_bit_exact(name):
    t = R.TYPES[name]
    bs = R.BLOCK[t][0]
    g = torch.Generator().manual_seed(7 + t)
    x = torch.randn(3, 2 * bs, generator=g) * torch.exp2(torch.randint(-6, 6, (3, 1), generator=g).float())
    x[1, :bs] = 0.0  # an all-zero block
    data = R.gguf_quantize(x, t)
    for dtype in (torch.float32, torch.bfloat16):
        got, want = _decode(data, t, 3, 2 * bs, dtype)
        assert torch.equal(got, want), (name, dtype)


def test_decode_public_op_forced_triton_and_odd_dtype():
    data = _random_blocks("Q4_K", 2, 2, 0)
    got = qkernels.gguf.dequantize(data, "Q4_K", (2, 512), torch.float64, backend="triton")
    assert torch.equal(got, R.gguf_dequantize(data, R.TYPES["Q4_K"], 2, 512, torch.float64))
    empty = torch.empty(0, 18, dtype=torch.uint8)
    assert qtriton.get("gguf_dequantize")(empty, 2, 0, 32, torch.float32).shape == (0, 32)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K", "Q3_K", "MXFP4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gguf_mm_close_to_reference(name, dtype):
    t = R.TYPES[name]
    bs = R.BLOCK[t][0]
    N, K, M = 5, 2 * bs, 3
    g = torch.Generator().manual_seed(t)
    data = R.gguf_quantize(torch.randn(N, K, generator=g), t)
    x = torch.randn(M, K, generator=g).to(dtype)
    got = qtriton.get("gguf_mm")(x, data, t, N, K)
    want = (x.double() @ R.gguf_dequantize(data, t, N, K, torch.float64).t())
    assert got.dtype == dtype and got.shape == (M, N)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < GEMM_RTOL[dtype], (name, dtype, err)


def test_decode_rejects_type_without_kernel():
    data = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="type must be a ggml type with a Triton decoder .*, got 0"):
        qtriton.get("gguf_dequantize")(data, 0, 2, 2, torch.float32)  # 0 = F32: a plain cast, no kernel
