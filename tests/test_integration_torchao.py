"""torchao interop (qkernels/integrations/torchao_interop.py): torchao weight-only Linears (CPU layouts) converted to
QuantLinear keep their exact dequantized weights, and their outputs agree with torchao's."""

import copy

import pytest
import torch
from torch import nn

torchao_q = pytest.importorskip("torchao.quantization")

from qkernels import Int4WeightOnly, Int8WeightOnly, QuantLinear  # noqa: E402
from qkernels.integrations.torchao_interop import (convert_torchao_model, from_torchao_linear,  # noqa: E402
                                                   is_torchao_linear)

from .conftest import GEMM_RTOL_TABLE, rel_err  # noqa: E402

PerGroup, PerAxis, MappingType = torchao_q.PerGroup, torchao_q.PerAxis, torchao_q.MappingType

CONFIGS = {
    "int8-row": (lambda: torchao_q.Int8WeightOnlyConfig(), Int8WeightOnly()),
    "int8-g32": (lambda: torchao_q.Int8WeightOnlyConfig(granularity=PerGroup(32)),
                 Int8WeightOnly(group_size=32, symmetric=True)),
    "intx-int4-g32-sym": (lambda: torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
                          Int4WeightOnly(group_size=32, symmetric=True)),
    "intx-int4-g32-asym": (lambda: torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                                                  mapping_type=MappingType.ASYMMETRIC),
                           Int4WeightOnly(group_size=32, symmetric=False)),
    "intx-int3-g32-asym": (lambda: torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(32),
                                                                  mapping_type=MappingType.ASYMMETRIC),
                           Int4WeightOnly(group_size=32, symmetric=False, bits=3)),
    "intx-int8-row": (lambda: torchao_q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                      Int8WeightOnly()),
}


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 40, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_layers_match_torchao(name, dtype):
    make_cfg, scheme = CONFIGS[name]
    ao = _model(dtype)
    torchao_q.quantize_(ao, make_cfg())
    assert is_torchao_linear(ao[0]) and is_torchao_linear(ao[2])
    qk = convert_torchao_model(copy.deepcopy(ao))
    assert isinstance(qk[0], QuantLinear) and isinstance(qk[2], QuantLinear) and not is_torchao_linear(qk[0])
    for i in (0, 2):
        assert qk[i].scheme == scheme
        # the same weight, bit for bit, as torchao's own dequantization (in the model dtype, where torchao rounds)
        want = ao[i].weight.dequantize()
        assert want.dtype == dtype and torch.equal(qk[i].dequantize(dtype), want), i
    assert torch.equal(qk[0].bias, ao[0].bias.detach())
    x = torch.randn(5, 96, dtype=dtype)
    with torch.no_grad():
        got, ref = qk(x), ao(x)
    assert got.dtype == ref.dtype == dtype
    # the GEMMs differ only in float summation order (and in where bf16 rounds the product)
    assert rel_err(got, ref) < GEMM_RTOL_TABLE["layer"][dtype]


def test_unsupported_torchao_weights_are_refused():
    m = _model(torch.float32)
    torchao_q.quantize_(m, torchao_q.Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(NotImplementedError, match="activation quantization"):
        from_torchao_linear(m[0])
    with pytest.raises(TypeError, match="linear.weight must be a torchao quantized tensor"):
        from_torchao_linear(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        from_torchao_linear(nn.ReLU())
    plain = _model(torch.float32)
    assert convert_torchao_model(plain) is plain and isinstance(plain[0], nn.Linear)  # nothing to convert
