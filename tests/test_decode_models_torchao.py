"""bench_decode's torchao rows (benchmarks/decode_models.torchao_quantize) on a tiny random Llama: the int4 / int8 rows
build, hold torchao's weight tensors (codes, not bf16 weights), compute with exactly those weights and stay about as
close to the float logits as qkernels' own RTN of the same granularity; the Int4WeightOnlyConfig row fails on CPU
with torchao's own error rather than silently running in bf16."""

import copy

import pytest
import torch

torchao_q = pytest.importorskip("torchao.quantization")

from benchmarks.decode_models import TORCH_ROWS, TORCHAO_INT4_GROUP, torchao_quantize  # noqa: E402
from qkernels.eval.models import tiny_llama  # noqa: E402

from qkernels.nn import Int4WeightOnly, Int8WeightOnly, quantize_  # noqa: E402

OURS = {"torchao-intx4": lambda: Int4WeightOnly(group_size=TORCHAO_INT4_GROUP), "torchao-int8": Int8WeightOnly}


def _tiny(seed=1):
    # hidden 128 / intermediate 256: multiples of the row's group (torchao asserts K % group == 0)
    return tiny_llama(vocab_size=256, hidden=128, intermediate=256, layers=2, seed=seed)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("row", ["torchao-intx4", "torchao-int8"])
def test_torchao_row_logits_close_to_float(row):
    assert row in TORCH_ROWS
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _tiny().to(torch.bfloat16)
    q = torchao_quantize(copy.deepcopy(ref), row)
    linears = {n: m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    kinds = {type(m.weight).__name__ for m in linears.values()}
    assert "lm_head" in linears and "Parameter" not in kinds and "Tensor" not in kinds, kinds  # every Linear
    if row == "torchao-intx4":
        w = linears["lm_head"].weight
        assert tuple(w.block_size) == (1, TORCHAO_INT4_GROUP)
        assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7  # int4 codes, one per int8

    # oracle 1: the same model with torchao's dequantized weights as plain bf16 Linears. The int4 row dequantizes
    # then calls F.linear (identical); the int8 row multiplies by bf16 codes and scales the output, which rounds
    # differently in bf16 (measured 0.007)
    deq = copy.deepcopy(ref)
    for name, m in deq.named_modules():
        if name in linears:
            m.weight = torch.nn.Parameter(linears[name].weight.dequantize().to(torch.bfloat16))
    # oracle 2: the float model and qkernels' own RTN of the same granularity (fp32, head included)
    ours = quantize_(_tiny(), OURS[row](), include_lm_head=OURS[row]())
    with torch.no_grad():
        got = q(ids).logits.float()
        want_deq = deq(ids).logits.float()
        want = _tiny()(ids).logits.float()
        ours_err = _rel(ours(ids).logits.float(), want)
    assert _rel(got, want_deq) < 2e-2
    # torchao's error / qkernels' measured on seeds 0-3: 1.08-1.24 (int4) and 1.12-1.30 (int8; torchao's model is
    # bf16 throughout, ours fp32 outside the GEMMs); > 0: the weights really were quantized
    err = _rel(got, want)
    assert 0 < err < 1.5 * ours_err, (err, ours_err)


def test_torchao_row_rejects_unknown_name():
    model = tiny_llama(hidden=64, intermediate=128, layers=1)
    with pytest.raises(ValueError, match="row must be one of"):
        torchao_quantize(model, "torchao-int2")


def test_torchao_int4_row_raises_on_cpu():
    # torchao 0.18's Int4WeightOnlyConfig has no CPU packing format; a torchao that adds one should make this fail,
    # so that the row's "fails on CPU" description gets updated
    model = tiny_llama(vocab_size=256, hidden=128, intermediate=256, layers=1).to(torch.bfloat16)
    with pytest.raises(Exception):
        torchao_quantize(model, "torchao-int4")
