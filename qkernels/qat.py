"""QAT entry points: ``qkernels.qat.prepare(model, scheme)``, ``finetune(...)``, ``convert(model)``
(implementation in :mod:`qkernels.algorithms.qat`)."""

from .algorithms.qat import FakeQuantLinear, QATScheme, convert, fake_quant_act_int8, finetune, prepare

__all__ = ["FakeQuantLinear", "QATScheme", "convert", "fake_quant_act_int8", "finetune", "prepare"]
