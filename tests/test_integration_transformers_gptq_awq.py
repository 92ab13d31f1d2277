"""Registering ``quant_method="qkernels"`` with transformers (qkernels/integrations/transformers_quantizer.py) leaves
GPTQ and AWQ checkpoints on their own configs and quantizers (issue 16, item 1): transformers still maps their
``quant_method`` to its GPTQConfig / AwqConfig and its own quantizer, which here asks for its optional packages
(optimum / gptqmodel, not installed), while ``qkernels.load_quantized`` reads the same directories as QuantLinear."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

import qkernels  # noqa: E402
from qkernels.eval.models import tiny_llama  # noqa: E402
from qkernels.formats.awq import save_awq  # noqa: E402
from qkernels.formats.gptq import save_gptq  # noqa: E402
from qkernels.integrations import QKernelsConfig  # noqa: E402
from qkernels.nn import Int4WeightOnly, QuantLinear, quantize_  # noqa: E402

FORMATS = {  # quant_method -> (writer, transformers' config class name, packages transformers' loader needs)
    "gptq": (save_gptq, "GPTQConfig", ("optimum", "gptqmodel")),
    "awq": (save_awq, "AwqConfig", ("gptqmodel", "awq")),
}


@pytest.mark.parametrize("method", sorted(FORMATS))
def test_gptq_awq_dirs_keep_transformers_own_quantizer(tmp_path, method):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

    save, config_cls, packages = FORMATS[method]
    model = quantize_(tiny_llama(hidden=64, intermediate=128, layers=1), Int4WeightOnly(group_size=32, symmetric=False))
    save(model, str(tmp_path))

    assert AUTO_QUANTIZER_MAPPING["qkernels"].__module__.startswith("qkernels.")  # the registration is active
    assert AUTO_QUANTIZER_MAPPING[method].__module__.startswith("transformers.quantizers.")
    qcfg = AutoConfig.from_pretrained(tmp_path).quantization_config
    cfg = AutoQuantizationConfig.from_dict(qcfg) if isinstance(qcfg, dict) else qcfg
    assert type(cfg).__name__ == config_cls and not isinstance(cfg, QKernelsConfig)

    if not any(importlib.util.find_spec(p) for p in packages):
        # transformers' own loader ran (it is the one that needs these packages), not qkernels' quantizer
        with pytest.raises(ImportError, match="|".join(packages)):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert not any(isinstance(m, QuantLinear) for m in loaded.modules())

    # qkernels' own reader takes the same directory: QuantLinear layers, the original model's logits up to the
    # formats' fp16 scales (2^-11 relative per scale; the exact codes and scales: tests/test_formats_*.py)
    ours = qkernels.load_quantized(str(tmp_path))
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == 7
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids).logits, model(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 2e-3
