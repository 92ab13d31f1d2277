"""`import qkernels` works without the compiled extension: a warning, then the reference paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_extension_falls_back_to_reference():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["qkernels._C"] = None          # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import qkernels
        assert not qkernels.HAS_EXTENSION
        assert any("compiled extension not loaded" in str(w.message) for w in caught), caught
        import torch
        from qkernels.reference import int_quant as ref
        d = qkernels.explain("int4_weight_only_mm", "cpu")
        assert d.backend == "reference", d
        w = torch.randn(8, 64)
        q, s, z = qkernels.quantize_affine(w, 4, 32, False)
        s2, z2 = ref.choose_qparams_affine(w, 4, 32, False, True, False)
        assert torch.equal(s, s2) and torch.equal(z, z2)
        y = qkernels.int4_weight_only_mm(torch.randn(3, 64), qkernels.pack_int4(q), s, z, 32)
        assert y.shape == (3, 8) and torch.isfinite(y).all()
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
