"""compressed-tensors ``pack-quantized`` checkpoints: fixtures written with the compressed-tensors package's own
``pack_to_int32`` and checked against its own decompressor (the oracle); converted by
qkernels.formats.compressed_tensors. Dequantized weights must match the package's exactly."""

import pytest
import torch
import torch.nn.functional as F

import qkernels
from .formats_fixtures import tiny_llama, write_model_dir
from qkernels.formats import CheckpointError, compressed_tensors as ct
from qkernels.formats._common import unpack_bits
from qkernels.nn import Fp4, Int4WeightOnly, Int8WeightOnly, QuantLinear

ctpkg = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402


def weights_args(bits, strategy, group_size, symmetric):
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size if strategy == "group" else None, "dynamic": False}


def ct_layer(N, K, bits, strategy, group_size, symmetric, seed=0, actorder=False):
    """(layer tensors, the compressed-tensors package's own decompressed weight) for random codes/scales."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    G = K // group_size if strategy == "group" else 1
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, G, generator=g) * 0.02 + 0.001
    if strategy == "tensor":
        scale = scale[:1, :1].reshape(1)
    t = {"weight_packed": pack_to_int32(q, bits), "weight_shape": torch.tensor([N, K]), "weight_scale": scale}
    zp = None
    if not symmetric:
        zp = torch.randint(lo, hi + 1, (N, G), generator=g, dtype=torch.int8)
        t["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if actorder:
        perm = torch.randperm(K, generator=g)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // group_size).to(torch.int32)
        t["weight_g_idx"] = g_idx
    # (older compressed-tensors wrote weight_g_idx for actorder="group"; 0.20 removed that option, so the
    # act-order test below checks against the formula instead of the package's decompressor)
    args = QuantizationArgs(**weights_args(bits, strategy, group_size, symmetric))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = None if actorder else PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"].float()
    return t, w, args


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("strategy, group_size, symmetric", [("group", 32, True), ("group", 32, False),
                                                              ("channel", None, True), ("channel", None, False),
                                                              ("tensor", None, True)])
def test_pack_quantized_layer_exact(bits, strategy, group_size, symmetric):
    N, K = 48, 96
    t, w, args = ct_layer(N, K, bits, strategy, group_size, symmetric, seed=bits)
    q = ct.convert_layer("l", {f"l.{k}": v for k, v in t.items()}, args.model_dump())
    assert torch.equal(q.dequantize(), w)
    assert isinstance(q.scheme, Int4WeightOnly if bits <= 4 else Int8WeightOnly)
    # the codes round-trip through the package's own unpacker too
    assert torch.equal(unpack_bits(t["weight_packed"], bits, K) - (1 << (bits - 1)),
                       unpack_from_int32(t["weight_packed"], bits, torch.Size([N, K])).int())
    x = torch.randn(3, K)
    ref = x.double() @ w.double().T
    assert float((q(x).double() - ref).norm() / ref.norm()) < 1e-5


def test_actorder_g_idx():
    t, _, args = ct_layer(32, 128, 4, "group", 32, False, seed=5, actorder=True)
    q = ct.convert_layer("l", {f"l.{k}": v for k, v in t.items()}, args.model_dump())
    assert q.act_order
    # reference: W[n, k] = scale[n, g_idx[k]] * (code[n, k] - zp[n, g_idx[k]])
    codes = unpack_from_int32(t["weight_packed"], 4, torch.Size([32, 128])).long()
    zp = unpack_from_int32(t["weight_zero_point"], 4, torch.Size([32, 4]), packed_dim=0).long()
    gi = t["weight_g_idx"].long()
    w = t["weight_scale"][:, gi] * (codes - zp[:, gi]).float()
    assert torch.equal(q.dequantize(), w)


def ct_config(bits=4, group_size=32, symmetric=False, fmt="pack-quantized"):
    qcfg = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_args(bits, "group", group_size,
                                                                                          symmetric),
                                          "input_activations": None, "output_activations": None}},
            "ignore": ["lm_head"]}
    QuantizationConfig.model_validate(qcfg)  # the package accepts it
    return qcfg


def test_model_dir(tmp_path):
    model = tiny_llama()
    seeds = iter(range(100))

    def layer(name, lin):
        t, w, _ = ct_layer(lin.out_features, lin.in_features, 4, "group", 32, False, seed=next(seeds))
        return t, w

    ref = write_model_dir(tmp_path, model, ct_config(), layer)
    loaded = qkernels.load_quantized(str(tmp_path))
    names = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for n in names:
        assert torch.equal(loaded.get_submodule(n).dequantize(), ref.get_submodule(n).weight.detach())
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        out, exp = loaded(ids).logits, ref(ids).logits
    assert float((out - exp).norm() / exp.norm()) < 1e-4


# ---- nvfp4-pack-quantized: fixtures from the package's own compressor, checked against its decompressor ----------
def nvfp4_layer(N, K, seed=0, acts=True):
    """(layer tensors written by NVFP4PackedCompressor, the package's decompressed bf16 weight, scheme dict)."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.quant_scheme import NVFP4, NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    preset = NVFP4 if acts else NVFP4A16
    scheme = QuantizationScheme(targets=["Linear"], **preset)
    gs = generate_gparam(w.min(), w.max())
    wg = w.reshape(N, K // 16, 16)
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights, global_scale=gs)
    t = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    if acts:
        t["input_global_scale"] = torch.tensor([1234.5])  # calibrated activation scale: not used by qkernels
    ref = NVFP4PackedCompressor.decompress(dict(t), scheme)["weight"]
    return dict(t), ref, scheme.model_dump(mode="json")


def nvfp4_config(acts=True):
    from compressed_tensors.quantization.quant_scheme import NVFP4, NVFP4A16

    scheme = QuantizationScheme(targets=["Linear"], **(NVFP4 if acts else NVFP4A16)).model_dump(mode="json")
    qcfg = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": ["lm_head"]}
    QuantizationConfig.model_validate(qcfg)
    return qcfg


@pytest.mark.parametrize("acts", [True, False], ids=["NVFP4", "NVFP4A16"])
def test_nvfp4_layer_matches_package(acts):
    N, K = 48, 96
    t, ref, _ = nvfp4_layer(N, K, seed=3, acts=acts)
    assert t["weight_packed"].dtype == torch.uint8 and t["weight_scale"].dtype == torch.float8_e4m3fn
    layers, rest = ct.convert({f"l.{k}": v for k, v in t.items()}, nvfp4_config(acts))
    assert rest == {}  # input_global_scale consumed
    q = layers["l"]
    assert q.scheme == Fp4("nvfp4", weight_only=not acts)
    # the packing is ours exactly: same bytes, same e4m3 block scales; the global scale is inverted
    assert torch.equal(q.qweight, t["weight_packed"]) and torch.equal(q.scale, t["weight_scale"].view(torch.uint8))
    assert torch.equal(q.global_scale, 1.0 / t["weight_global_scale"].reshape(()))
    w = q.dequantize()
    # the package decompresses to bf16: identical after rounding ours to bf16
    assert ref.dtype == torch.bfloat16 and torch.equal(w.bfloat16(), ref)
    # and in fp32 within one rounding of the reciprocal of the package's formula code * (scale / global_scale)
    codes = qkernels.fp4_decode(t["weight_packed"], out_dtype=torch.float64)
    exact = codes * (t["weight_scale"].double().repeat_interleave(16, 1) / t["weight_global_scale"].double())
    assert float(((w.double() - exact).abs() / exact.abs().clamp_min(1e-30))[exact != 0].max()) < 2**-22
    x = torch.randn(5, K)
    exp = F.linear(x.double(), w.double())
    assert float((q(x).double() - exp).norm() / exp.norm()) < (0.2 if acts else 1e-5)


def test_nvfp4_model_dir(tmp_path):
    model = tiny_llama()
    seeds = iter(range(100))

    def layer(name, lin):
        t, _, _ = nvfp4_layer(lin.out_features, lin.in_features, seed=next(seeds), acts=False)
        # the package's formula in fp64 (its decompressor rounds to bf16, checked per layer above)
        codes = qkernels.fp4_decode(t["weight_packed"], out_dtype=torch.float64)
        return t, (codes * (t["weight_scale"].double().repeat_interleave(16, 1) / t["weight_global_scale"].double()))

    ref = write_model_dir(tmp_path, model, nvfp4_config(acts=False), layer)
    loaded = qkernels.load_quantized(str(tmp_path))
    names = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for n in names:
        assert torch.allclose(loaded.get_submodule(n).dequantize(), ref.get_submodule(n).weight, rtol=2**-22, atol=0)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        out, exp = loaded(ids).logits, ref(ids).logits
    assert float((out - exp).norm() / exp.norm()) < 1e-4


def test_nvfp4_bad_inputs():
    t, _, _ = nvfp4_layer(32, 64)
    good = {f"l.{k}": v for k, v in t.items()}
    cfg = nvfp4_config()
    for key, bad, match in [
        ("l.weight_scale", t["weight_scale"][:, :2], r"l.weight_scale must have shape \(32, 4\), got \(32, 2\)"),
        ("l.weight_scale", t["weight_scale"].float(), "l.weight_scale must have dtype float8_e4m3fn"),
        ("l.weight_packed", t["weight_packed"].to(torch.int32), "l.weight_packed must have dtype uint8"),
        ("l.weight_global_scale", torch.zeros(1), "l.weight_global_scale must be positive"),
        ("l.weight_global_scale", torch.ones(2), "l.weight_global_scale must have one element"),
        ("l.weight_global_scale", torch.tensor([float("nan")]), "l.weight_global_scale contains NaN"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            ct.convert({**good, key: bad}, cfg)
    bad_cfg = nvfp4_config()
    bad_cfg["config_groups"]["group_0"]["weights"]["group_size"] = 32
    with pytest.raises(NotImplementedError, match="nvfp4-pack-quantized weights must be"):
        ct.convert(good, bad_cfg)


def test_bad_inputs():
    t, _, args = ct_layer(32, 64, 4, "group", 32, False)
    good = {f"l.{k}": v for k, v in t.items()}
    w = args.model_dump()
    for key, bad, match in [
        ("l.weight_scale", t["weight_scale"][:, :1], r"l.weight_scale must have shape \(32, 2\), got \(32, 1\)"),
        ("l.weight_packed", t["weight_packed"][:, :4], r"l.weight_packed must have shape \(32, 8\), got \(32, 4\)"),
        ("l.weight_zero_point", t["weight_zero_point"][:2], r"l.weight_zero_point must have shape \(4, 2\)"),
        ("l.weight_shape", torch.tensor([32, 64, 1]), "weight_shape must hold"),
        ("l.weight_packed", t["weight_packed"].float(), "l.weight_packed must have dtype int32"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            ct.convert_layer("l", {**good, key: bad}, w)
    with pytest.raises(NotImplementedError, match="format must be one of .*got 'marlin-24'"):
        ct.convert(good, ct_config(fmt="marlin-24"))
    cfg = ct_config()
    cfg["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    with pytest.raises(CheckpointError, match="l: no config group targets this layer"):
        ct.convert(good, cfg)
    cfg["config_groups"]["group_0"]["weights"]["num_bits"] = 9
    with pytest.raises(CheckpointError, match=r"num_bits must be in \[1, 8\], got 9"):
        ct.convert(good, cfg)
