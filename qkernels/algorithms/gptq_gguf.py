"""GPTQ-aware GGUF quantization: GPTQ's error feedback with llama.cpp's block formats as the quantization grid.

Every GGUF type qkernels encodes (except MXFP4) decodes element i of a block as ``scale_i * (code_i - offset) +
bias_i`` with an integer code (:func:`qkernels.reference.gguf.block_affine`): for Q4_K/Q5_K the scale is
``d * sc`` and the bias ``-dmin * m`` of the element's 32-wide sub-block, for Q6_K ``d * sc`` of its 16-wide
sub-block, for Q5_0/Q8_0 the block's ``d``. So GPTQ (Frantar et al., arXiv:2210.17323) runs unchanged on that grid:

* when the column loop reaches the first column of a block (256 columns for the K-quants, 32 for the others),
  llama.cpp's encoder (qkernels' byte-exact one) runs on the CURRENT, error-updated values of the block's columns
  and its header (d, dmin and the quantized sub-block scales/mins, i.e. the exact effective scale and bias) is kept;
  optionally with importance weights ``diag(H)`` of those columns (what llama.cpp's imatrix measures);
* each column is then rounded to that fixed grid, ``code = clamp(round((w - bias) / scale) + offset)``, and its
  error is spread over the remaining columns by GPTQ's inverse-Hessian update (the shared column loop of
  :mod:`qkernels.algorithms.gptq`);
* the result is the encoder's headers with the GPTQ-chosen codes packed in the type's layout: ordinary GGUF bytes
  (any llama.cpp build reads them), whose decode equals the weights GPTQ accounted for, bit for bit.

Why the header comes from the error-updated weights and not from the original ones: the header must fit the
values that will actually be rounded; taking it beforehand (GPTQ's ``static_groups``) lets the accumulated updates
drift outside the chosen range. Act-order (``act_order=True``) permutes columns inside each block only, so a block's
columns still share one header; across blocks the order stays the natural one.

Per-tensor types follow llama.cpp's mix rules (:func:`qkernels.formats.gguf.tensor_type`), as in
:func:`qkernels.export_gguf`, which writes these layers' bytes unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..formats.gguf import MIXES, hf_to_gguf_name, tensor_type
from ..nn.gguf_linear import GGUFLinear
from ..ops.gguf import gguf_quantize, type_id
from ..reference.gguf import BLOCK, CODES, IMATRIX_TYPES, TYPE_NAMES, TYPES, block_affine, pack_codes
from ._layers import capture_layer_inputs, check_finite, decoder_layers, layer_forward, one_thread
from .gptq import (ColumnGrid, GPTQConfig, _inverse_cholesky, _sequential_groups, collect_hessians, gptq_column_loop,
                   prepare_hessian)
from .rtn import quantizable_linears, set_module

log = logging.getLogger("qkernels.algorithms")

_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFGPTQConfig:
    """``damp_percent``/``block_size``/``true_sequential`` as in :class:`qkernels.algorithms.GPTQConfig`;
    ``imatrix``: headers chosen with importance weights ``diag(H)`` (K-quants only: llama.cpp has no weighted
    search for the legacy 32-blocks in qkernels, and Q8_0 ignores it); ``act_order``: columns by decreasing
    ``H_kk`` inside each block."""

    damp_percent: float = 0.01
    block_size: int = 128
    imatrix: bool = False
    act_order: bool = False
    true_sequential: bool = True

    def __post_init__(self):
        GPTQConfig(damp_percent=self.damp_percent, block_size=self.block_size)  # the same checks and messages


@dataclass
class GGUFGPTQResult:
    """data: uint8 ``[N, K / block * type_size]`` (ggml blocks, row-major like a GGUF tensor); type: ggml type id;
    weight: fp32 ``[N, K]``, the dequantized weight (``gguf_dequantize(data) == weight`` bit for bit);
    loss: GPTQ's objective summed over the columns."""

    data: torch.Tensor
    type: int
    weight: torch.Tensor
    loss: float


class GGUFGrid(ColumnGrid):
    """GPTQ column grid of a GGUF block type: headers from llama.cpp's encoder at each block start, codes chosen per
    column. Columns are processed in ``perm`` order (a permutation inside each block) or the natural one."""

    def __init__(self, type: int, N: int, K: int, device, imatrix=None, perm=None):
        bs, ts = BLOCK[type]
        self.type, self.block, self.ts = type, bs, ts
        self.offset, self.cmax = CODES[type][0], CODES[type][1]
        self.zero_code = 0 if bs == 256 else self.offset
        self.imatrix, self.perm = imatrix, perm
        self.codes = torch.zeros(N, K, dtype=torch.int32, device=device)  # original column order
        self.headers = torch.zeros(N, K // bs, ts, dtype=torch.uint8, device=device)
        self.weight = torch.zeros(N, K, dtype=torch.float32, device=device)

    def start(self, col, w):
        bs = self.block
        if self.perm is not None:  # back to the block's natural column order for the encoder
            w = w[:, torch.argsort(self.perm[col:col + bs] - col)]
        im = None if self.imatrix is None else self.imatrix[col:col + bs]
        data = gguf_quantize(w.contiguous(), self.type, im)
        self.headers[:, col // bs] = data
        self.col0 = col
        self.scale, _, self.bias = block_affine(data, self.type)

    def quantize(self, col, w):
        k = col if self.perm is None else int(self.perm[col])
        j = k - self.col0
        a = self.scale[:, j]
        b = None if self.bias is None else self.bias[:, j]
        x = w if b is None else w - b
        ok = a != 0
        c = torch.round(x / torch.where(ok, a, torch.ones_like(a))) + self.offset
        # a zero scale (an all-zero (sub-)block): every code decodes to the bias; take the one llama.cpp's encoders
        # write there (0 for the K-quants, the code of value 0 for the 32-blocks) so such blocks keep their bytes
        c = torch.where(ok, c.clamp(0, self.cmax), torch.full_like(c, self.zero_code))
        deq = a * (c - self.offset)  # the decoder's float32 operation order (block_affine)
        if b is not None:
            deq = deq + b
        self.codes[:, k] = c.to(torch.int32)
        self.weight[:, k] = deq
        return deq

    def blocks(self) -> torch.Tensor:
        N, G = self.headers.shape[:2]
        codes = self.codes.reshape(N * G, self.block)
        return pack_codes(self.headers.reshape(N * G, self.ts), self.type, codes).reshape(N, G * self.ts)


def _check_type(type, K: int) -> int:
    t = type_id(type)
    if t not in CODES:
        names = sorted(TYPE_NAMES[c] for c in CODES)
        raise ValueError(f"type must be a GGUF type with integer codes for GPTQ ({names}), got {TYPE_NAMES[t]}")
    bs = BLOCK[t][0]
    if K % bs:
        raise ValueError(f"the weight's row length K={K} must be a multiple of the {TYPE_NAMES[t]} block size {bs}")
    return t


@torch.no_grad()
def gptq_gguf_quantize_weight(W: torch.Tensor, H: torch.Tensor, type, cfg: GGUFGPTQConfig = GGUFGPTQConfig()
                              ) -> GGUFGPTQResult:
    """GPTQ-quantizes one weight ``W`` float ``[N, K]`` to ggml blocks of ``type`` ("Q4_K", "Q6_K", "Q5_0",
    "Q8_0", ...) given its input Hessian ``H`` fp32 ``[K, K]`` (``2 X^T X / n``, as GPTQ accumulates it)."""
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight [N, K], got shape {tuple(W.shape)}")
    t = _check_type(type, W.shape[1])
    if W.device.type == "cpu":
        with one_thread():
            return _gptq_gguf_quantize_weight(W, H, t, cfg)
    return _gptq_gguf_quantize_weight(W, H, t, cfg)


def _gptq_gguf_quantize_weight(W, H, t, cfg):
    W, H = prepare_hessian(W, H)
    N, K = W.shape
    bs = BLOCK[t][0]
    diag = torch.diag(H).clone()
    imatrix = diag if cfg.imatrix and t in IMATRIX_TYPES else None
    perm = None
    if cfg.act_order:
        starts = torch.arange(0, K, bs, device=W.device).repeat_interleave(bs)
        local = torch.argsort(-diag.reshape(K // bs, bs), dim=1, stable=True).reshape(K)
        perm = starts + local
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, cfg.damp_percent)
    grid = GGUFGrid(t, N, K, W.device, imatrix, perm)
    loss = gptq_column_loop(W, Hinv, grid, cfg.block_size)
    return GGUFGPTQResult(grid.blocks(), t, grid.weight, loss)


def gguf_layer_type(layer_index: int, name: str, shape, n_layers: int, mix: str, tied_embeddings: bool) -> str:
    """llama.cpp's type for linear ``name`` (relative to decoder layer ``layer_index``, HF naming) under ``mix``."""
    gname = hf_to_gguf_name(f"model.layers.{layer_index}.{name}.weight")
    if gname is None:
        raise ValueError(f"decoder layer {layer_index} has a linear {name!r} that has no llama.cpp tensor name "
                         "(Llama-layout models with q/k/v/o and gate/up/down projections are supported)")
    return tensor_type(gname, tuple(shape), n_layers, mix, tied_embeddings=tied_embeddings)


def _check_mix(mix: str) -> None:
    if mix not in MIXES or MIXES[mix][0] in _FLOAT_TYPES:
        raise ValueError(f"mix must be one of {sorted(m for m in MIXES if MIXES[m][0] not in _FLOAT_TYPES)}, "
                         f"got {mix!r}")


def _tied(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


@torch.no_grad()
def gguf_quantize_model(model: nn.Module, mix: str = "Q4_K_M", imatrix: dict | None = None) -> nn.Module:
    """Plain llama.cpp quantization (its reference encoders, no calibration) of every linear of the decoder layers
    of ``model`` (in place) to :class:`GGUFLinear` with ``mix``'s per-tensor types; the output head stays float.
    ``imatrix``: {HF module name: float ``[in_features]``} importance weights (K-quants). Returns ``model``."""
    _check_mix(mix)
    quantizable_linears(model)
    layers = decoder_layers(model)
    for li, layer in enumerate(layers):
        for n, lin in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            t = gguf_layer_type(li, n, lin.weight.shape, len(layers), mix, _tied(model))
            im = None if imatrix is None or TYPES[t] not in IMATRIX_TYPES else imatrix.get(f"model.layers.{li}.{n}")
            set_module(layer, n, GGUFLinear.from_float(lin, t, im))
    return model


@torch.no_grad()
def gptq_gguf_quantize_model(model: nn.Module, calib_batches: list[torch.Tensor], mix: str = "Q4_K_M",
                             cfg: GGUFGPTQConfig = GGUFGPTQConfig(), progress: bool = True) -> nn.Module:
    """GPTQ-aware llama.cpp quantization of every linear of the decoder layers of ``model`` (in place) to
    :class:`GGUFLinear` layers with ``mix``'s per-tensor types (as :func:`qkernels.export_gguf` assigns them), layer
    by layer with the calibration activations re-propagated through the quantized layers; the output head stays
    float. :func:`qkernels.export_gguf` with the same ``mix`` then writes these bytes as they are.

    Args:
        calib_batches: int64 token ids ``[B, L]`` (at least one batch).
    """
    from tqdm.auto import tqdm

    _check_mix(mix)
    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")
    quantizable_linears(model)
    layers = decoder_layers(model)
    tied = _tied(model)
    inps, kws = capture_layer_inputs(model, calib_batches)
    for li, layer in enumerate(tqdm(layers, desc=f"GPTQ {mix} layers", disable=not progress)):
        for x in inps:
            check_finite(x, f"the input of decoder layer {li}")
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        types = {n: gguf_layer_type(li, n, m.weight.shape, len(layers), mix, tied) for n, m in linears.items()}
        for names in _sequential_groups(layer, list(linears), cfg.true_sequential):
            hess = collect_hessians(layer, {n: linears[n] for n in names}, inps, kws)
            for n in names:
                lin = linears[n]
                if types[n] in _FLOAT_TYPES:  # a row length no block type divides: llama.cpp keeps it F16
                    set_module(layer, n, GGUFLinear.from_float(lin, types[n]))
                    continue
                res = gptq_gguf_quantize_weight(lin.weight, hess[n].value(), types[n], cfg)
                log.debug("GPTQ-GGUF layer %d %s (%s): loss %.4g", li, n, types[n], res.loss)
                bias = None if lin.bias is None else lin.bias.detach().clone()
                set_module(layer, n, GGUFLinear(lin.in_features, lin.out_features, res.type, res.data, bias))
        outs = [layer_forward(layer, x, kw) for x, kw in zip(inps, kws)]
        for o in outs:
            check_finite(o, f"the output of quantized decoder layer {li}")
        inps = outs
    return model
