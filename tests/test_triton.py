"""Triton kernels (qkernels/triton/) against the reference on CPU, under TRITON_INTERPRET=1.

The cases live in tests/triton_interpret_cases.py (integer ops), tests/triton_interpret_float_cases.py (fp8 /
fp4 casts), tests/triton_interpret_gguf_cases.py (GGUF decode) and tests/triton_interpret_numerics_cases.py
(extreme magnitudes, inf/NaN) and run in a subprocess whose environment has
TRITON_INTERPRET=1 before triton is first imported (see that file for why). Budget: well under 90 s on a 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=3",
           str(ROOT / "tests" / "triton_interpret_cases.py"), str(ROOT / "tests" / "triton_interpret_float_cases.py"),
           str(ROOT / "tests" / "triton_interpret_gguf_cases.py"),
           str(ROOT / "tests" / "triton_interpret_numerics_cases.py")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:])
    assert r.returncode == 0, f"interpreter cases failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout
