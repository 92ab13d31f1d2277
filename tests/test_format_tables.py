"""One table per format family, every consumer checked against it (issue 17 item 2).

* GGUF block types: ``qkernels.reference.gguf.GGML_TYPES``. Checked here: the table itself against gguf-py (ids,
  names, block and byte sizes) and against its own encoders / decoders (fp16 header fields); the C++ ops accept
  exactly the table's types with the table's sizes, decode and encode them like the reference, and name exactly
  these types in their error text; the Triton backend's declaration (``qkernels.triton.has_kernel``), its kernel
  module's type list and the dispatch decisions follow the table; the llama.cpp mixes use only table types.
* Minifloat element formats (fp8, fp4 elements): ``qkernels.reference.minifloat.FORMATS``. Checked: the table
  against torch's own fp8 dtypes and the OCP e2m1 value set; the C++ kernels decode every code of every format to
  the table's value and encode every finite value back to its code; their error texts name exactly the table's
  formats.
"""

import ast
import pathlib
import re

import pytest
import torch

import qkernels
from qkernels import dispatch
from qkernels import triton as qtriton
from qkernels.formats import gguf as fmt_gguf
from qkernels.ops import gguf as ops_gguf
from qkernels.reference import float4 as ref4
from qkernels.reference import float8 as ref8
from qkernels.reference import gguf as R
from qkernels.reference import minifloat as MF

from .conftest import needs_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = sorted(R.GGML)
# every id up to past the largest the table has: the C++ ops must refuse all the others
PROBE_IDS = range(0, max(IDS) + 8)


def _supported_in_message(msg: str) -> list[tuple[str, int]]:
    """("F32", 0), ... from the "F32=0, F16=1, ..." list an error text carries."""
    return [(n, int(i)) for n, i in re.findall(r"\b(\w+)=(\d+)\b", msg)]


# ---- the GGUF table itself -------------------------------------------------------------------------------------


def test_gguf_table_matches_gguf_py():
    gguf = pytest.importorskip("gguf")
    assert len({t.name for t in R.GGML_TYPES}) == len({t.id for t in R.GGML_TYPES}) == len(R.GGML_TYPES)
    for t in R.GGML_TYPES:
        gt = gguf.GGMLQuantizationType(t.id)
        assert gt.name == t.name, (t.name, gt.name)
        assert gguf.GGML_QUANT_SIZES[gt] == (t.block, t.size), t.name


@pytest.mark.parametrize("t", R.GGML_TYPES, ids=lambda t: t.name)
def test_gguf_table_rows_agree_with_their_codecs(t):
    """block / size fit the encoder and decoder; each fp16_fields offset is an fp16 scale (inf there makes the block
    decode to non-finite values); quant_offset and the imatrix columns are consistent."""
    g = torch.Generator().manual_seed(t.id)
    x = torch.randn(3, t.block, generator=g) + 0.5  # not all-zero: every scale is used
    blocks = t.encode(x, None)
    assert blocks.dtype == torch.uint8 and blocks.shape == (3, t.size)
    y = t.decode(blocks)
    assert y.shape == (3, t.block) and bool(torch.isfinite(y).all())
    for off in t.fp16_fields:
        bad = blocks.clone()
        bad[:, off:off + 2] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8)
        assert not bool(torch.isfinite(t.decode(bad)).all()), (t.name, off)
    assert (t.quant_offset is None) == (t.block == 1)
    assert t.quant_offset is None or 0 <= t.quant_offset < t.size
    assert t.imatrix in ("weights", "ignored", "unimplemented")
    assert (t.imatrix_sub_block is not None) == (t.imatrix == "weights")
    assert set(t.kernels) <= {"cpu", "triton"} and all(set(v) <= set(R.OPS) for v in t.kernels.values())


def test_describe_types_and_python_errors_list_the_table():
    assert _supported_in_message(R.describe_types()) == [(t.name, t.id) for t in R.GGML_TYPES]
    with pytest.raises(ValueError) as e:
        ops_gguf.type_id("Q7_K")
    assert _supported_in_message(str(e.value)) == [(t.name, t.id) for t in R.GGML_TYPES]
    with pytest.raises(ValueError) as e:
        ops_gguf.type_id(5)
    assert _supported_in_message(str(e.value).split(", got")[0]) == [(t.name, t.id) for t in R.GGML_TYPES]


# ---- the C++ kernels accept exactly the table's types ----------------------------------------------------------


@needs_extension
def test_cpp_error_text_names_the_table():
    with pytest.raises(RuntimeError) as e:
        torch.ops.qkernels.gguf_dequantize(torch.zeros(1, 1, dtype=torch.uint8), 5, 1, 1, torch.float32)
    msg = str(e.value).splitlines()[0]
    assert "type must be a supported ggml type id" in msg
    assert _supported_in_message(msg.split(", got")[0]) == [(t.name, t.id) for t in R.GGML_TYPES]


def _cpp_accepts(op: str, t: int) -> bool:
    """Probe call with the table's sizes for t where t is in the table (block 256 fits every type)."""
    bs, ts = R.BLOCK.get(t, (1, 1))
    K = 256
    data = torch.zeros(2, K // bs * ts, dtype=torch.uint8)
    try:
        if op == "gguf_quantize":
            torch.ops.qkernels.gguf_quantize(torch.randn(2, K), t, None)
        elif op == "gguf_dequantize":
            torch.ops.qkernels.gguf_dequantize(data, t, 2, K, torch.float32)
        else:
            torch.ops.qkernels.gguf_mm(torch.randn(3, K), data, t, 2, K)
    except RuntimeError as e:
        assert "type must be a supported ggml type id" in str(e), str(e)
        return False
    return True


@needs_extension
@pytest.mark.parametrize("op", R.OPS)
def test_cpp_accepts_exactly_the_table_types(op):
    accepted = [t for t in PROBE_IDS if _cpp_accepts(op, t)]
    assert accepted == sorted(R.types_with("cpu", op))


@needs_extension
@pytest.mark.parametrize("t", R.GGML_TYPES, ids=lambda t: t.name)
def test_cpp_codecs_equal_the_reference_per_table_type(t):
    """The C++ switch cases behind each table entry: encode (with and without an importance matrix) and decode
    bit-exact with the reference."""
    g = torch.Generator().manual_seed(100 + t.id)
    x = torch.randn(2, 256, generator=g)
    im = torch.rand(256, generator=g) + 0.1
    for imatrix in (None, im) if t.imatrix != "unimplemented" else (None,):
        got = torch.ops.qkernels.gguf_quantize(x, t.id, imatrix)
        assert torch.equal(got, R.gguf_quantize(x, t.id, imatrix)), (t.name, imatrix is not None)
    blocks = R.gguf_quantize(x, t.id)
    out = torch.ops.qkernels.gguf_dequantize(blocks, t.id, 2, 256, torch.float32)
    assert torch.equal(out, R.gguf_dequantize(blocks, t.id, 2, 256, torch.float32)), t.name


# ---- Triton and dispatch derive from the table -----------------------------------------------------------------


@pytest.mark.parametrize("op", ["gguf_dequantize", "gguf_mm"])
def test_triton_declaration_follows_the_table(op):
    want = set(R.types_with("triton", op))
    assert want, "the table gives the Triton decoder no type"
    for t in PROBE_IDS:
        assert qtriton.has_kernel(op, {"type": t}) == (t in want), t
        why = qtriton.unsupported(op, {"type": t})
        if t not in want:
            assert why.startswith(f"no Triton decoder for ggml type {R.TYPE_NAMES.get(t, t)} ")
            assert _supported_in_message(why.split("(it has ")[1]) == [(i, R.GGML[i].name)[::-1] for i in
                                                                        R.types_with("triton", op)]
    assert qtriton.has_kernel(op)  # no context: the op exists
    assert not qtriton.has_kernel("gguf_quantize", {"type": 2})  # no Triton encoder


def test_triton_kernel_module_uses_the_table():
    pytest.importorskip("triton")
    from qkernels.triton import gguf as tg

    assert tuple(tg.TYPES) == R.types_with("triton", "gguf_dequantize")
    assert tg._QS == {t: R.GGML[t].quant_offset for t in tg.TYPES}


def test_triton_modules_do_not_import_dispatch():
    """Backends declare what they implement; the dispatch table asks them (never the other way round)."""
    for path in sorted((ROOT / "qkernels" / "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert "dispatch" not in names, f"{path.name} imports from qkernels.dispatch"


@pytest.mark.parametrize("op", R.OPS)
def test_dispatch_follows_the_table(op, monkeypatch):
    monkeypatch.delenv("QKERNELS_BACKEND", raising=False)
    triton_ok = dispatch.triton_available(dispatch.parse_device("sm90"))[0]
    for t in IDS:
        with dispatch.mock_device("sm90"):
            d = dispatch.explain(op, type=t)
        assert d.backend == ("triton" if triton_ok and t in R.types_with("triton", op) else "reference"), str(d)
        with dispatch.mock_device("cpu"):
            d = dispatch.explain(op, type=t)
        want_cpu = qkernels.HAS_EXTENSION and t in R.types_with("cpu", op)
        assert d.backend == ("cpu" if want_cpu else "reference"), str(d)


# ---- the llama.cpp mixes use table types -----------------------------------------------------------------------

_NAMES = ["token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight",
          "blk.0.ffn_down.weight", "blk.3.ffn_down.weight", "blk.0.attn_qkv.weight", "blk.0.attn_norm.weight"]
_SHAPES = [(4096, 4096), (576, 576), (1536, 576), (64, 100), (32, 64), (4096,)]


@pytest.mark.parametrize("mix", sorted(fmt_gguf.MIXES))
def test_mixes_use_only_table_types(mix):
    default, file_type = fmt_gguf.MIXES[mix]
    assert default in R.TYPES and isinstance(file_type, int)
    assert set(fmt_gguf._FALLBACK) | set(fmt_gguf._FALLBACK.values()) <= set(R.TYPES)
    for name in _NAMES:
        for shape in _SHAPES:
            for tied in (False, True):
                t = fmt_gguf.tensor_type(name, shape, 30, mix, tied_embeddings=tied)
                assert t in R.TYPES, (mix, name, shape, t)
                assert len(shape) < 2 or shape[-1] % R.BLOCK[R.TYPES[t]][0] == 0, (mix, name, shape, t)


def test_q4_0_mix_is_llama_cpp_file_type_2():
    """LLAMA_FTYPE_MOSTLY_Q4_0: every linear Q4_0, the output matrix (or the tied token_embd) Q6_K, falling back to
    Q8_0 where 256 does not divide the row (llama.cpp's tensor_type_fallback)."""
    t = fmt_gguf.tensor_type
    assert fmt_gguf.MIXES["Q4_0"] == ("Q4_0", 2)
    for name in ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.29.ffn_down.weight",
                 "blk.7.attn_output.weight", "token_embd.weight"]:
        assert t(name, (4096, 4096), 30, "Q4_0") == "Q4_0", name
    assert t("output.weight", (32000, 4096), 30, "Q4_0") == "Q6_K"
    assert t("token_embd.weight", (32000, 4096), 30, "Q4_0", tied_embeddings=True) == "Q6_K"
    assert t("token_embd.weight", (49152, 576), 30, "Q4_0", tied_embeddings=True) == "Q8_0"  # SmolLM2: 576 % 256
    assert t("blk.0.attn_norm.weight", (576,), 30, "Q4_0") == "F32"
    with pytest.raises(NotImplementedError, match="imatrix is not supported for the Q4_0 mix"):
        fmt_gguf.export_gguf(None, "unused.gguf", "Q4_0", imatrix={})


# ---- minifloat formats -----------------------------------------------------------------------------------------


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal including the sign of zeros and infinities; NaN where the other is NaN (payloads may differ)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan]) and \
        torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))


def test_minifloat_table_ids_and_names():
    assert [f.id for f in MF.FORMATS] == list(range(len(MF.FORMATS)))  # float8.h MiniFloatId, dense
    assert ref8.FP8_DTYPES == tuple(f.dtype for f in MF.FP8)
    assert tuple(ref4.ELEMENTS) == tuple(f.name for f in MF.FP4_ELEMENTS)
    assert all(f.name == str(f.dtype).replace("torch.", "") for f in MF.FP8)


@pytest.mark.parametrize("f", MF.FP8, ids=lambda f: f.name)
def test_fp8_table_matches_torch(f):
    torch_values = torch.arange(256, dtype=torch.uint8).view(f.dtype).float()
    assert _same_values(f.values(), torch_values)
    assert f.max == torch.finfo(f.dtype).max == ref8.FP8_MAX[f.dtype]


def test_fp4_table_matches_the_ocp_e2m1_values_and_the_reference():
    e2m1 = MF.BY_NAME["e2m1"]
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX v1.0 sec. 5.3.3
    assert e2m1.values().tolist() == mags + [-m for m in mags] and e2m1.emax == 2
    for f in MF.FP4_ELEMENTS:
        assert _same_values(f.values(), ref4.element_values(f.name)), f.name
        assert f.emax == ref4.element_emax(f.name)


@needs_extension
@pytest.mark.parametrize("f", MF.FP8, ids=lambda f: f.name)
def test_cpp_fp8_codes_follow_the_table(f):
    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    one = torch.ones(1, 1)
    dec = torch.ops.qkernels.dequantize_fp8(codes, one, f.dtype, 16, 16, torch.float32)
    assert _same_values(dec.flatten(), f.values())
    finite = torch.isfinite(f.values())
    v = f.values()[finite].reshape(1, -1)
    for saturate in (True, False):
        q, _ = torch.ops.qkernels.quantize_fp8(v, one, f.dtype, 1, v.shape[1], saturate)
        assert torch.equal(q.flatten(), torch.arange(256, dtype=torch.uint8)[finite])
    # just past the largest finite value: max_code when saturating; the table's overflow code otherwise
    big = torch.tensor([[2.0 * f.max, -2.0 * f.max]])
    q, _ = torch.ops.qkernels.quantize_fp8(big, one, f.dtype, 1, 2, True)
    sign = 1 << (f.ebits + f.mbits)
    assert q.tolist() == [[f.max_code, f.max_code | sign]]
    q, _ = torch.ops.qkernels.quantize_fp8(big, one, f.dtype, 1, 2, False)
    back = f.values()[q.flatten().long()]
    assert (back.isinf().all() and back[0] > 0 > back[1]) if f.has_inf else back.isnan().all()


@needs_extension
@pytest.mark.parametrize("f", MF.FP4_ELEMENTS, ids=lambda f: f.name)
def test_cpp_fp4_codes_follow_the_table(f):
    packed = torch.arange(16, dtype=torch.uint8)
    packed = (packed | (packed.flip(0) << 4)).reshape(1, 16)
    dec = torch.ops.qkernels.fp4_decode(packed, f.name, torch.float32)
    want = torch.stack([f.values(), f.values().flip(0)], -1).reshape(1, 32)
    assert _same_values(dec, want)
    assert torch.equal(torch.ops.qkernels.fp4_encode(want, f.name), packed)
    big = torch.tensor([[2.0 * f.max, -2.0 * f.max]])  # saturates: no inf / NaN
    assert torch.ops.qkernels.fp4_encode(big, f.name).tolist() == [[f.max_code | ((f.max_code | 8) << 4)]]


@needs_extension
def test_cpp_minifloat_error_texts_name_the_table():
    with pytest.raises(RuntimeError) as e:
        torch.ops.qkernels.fp4_encode(torch.zeros(1, 2), "e3m0")
    listed = str(e.value).split("element must be ")[1].split(", got")[0]
    assert re.findall(r"'(\w+)'", listed) == [f.name for f in MF.FP4_ELEMENTS]
    with pytest.raises(RuntimeError) as e:
        torch.ops.qkernels.dequantize_fp8(torch.zeros(1, 1, dtype=torch.uint8), torch.ones(1, 1), torch.float16, 1,
                                          1, torch.float32)
    listed = str(e.value).split("dtype must be one of ")[1].split(", got")[0]
    assert listed.split(", ") == [f.name for f in MF.FP8]
    if hasattr(torch, "float8_e8m0fnu"):  # an fp8 dtype torch has and the table does not: refused by name
        with pytest.raises(RuntimeError, match="dtype must be one of"):
            torch.ops.qkernels.dequantize_fp8(torch.zeros(1, 1, dtype=torch.uint8), torch.ones(1, 1),
                                              torch.float8_e8m0fnu, 1, 1, torch.float32)



def test_fp4_elements_fit_the_avx2_decode():
    """csrc/cpu/float_kernels.h Fp4Decode looks up 2 * value as an int8 (exact): a new element whose values are not
    multiples of 0.5 within int8 / 2 needs another decode there, and this test says so."""
    for f in MF.FP4_ELEMENTS:
        twice = 2 * f.values()
        assert torch.equal(twice, twice.round()) and float(twice.abs().max()) <= 127, f.name
