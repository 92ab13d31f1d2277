"""llama.cpp's own quantizers as an oracle: build ggml-quants.c (from a llama.cpp checkout) into a small shared
library and call ``quantize_<type>`` through ctypes.

    python -m benchmarks.gguf_llamacpp_oracle /path/to/llama.cpp          # writes tests/data/gguf_llamacpp_golden.npz

The fixture holds seeded inputs, an importance matrix and llama.cpp's bytes for every type, with and without the
imatrix; tests/test_gguf.py checks our encoders against it byte for byte. It is built with -O2 and no -march (so no
FMA contraction), exactly like a default llama.cpp reference build on x86-64.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IMATRIX_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def build(llama_cpp: str) -> ctypes.CDLL:
    out = os.path.join(tempfile.mkdtemp(), "libggmlquants.so")
    src = os.path.join(llama_cpp, "ggml", "src")
    subprocess.check_call(["gcc", "-O2", "-fPIC", "-shared", f"-I{llama_cpp}/ggml/include", f"-I{src}",
                           os.path.join(src, "ggml-quants.c"), os.path.join(HERE, "gguf_oracle_shim.c"), "-o", out,
                           "-lm"])
    return ctypes.CDLL(out)


def quantize(lib, x: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    from qkernels.reference.gguf import TYPES as IDS, row_bytes

    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(IDS[name], cols)), np.uint8)
    fn = getattr(lib, "quantize_" + name.lower().replace("_k", "_K"))
    fn.restype = ctypes.c_size_t
    xa = np.ascontiguousarray(x, np.float32)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    fn(xa.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(rows),
       ctypes.c_int64(cols), None if im is None else im.ctypes.data_as(ctypes.c_void_p))
    return out


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8 x 512 rows: gaussian, scaled, zero/constant blocks, Student-t(2) heavy tails, one-signed, tiny values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[1] *= 100
    x[2, :256] = 0
    x[3, :64] = 1.5
    x[4] = rng.standard_t(2.0, 512)
    x[5, :300] = np.abs(x[5, :300])
    x[6] *= 1e-3
    x[7, ::37] *= 30  # outliers
    imatrix = (rng.random(512) * 3).astype(np.float32)
    return x.astype(np.float32), imatrix


def main(argv):
    if len(argv) != 1:
        sys.exit(__doc__)
    lib = build(argv[0])
    x, im = inputs()
    arrays = {"x": x, "imatrix": im}
    for name in TYPES:
        arrays[name] = quantize(lib, x, name)
        if name in IMATRIX_TYPES:
            arrays[name + "_imatrix"] = quantize(lib, x, name, im)
    path = os.path.join(HERE, "..", "tests", "data", "gguf_llamacpp_golden.npz")
    np.savez_compressed(path, **arrays)
    print("wrote", os.path.normpath(path), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main(sys.argv[1:])
