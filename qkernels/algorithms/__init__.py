"""Weight quantization algorithms: RTN, GPTQ (arXiv:2210.17323), AWQ (arXiv:2306.00978), AutoRound-style learned
rounding (arXiv:2309.05516) and QAT.

Each replaces the model's linears by :class:`qkernels.nn.QuantLinear` layers (the scheme that holds the codes
exactly: :func:`qkernels.algorithms.rtn.scheme_for`), whose weights are in the op format of
:mod:`qkernels.ops.int_quant` (int8 codes, fp32 scale ``[N, G]``, int32 zero point ``[N, G]``, optional act-order
permutation ``input_perm``; a ragged last group when K is not a multiple of the group size).
"""

from .autoround import AutoRoundConfig, autoround_quantize_model
from .awq import AWQConfig, awq_quantize_model
from .gptq import GPTQConfig, GPTQResult, export_gptq_tensors, gptq_quantize_model, gptq_quantize_weight
from .qat import FakeQuantLinear, QATScheme, convert, finetune, prepare
from .rtn import (INT4_G128, INT8_WEIGHT_ONLY, QuantConfig, fake_quantize, quantize_weight, rtn_quantize_model,
                  scheme_for, build_quant_linear)

__all__ = [
    "AWQConfig", "AutoRoundConfig", "FakeQuantLinear", "GPTQConfig", "GPTQResult", "INT4_G128", "INT8_WEIGHT_ONLY",
    "QATScheme", "QuantConfig", "autoround_quantize_model", "awq_quantize_model", "convert", "export_gptq_tensors",
    "fake_quantize", "finetune", "gptq_quantize_model", "gptq_quantize_weight", "prepare", "quantize_weight", "rtn_quantize_model",
    "scheme_for", "build_quant_linear",
]
