"""transformers integration: ``quant_method="qkernels"`` as a transformers quantization method.

After ``import qkernels`` (see :func:`qkernels.integrations.install_transformers_hook`):

* ``AutoModelForCausalLM.from_pretrained(dir)`` on a :func:`qkernels.save_quantized` directory (or on one written by
  ``model.save_pretrained`` of a model loaded this way) builds :class:`qkernels.nn.QuantLinear` layers on the meta
  device before any tensor is read, and the checkpoint's codes / scales are loaded straight into their buffers: no
  float weight of a quantized layer is ever materialised.
* ``from_pretrained(float_dir, quantization_config=QKernelsConfig(Int4WeightOnly(...)))`` quantizes on load: each
  Linear's float weight is rounded to nearest (:meth:`QuantLinear.from_linear`, the same code as
  :func:`qkernels.quantize_`) as soon as it is read, then dropped, so at most one float weight of a quantized layer
  is alive at a time.
* ``model.save_pretrained(dir)`` writes the QuantLinear buffers and a ``quantization_config`` that is exactly the one
  :func:`qkernels.save_quantized` writes (``quant_method``, ``format_version``, ``layers``; see
  :mod:`qkernels.formats.native`), so :func:`qkernels.load_quantized` and ``from_pretrained`` read either.

The on-disk format is qkernels' own; the transformers loading API used here (``HfQuantizer``,
``register_quantizer``, ``ConversionOps``) is the one of transformers 5.x (tested with 5.24.0).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import native
from ..nn.linear import QuantLinear
from ..nn.quantize import output_embedding_names, set_submodule
from ..nn.schemes import Scheme

if int(transformers.__version__.split(".")[0]) < 5:
    # the HfQuantizer / weight-loading hooks used below are those of transformers 5 (ConversionOps, get_quantize_ops)
    raise ImportError(f"qkernels' transformers integration needs transformers>=5, found {transformers.__version__}; "
                      "qkernels.load_quantized works with either")

QUANT_METHOD = "qkernels"


class QKernelsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qkernels model.

    Args:
        scheme: for quantizing on load: a scheme (``Int4WeightOnly(group_size=128)``, ``Fp8WeightOnly()``...) or its
            ``Scheme.to_dict()``; every eligible ``nn.Linear`` is quantized with it by round to nearest.
        modules_to_not_convert: module names (exact, or a prefix ending at a ``.``) left in float when quantizing on
            load; default: the output embedding (``lm_head``), as :func:`qkernels.quantize_` does.
        layers, format_version, buffer_dtypes: what :func:`qkernels.save_quantized` writes (one entry per
            QuantLinear: scheme, shape, bias, act_order). A checkpoint's config carries them; quantizing on load
            fills ``layers`` once the model is built.
    """

    def __init__(self, scheme: Scheme | dict | None = None, modules_to_not_convert: list[str] | None = None, *,
                 layers: dict | None = None, format_version: int = native.FORMAT_VERSION,
                 buffer_dtypes: dict | None = None, quant_method: str = QUANT_METHOD, **kwargs):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for QKernelsConfig, got {quant_method!r}")
        if format_version != native.FORMAT_VERSION:
            raise ValueError(f"format_version must be {native.FORMAT_VERSION}, got {format_version!r}")
        if isinstance(scheme, dict):
            scheme = Scheme.from_dict(scheme)
        if scheme is not None and not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a qkernels scheme (e.g. Int4WeightOnly()) or its to_dict(), got "
                            f"{type(scheme).__name__}")
        if layers is not None and not isinstance(layers, dict):
            raise TypeError(f"layers must be a dict {{module name: layer config}}, got {type(layers).__name__}")
        if modules_to_not_convert is not None and (isinstance(modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.scheme = scheme
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.layers = layers
        self.buffer_dtypes = buffer_dtypes
        # unknown keys (e.g. written by a newer qkernels) are kept so a re-save does not drop them
        self.extra = dict(kwargs)

    def to_dict(self) -> dict:
        d = {"quant_method": QUANT_METHOD, "format_version": self.format_version, "layers": self.layers}
        if self.scheme is not None:
            d["scheme"] = self.scheme.to_dict()
        if self.modules_to_not_convert is not None:
            d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.buffer_dtypes:
            d["buffer_dtypes"] = dict(self.buffer_dtypes)
        return {**self.extra, **d}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __repr__(self):
        n = "?" if self.layers is None else len(self.layers)
        return f"QKernelsConfig(scheme={self.scheme!r}, layers={n})"


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


class QKernelsHfQuantizer(HfQuantizer):
    """Builds QuantLinear layers inside ``from_pretrained`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: QKernelsConfig

    def __init__(self, quantization_config: QKernelsConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._targets: dict[str, nn.Linear] = {}  # quantize on load: Linear name -> module awaiting its weight

    def validate_environment(self, *args, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized and not cfg.layers:
            raise ValueError("this qkernels checkpoint's quantization_config has no 'layers': it was not written by "
                             "qkernels.save_quantized or save_pretrained of a qkernels model")
        if not self.pre_quantized and cfg.scheme is None:
            raise ValueError("QKernelsConfig needs scheme= (e.g. QKernelsConfig(Int4WeightOnly(group_size=128))) to "
                             "quantize a float checkpoint on load")

    # ---- model skeleton ----------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        modules = dict(model.named_modules())
        cfg = self.quantization_config
        if self.pre_quantized:
            for name, lc in cfg.layers.items():
                old = modules.get(name)
                if not isinstance(old, nn.Linear):
                    got = "nothing" if old is None else type(old).__name__
                    raise ValueError(f"quantization_config.layers names {name!r}, which must be an nn.Linear of the "
                                     f"model, found {got}")
                try:
                    q = QuantLinear(lc["in_features"], lc["out_features"], Scheme.from_dict(lc["scheme"]),
                                    bool(lc.get("bias")), act_order=bool(lc.get("act_order")),
                                    bias_dtype=old.bias.dtype if old.bias is not None else torch.float32,
                                    device="meta")
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"quantization_config.layers[{name!r}] is invalid: {e}") from e
                if (q.in_features, q.out_features) != (old.in_features, old.out_features):
                    raise ValueError(f"checkpoint layer {name} is [{q.out_features}, {q.in_features}] but the "
                                     f"model's is [{old.out_features}, {old.in_features}]")
                set_submodule(model, name, q)
            return model
        skip = cfg.modules_to_not_convert
        if skip is None:
            skip = sorted(output_embedding_names(model))
        skip = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        for name, mod in modules.items():
            if type(mod) is nn.Linear and not _skipped(name, skip) and \
                    cfg.scheme.check_shape(mod.in_features, mod.out_features) is None:
                self._targets[name] = mod
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        mod, _, attr = param_name.rpartition(".")
        return attr == "weight" and mod in self._targets

    def get_quantize_ops(self):
        return _make_quantize_op(self)

    def get_new_dtype(self, converter, param, dtype):
        # a QuantLinear's tensors keep the dtype they were saved in (fp32 scales, the bias dtype load_quantized keeps)
        keys = getattr(converter, "target_patterns", None) or []
        if keys and keys[0].rpartition(".")[0] in (self.quantization_config.layers or {}):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        left = [n for n, m in model.named_modules() if n in self._targets and not isinstance(m, QuantLinear)]
        if left:
            raise RuntimeError(f"qkernels: {len(left)} Linear layers were not quantized on load (their weight was "
                               f"not found in the checkpoint or failed to convert): {left[:5]}")
        self._targets.clear()
        cfg = self.quantization_config
        # buffers outside the state dict (rotary inv_freq) in the dtype the saved model had, as load_quantized does:
        # save_quantized of a model cast with .to(torch.bfloat16) records bf16 where transformers would build fp32
        for name, dt in (cfg.buffer_dtypes or {}).items():
            mod, _, attr = name.rpartition(".")
            owner = model.get_submodule(mod) if mod else model
            buf = getattr(owner, attr, None)
            if isinstance(buf, torch.Tensor) and buf.is_floating_point() and \
                    isinstance(getattr(torch, str(dt), None), torch.dtype):
                setattr(owner, attr, buf.to(getattr(torch, dt)))
        cfg.layers = {n: native.layer_config(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        # LoRA adapters on QuantLinear (qkernels.integrations.peft_lora): the codes stay frozen
        return True


def _make_quantize_op(quantizer: QKernelsHfQuantizer):
    # core_model_loading is imported only when a float checkpoint is quantized on load
    from transformers.core_model_loading import ConversionOps

    class QKernelsQuantizeOnLoad(ConversionOps):
        """The float weight of one Linear, as read from the checkpoint -> a QuantLinear swapped into the model."""

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            (key, value), = input_dict.items()
            w = value[0] if isinstance(value, list) else value
            name = key.rpartition(".")[0]
            old = quantizer._targets[name]
            lin = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
            lin.weight = nn.Parameter(w.detach(), requires_grad=False)
            if old.bias is not None and old.bias.device.type != "meta":
                lin.bias = old.bias  # loaded before the weight (keys are read in sorted order)
            q = QuantLinear.from_linear(lin, quantizer.quantization_config.scheme)
            if old.bias is not None and lin.bias is None:
                # the checkpoint's bias comes later and lands in this buffer (QuantLinear keeps bias as a buffer)
                q.register_buffer("bias", torch.zeros(old.out_features, dtype=old.bias.dtype, device=w.device))
            set_submodule(model, name, q)
            if missing_keys is not None:
                missing_keys.discard(key)
            return {}

    return QKernelsQuantizeOnLoad()


def register() -> None:
    """Register ``QKernelsConfig`` / ``QKernelsHfQuantizer`` under ``quant_method="qkernels"`` (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QKernelsConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(QUANT_METHOD)(QKernelsConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QKernelsHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QKernelsHfQuantizer)


register()
