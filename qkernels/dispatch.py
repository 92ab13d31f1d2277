"""The one dispatch table: (op, device kind + capability, dtypes) -> backend, with the reason.

Backends, in the order they are preferred:

* ``cuda``      a kernel compiled into ``qkernels._C`` for this GPU arch (csrc/cuda/)
* ``triton``    a Triton kernel (qkernels/triton/) - the fallback on NVIDIA and the path on ROCm
* ``native``    torch's own hardware op (``torch._scaled_mm`` and friends) where the chip has the format
* ``cpu``       the C++ kernel in csrc/cpu/ (CPU tensors)
* ``reference`` the plain-PyTorch specification (qkernels/reference/), always available

Every op lists its candidate rules in :data:`TABLE`; the first rule whose check passes wins. ``backend=`` arguments
and the ``QKERNELS_BACKEND`` environment variable force a backend (a clear error when it cannot run).
:func:`explain` says what would run and why. Tests mock the device with :func:`mock_device`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _ext
from .reference import gguf as ref_gguf

BACKENDS = ("cuda", "triton", "native", "cpu", "reference")


@dataclass(frozen=True)
class DeviceInfo:
    """What the dispatch table needs to know about a device."""

    kind: str  # "cpu", "cuda" (NVIDIA) or "rocm" (AMD)
    capability: tuple[int, int] | None = None  # NVIDIA compute capability, e.g. (9, 0)
    arch: str | None = None  # ROCm gfx name, e.g. "gfx942"

    def __str__(self) -> str:
        if self.kind == "cuda":
            return f"cuda sm{self.capability[0]}{self.capability[1]}"
        if self.kind == "rocm":
            return f"rocm {self.arch}"
        return "cpu"


_MOCK: DeviceInfo | None = None


@contextlib.contextmanager
def mock_device(info: DeviceInfo | str):
    """Pretend every device is ``info`` (tests): "cpu", "sm80", "sm90", "sm100", "gfx942", "gfx90a", or a DeviceInfo."""
    global _MOCK
    if isinstance(info, str):
        info = parse_device(info)
    old, _MOCK = _MOCK, info
    try:
        yield info
    finally:
        _MOCK = old


def parse_device(name: str) -> DeviceInfo:
    if name == "cpu":
        return DeviceInfo("cpu")
    if name.startswith("sm"):
        digits = name[2:].rstrip("a")
        return DeviceInfo("cuda", (int(digits[:-1]), int(digits[-1])))
    if name.startswith("gfx"):
        return DeviceInfo("rocm", arch=name)
    raise ValueError(f"device must be 'cpu', 'smXY' or 'gfxNNN', got {name!r}")


def device_info(device: torch.device | str | None = None) -> DeviceInfo:
    if _MOCK is not None:
        return _MOCK
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo("cpu")
    if torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        return DeviceInfo("rocm", arch=arch)
    return DeviceInfo("cuda", torch.cuda.get_device_capability(device))


def triton_available(dev: DeviceInfo, ctx: dict | None = None) -> tuple[bool, str]:
    ctx = ctx or {}
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if dev.kind == "cpu":
        # the interpreter is for testing kernels on CPU: never chosen on its own over the C++ CPU kernel
        if os.environ.get("TRITON_INTERPRET") == "1" and ctx.get("forced") == "triton":
            return True, "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (forced)"
        return False, "Triton needs a GPU (on CPU only when forced, under TRITON_INTERPRET=1)"
    return True, "triton is installed"


@dataclass(frozen=True)
class Rule:
    """One candidate: ``check(dev, ctx) -> (ok, why)``. ``ctx`` carries dtypes/shapes the op passes in."""

    backend: str
    check: Callable[[DeviceInfo, dict], tuple[bool, str]]


@dataclass
class Decision:
    op: str
    device: DeviceInfo
    backend: str
    reason: str
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (backend, why not)
    forced: bool = False

    def __str__(self) -> str:
        lines = [f"{self.op} on {self.device}: {self.backend} ({self.reason})" + (" [forced]" if self.forced else "")]
        for b, why in self.rejected:
            lines.append(f"  not {b}: {why}")
        return "\n".join(lines)


# ---- reusable checks -----------------------------------------------------------------------------------------


def arch_runs(capability: tuple[int, int], built: list[str]) -> bool:
    """Whether a build for TORCH_CUDA_ARCH_LIST entries ``built`` ("8.0", "9.0a", "10.0a+PTX") has code that runs
    on a GPU of ``capability``: SASS runs on the same major with an equal or higher minor, "a"/"f" archs only on
    exactly their own capability (their instructions are not forward compatible), PTX on anything newer."""
    for entry in built:
        e = entry.strip()
        ptx = e.endswith("+PTX")
        e = e.replace("+PTX", "")
        specific = e.endswith(("a", "f"))
        try:
            major, minor = (int(v) for v in e.rstrip("af").split("."))
        except ValueError:
            continue
        if ptx and tuple(capability) >= (major, minor):
            return True
        if specific and tuple(capability) == (major, minor):
            return True
        if not specific and capability[0] == major and capability[1] >= minor:
            return True
    return False


def compiled(op: str, archs: Callable[[DeviceInfo, dict], tuple[bool, str]] | None = None):
    """The C++ extension has a CUDA kernel for ``op``, built for this GPU's arch, and, if given,
    ``archs(dev, ctx)`` accepts this GPU."""

    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        if dev.kind != "cuda":
            return False, f"no compiled kernel for {dev.kind} devices"
        if not ctx.get("assume_compiled"):
            if not _ext.has_kernel(op, "CUDA"):
                return False, "qkernels._C was built without a CUDA kernel for this op"
            built = _ext.compiled_cuda_archs()
            if built and not arch_runs(dev.capability, built):
                return False, f"qkernels._C was built for {';'.join(built)}, which has no code for {dev}"
        if archs is not None:
            return archs(dev, ctx)
        return True, "compiled CUDA kernel"

    return check


def on_triton(op: str):
    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        from . import triton as qtriton

        why_not = qtriton.unsupported(op, ctx)  # the backend's own declaration of what it implements
        if why_not is not None:
            return False, why_not
        return triton_available(dev, ctx)

    return check


def on_cpu(op: str):
    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        if dev.kind != "cpu":
            return False, "the C++ CPU kernel takes CPU tensors only"
        if not _ext.has_kernel(op, "CPU"):
            return False, "qkernels._C is not loaded"
        return True, "C++ CPU kernel"

    check.plain_cpu = True  # accepts every CPU call whatever the shapes: see cpu_fast_path
    return check


def always(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    return True, "plain-PyTorch reference (always available)"


def min_sm(major: int, minor: int = 0):
    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        if dev.capability is None or dev.capability < (major, minor):
            return False, f"needs sm{major}{minor}+, this is {dev}"
        return True, f"compiled CUDA kernel for sm{major}{minor}+"

    return check


# the tensor-core decode kernels of csrc/cuda/int_gemm.cu take at most this many rows of x (launchers.h kMmaMaxM)
CUDA_MMA_MAX_M = 64


def int_gemm_cuda_path(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    """The integer weight-only GEMMs on CUDA (sm80+). The C++ host code then picks, per call, the tensor-core decode
    kernel or dequantize + cuBLAS (csrc/cuda/int_gemm_ops.cpp decode_path); this check only says which, from the
    ``dtype``, ``M``, ``K`` and ``group_size`` the op passes, so ``explain`` shows it."""
    ok, why = min_sm(8, 0)(dev, ctx)
    if not ok:
        return ok, why
    dtype, M, K, g = ctx.get("dtype"), ctx.get("M"), ctx.get("K"), ctx.get("group_size", 32)
    if dtype is None or M is None or K is None:
        return True, f"{why} (tensor-core decode kernel or dequantize + cuBLAS, chosen per call in C++)"
    blockers = [b for b, bad in (
        (f"x is {str(dtype).replace('torch.', '')}, not bf16/fp16", dtype not in (torch.bfloat16, torch.float16)),
        (f"M={M} > {CUDA_MMA_MAX_M}", M > CUDA_MMA_MAX_M),
        (f"K={K} or group_size={g} not a multiple of 32", K % 32 or g % 32)) if bad]
    if blockers:
        return True, f"{why}: dequantize + cuBLAS ({'; '.join(blockers)})"
    return True, f"{why}: tensor-core decode kernel (M <= {CUDA_MMA_MAX_M}, 16-byte aligned operands; direct or " \
                 f"split-K by grid size)"


def gguf_cpu(op: str):
    """The C++ GGUF kernels, for the ggml types the type table says they implement (all of them today)."""

    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        ok, why = on_cpu(op)(dev, ctx)
        t = ctx.get("type")
        if ok and t is not None and t not in ref_gguf.types_with("cpu", op):
            return False, f"no C++ kernel for ggml type {ref_gguf.TYPE_NAMES.get(t, t)}"
        return ok, why

    # cpu_fast_path may skip choose only if no ggml type is refused here
    check.plain_cpu = set(ref_gguf.types_with("cpu", op)) == set(ref_gguf.GGML)
    return check


def gguf_rules(op: str) -> list[Rule]:
    """standard_rules with the CPU step limited to the ggml types the C++ kernels implement."""
    return [Rule("cpu", gguf_cpu(op)) if r.backend == "cpu" else r for r in standard_rules(op)]


def standard_rules(op: str, cuda_archs=None) -> list[Rule]:
    """cuda -> triton -> cpu -> reference: the chain of every op that has no torch-native counterpart."""
    return [
        Rule("cuda", compiled(op, cuda_archs)),
        Rule("triton", on_triton(op)),
        Rule("cpu", on_cpu(op)),
        Rule("reference", always),
    ]


# ---- fp8 / fp4 hardware support (torch._scaled_mm) ---------------------------------------------------------------
_OCP_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FNUZ_FP8 = (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
# ROCm archs whose fp8 matrix cores take the fnuz encodings (MI300 family) / the OCP ones (MI350)
_ROCM_FP8 = {"gfx942": _FNUZ_FP8, "gfx950": _OCP_FP8}


def fp8_native(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    """torch._scaled_mm for fp8: sm89+ (OCP e4m3fn/e5m2) and gfx942 (fnuz), tensor-wise or row-wise scales."""
    a_dt, b_dt = ctx.get("a_dtype"), ctx.get("b_dtype")
    gran = ctx.get("granularity", "tensor")
    if dev.kind == "cuda":
        if dev.capability < (8, 9):
            return False, f"fp8 tensor cores need sm89+ (Ada/Hopper/Blackwell), this is {dev}"
        dtypes = _OCP_FP8
    elif dev.kind == "rocm":
        if dev.arch not in _ROCM_FP8:
            return False, f"{dev.arch} has no fp8 matrix cores (gfx942/gfx950 do)"
        dtypes = _ROCM_FP8[dev.arch]
    else:
        return False, "torch._scaled_mm needs an fp8-capable GPU"
    names = "/".join(str(d).replace("torch.", "") for d in dtypes)
    if a_dt is not None and (a_dt not in dtypes or b_dt not in dtypes):
        return False, f"{dev} takes {names} operands, got {a_dt} x {b_dt}"
    if a_dt is not None and a_dt == b_dt and a_dt in (torch.float8_e5m2, torch.float8_e5m2fnuz):
        return False, "torch._scaled_mm does not multiply e5m2 by e5m2 (one operand must be e4m3)"
    if ctx.get("K", 16) % 16 or ctx.get("N", 16) % 16:
        return False, f"torch._scaled_mm needs K and N divisible by 16, got K={ctx.get('K')}, N={ctx.get('N')}"
    if gran == "row":
        # row-wise scaling is the CUTLASS sm90 kernel with bf16 output in torch; elsewhere keep the emulation
        if dev.kind != "cuda" or dev.capability[0] != 9:
            return False, f"row-wise fp8 scales run natively on sm90 only here, this is {dev}"
        if ctx.get("out_dtype", torch.bfloat16) != torch.bfloat16:
            return False, "row-wise torch._scaled_mm produces bfloat16 only; use out_dtype=torch.bfloat16"
    elif gran == "block":
        return fp8_native_blockwise(dev, ctx)
    return True, f"torch._scaled_mm ({names}, {gran}-wise scales) on {dev}"


def _cuda_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def fp8_native_blockwise(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    """DeepSeek-V3-style block scales on sm90: torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 for the
    activation and BlockWise1x128 / BlockWise128x128 for the weight (cuBLASLt 12.9+, bf16 output; the recipes torch's
    own scaled_mm tests run on sm90). Other block shapes, archs and dtypes keep the emulation."""
    if dev.kind != "cuda" or dev.capability != (9, 0):
        return False, f"block-wise fp8 scales run natively on sm90 only (cuBLAS block-wise recipes), this is {dev}"
    if not hasattr(torch.nn.functional, "scaled_mm") or not _cuda_at_least(12, 9):
        return False, f"native block-wise fp8 needs torch.nn.functional.scaled_mm and CUDA 12.9+, have torch " \
                      f"{torch.__version__} with CUDA {torch.version.cuda}"
    a_blocks, b_blocks = ctx.get("a_blocks"), ctx.get("b_blocks")
    if a_blocks is None or b_blocks is None:
        return False, "block shapes not given (a_blocks, b_blocks): native block-wise fp8 not considered"
    if tuple(a_blocks) != (1, 128) or tuple(b_blocks) not in ((1, 128), (128, 128)):
        return False, f"native block-wise fp8 takes 1x128 activation blocks and 1x128 or 128x128 weight blocks, got " \
                      f"{tuple(a_blocks)} and {tuple(b_blocks)}"
    if ctx.get("a_dtype", torch.float8_e4m3fn) != torch.float8_e4m3fn or ctx.get(
            "b_dtype", torch.float8_e4m3fn) != torch.float8_e4m3fn:
        return False, "native block-wise fp8 takes float8_e4m3fn operands"
    if tuple(b_blocks) == (128, 128) and ctx.get("K", 512) % 512:
        # 128x128 weight scales are laid out with K/128 padded to a multiple of 4; keep to shapes that need no padding
        return False, f"native 128x128 block-wise fp8 needs K % 512 == 0 here, got K={ctx.get('K')}"
    if ctx.get("out_dtype", torch.bfloat16) != torch.bfloat16:
        return False, "block-wise scaled_mm produces bfloat16 only; use out_dtype=torch.bfloat16"
    return True, f"torch.nn.functional.scaled_mm (block-wise 1x128 x {b_blocks[0]}x{b_blocks[1]}) on {dev}"


def fp4_native(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    """Block-scaled torch._scaled_mm (MXFP4 / NVFP4 e2m1 operands) on sm100 (Blackwell datacenter)."""
    if dev.kind != "cuda" or dev.capability is None or dev.capability[0] != 10:
        return False, f"block-scaled fp4 tensor cores need sm100, this is {dev}"
    if ctx.get("element", "e2m1") != "e2m1":
        return False, f"hardware fp4 is e2m1; element {ctx.get('element')!r} is emulated"
    if ctx.get("K", 32) % 32 or ctx.get("N", 16) % 16:
        return False, f"block-scaled torch._scaled_mm needs K % 32 == 0 and N % 16 == 0, got K={ctx.get('K')}, " \
                      f"N={ctx.get('N')}"
    return True, f"block-scaled torch._scaled_mm ({ctx.get('format', 'mxfp4')}) on {dev}"


def emulated(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
    return True, "emulated: decode to fp32 and matmul in plain PyTorch (qkernels.reference)"


def unless_native(native):
    """For the emulated CUDA GEMMs (decode + cuBLAS sgemm): only where the hardware path cannot run (or when forced)."""

    def check(dev: DeviceInfo, ctx: dict) -> tuple[bool, str]:
        if ctx.get("forced") == "cuda":
            return True, "emulated CUDA kernel (forced)"
        ok, why = native(dev, ctx)
        if ok:
            return False, "the hardware path runs here; the CUDA kernel is only the emulation"
        return True, f"emulated CUDA kernel (decode + cuBLAS sgemm): {why}"

    return check


def scaled_mm_rules(op: str, native) -> list[Rule]:
    """cuda (emulation, where native cannot run) -> triton -> native torch._scaled_mm -> C++ CPU emulation ->
    plain-PyTorch emulation."""
    return [
        Rule("cuda", compiled(op, unless_native(native))),
        Rule("triton", on_triton(op)),
        Rule("native", native),
        Rule("cpu", on_cpu(op)),
        Rule("reference", emulated),
    ]


# ---- the table -----------------------------------------------------------------------------------------------
# Families add their ops here (and only here). Keep one line of "why" per non-standard rule.
TABLE: dict[str, list[Rule]] = {
    # integer quantization and packing (qkernels/ops/int_quant.py)
    "choose_qparams_affine": standard_rules("choose_qparams_affine"),
    "quantize_affine": standard_rules("quantize_affine"),
    "dequantize_affine": standard_rules("dequantize_affine"),
    "pack_int4": standard_rules("pack_int4"),
    "unpack_int4": standard_rules("unpack_int4"),
    # integer dequant-GEMMs (qkernels/ops/int_gemm.py); tensor-core kernels need mma.sync (sm80+)
    "int4_weight_only_mm": standard_rules("int4_weight_only_mm", int_gemm_cuda_path),
    "int8_weight_only_mm": standard_rules("int8_weight_only_mm", int_gemm_cuda_path),
    "quantize_per_token_int8": standard_rules("quantize_per_token_int8"),
    "int8_dynamic_mm": standard_rules("int8_dynamic_mm", min_sm(8, 0)),
    # no CUDA kernel of its own: on GPUs the Triton composite (x quantized, then the W4A16 Triton kernel)
    "int8_dynamic_int4_mm": [r for r in standard_rules("int8_dynamic_int4_mm") if r.backend != "cuda"],
    # fp8 casts (qkernels/ops/float8.py): CUDA (hardware cvt for saturating e4m3fn/e5m2 on sm89+, software
    # elsewhere), Triton (software conversion; the ROCm path), C++ CPU
    "quantize_fp8": standard_rules("quantize_fp8"),
    "dequantize_fp8": standard_rules("dequantize_fp8"),
    # fp8 GEMM: torch._scaled_mm on sm89/sm90/sm100 and gfx942 (fnuz), block-wise scaled_mm on sm90; emulated
    # (CUDA decode + cuBLAS on NVIDIA, plain PyTorch on ROCm) where those cannot run
    "fp8_mm": scaled_mm_rules("fp8_mm", fp8_native),
    # weight-only fp8 GEMM: fused decode kernel on CPU; CUDA decodes the weight (cast kernel) for cuBLAS; Triton
    # decodes by table lookup inside the integer GEMM's tiles (qkernels/triton/float_gemm.py, the ROCm path)
    "fp8_weight_only_mm": standard_rules("fp8_weight_only_mm"),
    # fp4 elements and MXFP4/NVFP4 blocks (qkernels/ops/float4.py): CUDA (e2m1 cvt on sm100a), Triton, C++ CPU
    "fp4_encode": standard_rules("fp4_encode"),
    "fp4_decode": standard_rules("fp4_decode"),
    "quantize_fp4": standard_rules("quantize_fp4"),
    "dequantize_fp4": standard_rules("dequantize_fp4"),
    # fp4 GEMM: block-scaled torch._scaled_mm on sm100, emulated (CUDA decode + cuBLAS) on sm90 and below
    "fp4_mm": scaled_mm_rules("fp4_mm", fp4_native),
    "fp4_weight_only_mm": standard_rules("fp4_weight_only_mm"),
    # GGUF block formats (qkernels/ops/gguf.py)
    # Triton: decode kernel (qkernels/triton/gguf.py) for the block types (its has_kernel says which); gguf_mm
    # decodes then calls torch matmul. The types each backend implements: qkernels.reference.gguf.GGML_TYPES
    "gguf_quantize": [Rule("cpu", gguf_cpu("gguf_quantize")), Rule("reference", always)],
    "gguf_dequantize": gguf_rules("gguf_dequantize"),
    "gguf_mm": gguf_rules("gguf_mm"),
    # decode attention (qkernels/ops/attention.py): C++ on CPU; elsewhere the plain-PyTorch reference (a GPU decoder
    # has fused attention kernels of its own: sdpa / flash attention)
    "decode_attention": [Rule("cpu", on_cpu("decode_attention")), Rule("reference", always)],
}


def _forced(backend: str | None) -> str | None:
    b = backend or os.environ.get("QKERNELS_BACKEND") or None
    if b is not None and b not in BACKENDS:
        src = "backend" if backend else "QKERNELS_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {b!r}")
    return b


def choose(op: str, device: torch.device | str | None = None, backend: str | None = None, **ctx) -> Decision:
    """Pick the backend for ``op`` on ``device``; ``backend`` (or QKERNELS_BACKEND) forces one."""
    if op not in TABLE:
        raise ValueError(f"op must be one of {sorted(TABLE)}, got {op!r}")
    dev = device_info(device)
    forced = _forced(backend)
    ctx["forced"] = forced
    rejected = []
    for rule in TABLE[op]:
        if forced is not None and rule.backend != forced:
            continue
        ok, why = rule.check(dev, ctx)
        if ok:
            return Decision(op, dev, rule.backend, why, rejected, forced=forced is not None)
        rejected.append((rule.backend, why))
    if forced is not None:
        whys = "; ".join(w for _, w in rejected) or "the op has no such backend"
        raise RuntimeError(f"backend {forced!r} was forced for {op} but cannot run on {dev}: {whys}")
    raise RuntimeError(f"no backend can run {op} on {dev}: {rejected}")  # unreachable: reference always works


def shape_class(ctx: dict) -> tuple:
    """The part of an op's context a cached decision may depend on (ops/_call.py compiled_op): every value except
    M, which is reduced to its power-of-two class (decode M=1, small batches, prefill), so a cache keyed by it stays
    small. A rule must not distinguish two Ms of the same class (none reads M today)."""
    return tuple((k, (1 << (v - 1).bit_length()) if k == "M" and isinstance(v, int) and v > 0 else v)
                 for k, v in ctx.items())


_CPU_FAST: dict[str, bool] = {}


def cpu_fast_path(op: str) -> bool:
    """True when an unforced call of ``op`` with CPU tensors always runs the C++ CPU kernel, so the caller may skip
    ``choose`` (~10 us a call; decode-sized GEMMs take ~1 ms). That holds when the table's rules before the plain
    CPU rule reject every CPU device whatever the context (the CUDA, Triton and native rules all do: Triton runs on
    CPU tensors only when forced) and the kernel is compiled. Not under ``mock_device`` or QKERNELS_BACKEND: the
    caller checks those. tests/test_dispatch.py checks this against ``choose`` for every op."""
    ok = _CPU_FAST.get(op)
    if ok is None:
        ok = False
        for rule in TABLE.get(op, ()):
            if getattr(rule.check, "plain_cpu", False):
                ok = _ext.has_kernel(op, "CPU")
                break
            if rule.backend not in ("cuda", "triton", "native"):
                break  # a rule that might accept CPU tensors comes first: always ask choose
        _CPU_FAST[op] = ok
    return ok


def explain(op: str, device: torch.device | str | None = None, **ctx) -> Decision:
    """What would run for ``op`` on ``device`` and why (``print()`` the result for a readable summary)."""
    return choose(op, device, **ctx)
