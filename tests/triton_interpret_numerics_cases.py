"""The Triton GEMMs on extreme magnitudes, subnormals and inf/NaN against the reference (the CPU kernels' scenarios
of tests/numerics_cases.py), under TRITON_INTERPRET=1: run by tests/test_triton.py with the other interpreter cases
(see tests/triton_interpret_cases.py for why in a separate process; not collected on its own).

fp32 and fp16 activations only: the interpreter multiplies bf16 as raw uint16 in ``tl.dot`` (see that file).
Ordinary inputs are tested by the other cases files; "w_tiny" is left out on purpose: the kernels scale x's rows
down to keep every fp32 sum finite for any finite weight, so weights below ~2^-100 / K give subnormal products
(documented in qkernels/triton/int_gemm.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - only when someone runs this file by hand
    pytest.skip("run through tests/test_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

pytest.importorskip("triton")

from .conftest import GEMM_RTOL_TABLE  # noqa: E402
from .numerics_cases import SCENARIOS, assert_like_reference, make_x, op_pair, weight_magnitude  # noqa: E402

# one variant per kernel (the interpreter is slow; tests/test_kernel_numerics.py covers the variants on CPU)
OPS = [
    ("int4_weight_only_mm", dict(signed=False, zp=True, group=32), "triton_int"),
    ("int8_weight_only_mm", {}, "triton_int"),
    ("int8_dynamic_mm", {}, "triton_int"),
    ("fp8_weight_only_mm", dict(gran="block", dtype=torch.float8_e5m2), "float"),
    ("fp4_weight_only_mm", dict(format="nvfp4"), "float"),
    ("gguf_mm", dict(type="Q8_0"), "triton_int"),
]
IDS = [op + "-" + "-".join(f"{v}" for v in kw.values()) for op, kw, _ in OPS]
FP32_SCENARIOS = [s for s in SCENARIOS if s not in ("w_tiny", "normal", "x_huge_w_tiny", "x_subnormal_w_huge")]


def _check(op, kw, family, scenario, dtype, M):
    gen = torch.Generator().manual_seed(0)
    x = make_x(M, 128, scenario, dtype, gen)
    fn = op_pair(op, x, weight_magnitude(scenario), gen, **kw)
    rtol = GEMM_RTOL_TABLE[family].get(dtype, 3e-3)
    assert_like_reference(fn("triton"), fn("reference"), rtol, f"triton {op} {kw} {scenario} {dtype} M={M}")


@pytest.mark.parametrize("scenario", FP32_SCENARIOS)
@pytest.mark.parametrize("op,kw,family", OPS, ids=IDS)
def test_triton_gemm_fp32_extremes(op, kw, family, scenario):
    _check(op, kw, family, scenario, torch.float32, 3)


@pytest.mark.parametrize("scenario", ["normal", "inf", "nan"])
@pytest.mark.parametrize("op,kw,family", OPS, ids=IDS)
def test_triton_gemm_fp16_specials(op, kw, family, scenario):
    _check(op, kw, family, scenario, torch.float16, 3)
