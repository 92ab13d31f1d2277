"""Model directories: ``save_quantized(model, dir)`` and ``load_quantized(path_or_dir)``.

A directory holds ``*.safetensors`` plus the quantization config, found (first hit wins) in ``config.json``'s
``quantization_config`` (transformers layout, any of the formats below), ``quantization_config.json`` or
``quantize_config.json`` (AutoGPTQ's standalone file, GPTQ). ``quant_method`` picks the converter:

* ``qkernels``            our own (``save_quantized``): QuantLinear buffers as is
* ``gptq``                :mod:`qkernels.formats.gptq` (2/3/4/8 bits, act-order, v1 and v2 zero points)
* ``awq``                 :mod:`qkernels.formats.awq` ("gemm")
* ``compressed-tensors``  :mod:`qkernels.formats.compressed_tensors` (``pack-quantized``)

Every quantized layer is converted (repacked) once, at load, into a :class:`qkernels.nn.QuantLinear`. All layers and
tensors are converted and checked against the model before the first module is swapped: on any error the model is
left untouched.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from torch import nn

from ..nn.linear import QuantLinear
from ..nn.quantize import set_submodule
from . import awq, compressed_tensors, gptq, native
from ._common import CheckpointError, check_quant_linear
from .model_dir import WEIGHTS_NAME, write_model_dir  # noqa: F401 - WEIGHTS_NAME re-exported

CONVERTERS = {
    "qkernels": native.convert,
    "gptq": gptq.convert,
    "awq": awq.convert,
    "compressed-tensors": compressed_tensors.convert,
}


# ---- save ------------------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, save_dir: str) -> str:
    """Write ``model`` (with QuantLinear layers) to ``save_dir``: ``model.safetensors`` (the state dict; tied
    tensors once), ``quantization_config.json`` and, for transformers models, ``config.json`` carrying the same
    ``quantization_config``. Returns ``save_dir``. (GPTQ / AWQ checkpoints: :func:`qkernels.formats.gptq.save_gptq`,
    :func:`qkernels.formats.awq.save_awq`.)"""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: native.layer_config(m) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    qcfg = {"quant_method": "qkernels", "format_version": native.FORMAT_VERSION, "layers": layers}
    # buffers outside the state dict (rotary inv_freq...) are rebuilt at load from the config, in the dtype the
    # constructor picks; a model cast after construction (model.to(torch.bfloat16)) had them cast too
    persistent = set(model.state_dict())
    qcfg["buffer_dtypes"] = {n: str(b.dtype).replace("torch.", "") for n, b in model.named_buffers()
                             if n not in persistent and b.is_floating_point()}
    return write_model_dir(model, save_dir, qcfg, metadata={"quant_method": "qkernels"})


# ---- load ------------------------------------------------------------------------------------------------------
# keys of GPTQ/AWQ configs that record how a checkpoint was made or is to be run (calibration, kernels) without
# changing what the stored tensors mean; tools fill them differently in config.json and quantize_config.json
_PROVENANCE_KEYS = frozenset({
    "model_name_or_path", "model_file_base_name", "quantizer", "meta", "damp_percent", "damp_auto_increment",
    "true_sequential", "static_groups", "dataset", "tokenizer", "batch_size", "cache_block_outputs", "use_cuda_fp16",
    "use_exllama", "exllama_config", "max_input_length", "module_name_preceding_first_block", "backend",
})


def read_quantization_config(path: str, strict: bool = False) -> tuple[dict, dict | None]:
    """(quantization_config, config.json dict or None) of a checkpoint directory: the first found of config.json's
    ``quantization_config``, quantization_config.json, quantize_config.json (AutoGPTQ's; quant_method "gptq").

    ``strict`` (what :func:`load_quantized` uses): the other copies are read too and every key that two of them
    share must have the same value (CheckpointError otherwise), so that an edit to one copy cannot be silently
    ignored. (save_quantized writes two copies; GPTQ directories often carry AutoGPTQ's file next to config.json.)"""
    config = None
    cpath = os.path.join(path, "config.json")
    if os.path.exists(cpath):
        config = _read_json(cpath)
    found = []
    if config is not None and isinstance(config.get("quantization_config"), dict):
        found.append(("config.json", config["quantization_config"]))
    for fname, default_method in (("quantization_config.json", None), ("quantize_config.json", "gptq")):
        p = os.path.join(path, fname)
        if (found and not strict) or not os.path.exists(p):
            continue
        q = _read_json(p)
        if default_method and "quant_method" not in q:
            q = {**q, "quant_method": default_method}
        for other, oq in found:
            differ = sorted(k for k in set(oq) & set(q) - _PROVENANCE_KEYS if oq[k] != q[k])
            if differ:
                where, a, b = _first_difference(q[differ[0]], oq[differ[0]], differ[0])
                raise CheckpointError(f"{path}: {fname} and {other} disagree on quantization_config key(s) {differ}, "
                                      f"e.g. {where}: {a!r:.60} vs {b!r:.60}; fix or remove one of them")
        found.append((fname, q))
    if not found:
        raise CheckpointError(f"{path}: no quantization_config found (looked in config.json, "
                              "quantization_config.json, quantize_config.json)")
    return found[0][1], config


def _first_difference(a, b, where: str):
    """(path, value in a, value in b) of the first place two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}[{k!r}]")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return where, a, b


def _read_json(p: str) -> dict:
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path`` (a directory or one file), on CPU."""
    from safetensors.torch import load_file

    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    tensors = {}
    for f in files:
        try:
            part = load_file(f, device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors (truncated or corrupt?): {e}") from e
        dup = set(part) & set(tensors)
        if dup:
            raise CheckpointError(f"{f}: tensors {sorted(dup)[:5]} also appear in another file")
        tensors.update(part)
    return tensors


def convert_checkpoint(tensors: dict, qcfg: dict, validate: bool = True
                       ) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Converted layers ({name: QuantLinear}) and the remaining (unquantized) tensors, checked as
    :func:`load_quantized` documents (``validate=False`` skips the scans over codes and float tensors)."""
    method = qcfg.get("quant_method")
    if method not in CONVERTERS:
        raise CheckpointError(f"quantization_config.quant_method must be one of {sorted(CONVERTERS)}, got {method!r}")
    layers, rest = CONVERTERS[method](tensors, qcfg)
    for name, layer in layers.items():
        check_quant_linear(name, layer, full=validate)
    if validate:
        # NaN is never a weight; inf is left alone (some models keep -inf attention masks as buffers)
        bad = [k for k, t in rest.items() if t.is_floating_point() and bool(torch.isnan(t).any())]
        if bad:
            raise CheckpointError(f"tensors {bad[:6]} contain NaN")
    return layers, rest


def check_buffer_dtypes(model: nn.Module, entries, stored: set = frozenset()) -> dict[str, torch.dtype]:
    """``quantization_config.buffer_dtypes`` ({buffer name: dtype name}, written by :func:`save_quantized`) checked
    against ``model``: each entry must name a floating buffer outside the state dict and a floating dtype, and that
    dtype must be one the buffer can have had at save time: the one the model builds it with, or one of ``stored``
    (the dtypes of the checkpoint's unquantized float tensors: a model cast with ``.to(dtype)`` casts those too)."""
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise CheckpointError(f"quantization_config.buffer_dtypes must be a dict, got {type(entries).__name__}")
    persistent = set(model.state_dict())
    buffers = {n: b for n, b in model.named_buffers() if n not in persistent and b.is_floating_point()}
    out = {}
    for name, dt in entries.items():
        if name not in buffers:
            raise CheckpointError(f"quantization_config.buffer_dtypes[{name!r}]: the model has no such floating "
                                  f"non-persistent buffer (it has {sorted(buffers)[:6]})")
        dtype = getattr(torch, dt, None) if isinstance(dt, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"quantization_config.buffer_dtypes[{name!r}] must name a floating torch dtype "
                                  f"('float32', 'bfloat16', ...), got {dt!r}")
        built = buffers[name].dtype
        if dtype != built and dtype not in stored:
            names = sorted(str(d).replace("torch.", "") for d in stored)
            raise CheckpointError(f"quantization_config.buffer_dtypes[{name!r}] is {dt!r}, but the model builds that "
                                  f"buffer as {str(built).replace('torch.', '')} and the checkpoint's float tensors "
                                  f"are {names}: a model cast to {dt} would have {dt} tensors")
        out[name] = dtype
    return out


def _build_hf_model(config: dict | None, dtype):
    if config is None:
        raise CheckpointError("no config.json: pass model= (an nn.Module with the checkpoint's architecture) to "
                              "load a checkpoint that is not a transformers model directory")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading a model directory needs transformers (pip install 'qkernels[hf]')") from e
    cfg = dict(config)
    cfg.pop("quantization_config", None)  # transformers must not try its own GPTQ/AWQ quantizer
    if "torch_dtype" in cfg:
        cfg.setdefault("dtype", cfg.pop("torch_dtype"))
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    dtype = dtype or getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
        build = lambda: cls.from_config(hf_config, dtype=dtype)  # noqa: E731
    else:
        build = lambda: cls._from_config(hf_config, dtype=dtype)  # noqa: E731
    # the Linear weights built here are replaced by the converted layers: skip their random init
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        try:
            model = build().eval()
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = (cls.from_config if cls is transformers.AutoModelForCausalLM else cls._from_config)(
                hf_config, torch_dtype=dtype).eval()
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # skipped with the init: load_into re-ties the aliases it sees
    return model


def _aliases(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that are the same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(v), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def load_into(model: nn.Module, layers: dict[str, nn.Module], rest: dict[str, torch.Tensor]) -> nn.Module:
    """Swap ``layers`` into ``model`` and load ``rest``; all checks run first (the model is untouched on error)."""
    modules = dict(model.named_modules())
    for name, q in layers.items():
        old = modules.get(name)
        if not isinstance(old, (nn.Linear, QuantLinear)):
            got = "nothing" if old is None else type(old).__name__
            raise CheckpointError(f"checkpoint layer {name} must replace an nn.Linear of the model, found {got}")
        if (old.in_features, old.out_features) != (q.in_features, q.out_features):
            raise CheckpointError(f"checkpoint layer {name} is [{q.out_features}, {q.in_features}] but the model's is "
                                  f"[{old.out_features}, {old.in_features}]")
        if (old.bias is not None) != (q.bias is not None):
            raise CheckpointError(f"checkpoint layer {name} bias={q.bias is not None} but the model's "
                                  f"bias={old.bias is not None}")
    swapped = tuple(n + "." for n in layers)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(swapped)}
    aliases = [[k for k in g if k in expected] for g in _aliases(model)]
    aliases = [g for g in aliases if len(g) > 1]
    tied_missing = set()
    for g in aliases:
        present = [k for k in g if k in rest]
        if present:
            tied_missing |= {k for k in g if k not in rest}
    missing = sorted(set(expected) - set(rest) - tied_missing)
    unexpected = sorted(set(rest) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{'...' if len(unexpected) > 8 else ''}")
    for k, t in rest.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{k} must have shape {tuple(expected[k].shape)}, got {tuple(t.shape)}")
        if t.is_floating_point() != expected[k].is_floating_point():
            raise CheckpointError(f"{k} must be a {'float' if expected[k].is_floating_point() else 'integer'} "
                                  f"tensor, got {t.dtype}")
    # checks passed: mutate
    for name, q in layers.items():
        set_submodule(model, name, q)
    model.load_state_dict(rest, strict=False, assign=True)
    # re-tie: assign=True gave the loaded key its own Parameter; point its aliases at it
    for g in aliases:
        src = next((k for k in g if k in rest), None)
        if src is None:
            continue
        src_mod, _, src_attr = src.rpartition(".")
        value = getattr(model.get_submodule(src_mod) if src_mod else model, src_attr)
        for k in g:
            if k != src and k not in rest:
                mod, _, attr = k.rpartition(".")
                setattr(model.get_submodule(mod) if mod else model, attr, value)
    return model


def load_quantized(path: str, model: nn.Module | None = None, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, validate: bool = True) -> nn.Module:
    """Load a quantized checkpoint directory (or a ``.safetensors`` file next to its config) as a model whose
    quantized Linears are :class:`QuantLinear`.

    Args:
        path: a directory written by :func:`save_quantized`, or a GPTQ / AWQ / compressed-tensors (transformers)
            model directory.
        model: the module to load into (same architecture; it is modified in place). When None, ``config.json``
            must describe a transformers model, which is built from it.
        device: where the loaded model ends up.
        dtype: float ``torch.dtype`` of the model built from config.json and of the checkpoint's unquantized float
            tensors (embeddings, norms...), which are cast to it; the quantized layers keep their stored buffers.
            None (default): the config's dtype for the model, the stored dtypes for the tensors. Not allowed with
            ``model`` (cast that model before loading).
        validate: run the full checks (default). Always checked, whatever ``validate``: the config (method, bits,
            group size...), which must agree between config.json and quantization_config.json /
            quantize_config.json; every tensor's presence, dtype and shape against the config and the model;
            scales finite and positive (fp4 block scales: not NaN, not negative), zero points within the codes'
            range, bias finite, act-order permutations, ``buffer_dtypes``. ``validate=True`` adds the passes over
            whole tensors: codes within ``bits`` where their storage holds more (2/3-bit in nibbles, 5..7-bit in
            int8), fp8 codes not NaN, no NaN in the unquantized tensors. See docs/validation.md: safetensors files
            have no checksums, so flipped bits that leave a code in range cannot be detected.

    Raises:
        TypeError: an argument of the wrong type. CheckpointError (a ValueError): a corrupt or inconsistent
            checkpoint, naming the file, tensor or config key. The model is not modified when anything fails.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or None to build one from config.json), got "
                        f"{type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        hint = f" (torch.{dtype})" if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) \
            else ""
        raise TypeError(f"dtype must be a floating torch.dtype{hint} or None, got {type(dtype).__name__} {dtype!r}")
    if dtype is not None and model is not None:
        raise ValueError("dtype applies to a model built from config.json; with model= cast that model before "
                         "loading (the quantized layers keep their stored dtypes)")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    device = torch.device(device)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    cdir = path if os.path.isdir(path) else os.path.dirname(path)
    qcfg, config = read_quantization_config(cdir, strict=True)
    tensors = read_tensors(path)
    layers, rest = convert_checkpoint(tensors, qcfg, validate)
    if model is None:
        model = _build_hf_model(config, dtype)
    buffer_dtypes = check_buffer_dtypes(model, qcfg.get("buffer_dtypes"),
                                        {t.dtype for t in rest.values() if t.is_floating_point()})
    if dtype is not None:
        rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
    load_into(model, layers, rest)
    for name, dt in buffer_dtypes.items():
        mod, _, attr = name.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        setattr(owner, attr, getattr(owner, attr).to(dt))
    return model.to(device)
