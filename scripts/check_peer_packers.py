"""Cross-check qkernels' GPTQ/AWQ converters against the quantizers' own code (one-off, not part of CI).

Neither package installs on a CPU-only CI machine (GPTQModel builds CUDA extensions and pulls many runtime deps,
AutoAWQ needs accelerate/datasets and pins torch), so this script loads only the pure-PyTorch packing/unpacking
functions from their source distributions:

    pip download --no-deps gptqmodel==7.7.0 autoawq==0.2.9 -d /tmp/peer && cd /tmp/peer && tar xzf *.tar.gz ...
    PYTHONPATH=. python scripts/check_peer_packers.py /tmp/peer/gptqmodel-7.7.0 /tmp/peer/autoawq-0.2.9

* GPTQModel ``BaseQuantLinear.dequantize_weight`` (gptqmodel/nn_modules/qlinear/__init__.py; v2 zero points) is run
  on fixtures written by tests/formats_fixtures.py (AutoGPTQ's pack loop): 2/3/4/8 bits, act-order.
* AutoAWQ ``WQLinear_GEMM.from_linear`` packs a layer; its words must equal tests/formats_fixtures.autoawq_pack's,
  and ``awq.utils.packing_utils.dequantize_gemm`` must equal qkernels' dequantized weight.
"""

import ast
import os
import shutil
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from formats_fixtures import awq_layer, gptq_layer  # noqa: E402

from qkernels.formats import awq, gptq  # noqa: E402


def _methods(path, cls_names, names):
    src = open(path).read()
    tree = ast.parse(src)
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in cls_names:
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name in names and f.name not in out:
                    out[f.name] = ast.get_source_segment(src, f)
    return out


def check_gptqmodel(root):
    path = os.path.join(root, "gptqmodel", "nn_modules", "qlinear", "__init__.py")
    srcs = _methods(path, {"BaseQuantLinear", "PackableQuantLinear"},
                    {"dequantize_weight", "_dequantize_from_codes", "_init_wf_unsqueeze_buffers"})
    ns = {"t": torch, "_torch_right_shift": torch.bitwise_right_shift, "_torch_left_shift": torch.bitwise_left_shift}
    for name, s in srcs.items():
        exec(compile(__import__("textwrap").dedent(s), path, "exec"), ns)

    class Fake(nn.Module):
        dequantize_weight = ns["dequantize_weight"]
        _dequantize_from_codes = ns["_dequantize_from_codes"]
        _init_wf_unsqueeze_buffers = ns["_init_wf_unsqueeze_buffers"]

        def _wf_device(self):
            return "cpu"

    n = 0
    for bits in (2, 3, 4, 8):
        for act_order in (False, True):
            for sym in (False, True):
                K, N = 128, 64
                tensors, w = gptq_layer(K, N, bits, 32, sym, act_order, True, seed=bits)
                f = Fake()
                f.qweight, f.qzeros, f.scales, f.g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
                f.bits, f.maxq, f.pack_factor, f.pack_dtype_bits = bits, 2**bits - 1, 32 // bits, 32
                f.dequant_dtype, f.planar, f.enable_wf_unsqueeze, f.in_features = torch.int32, False, True, K
                theirs = f.dequantize_weight().T  # [N, K], fp16: GPTQModel multiplies in the scales' dtype
                cfg = gptq.parse_config({"bits": bits, "group_size": 32, "checkpoint_format": "gptq_v2"})
                ours = gptq.convert_layer("l", {f"l.{k}": v for k, v in tensors.items()}, cfg).dequantize()
                # w and ours are the exact products in fp32 (fp16 scale x small int); fp16 rounds them once
                assert theirs.dtype == torch.float16
                assert torch.equal(theirs, w.half()), (bits, act_order, sym, "fixture vs GPTQModel")
                assert torch.equal(ours, w) and torch.equal(ours.half(), theirs), (bits, act_order, sym)
                n += 1
    print(f"GPTQModel dequantize_weight (fp16) == qkernels (fp32, rounded to fp16) == fixture: {n} layers "
          "(2/3/4/8 bits, act-order, sym/asym)")


def check_autoawq(root):
    tmp = tempfile.mkdtemp()
    pkg = os.path.join(tmp, "awq")
    for sub in ("", "modules", "modules/linear", "utils"):
        os.makedirs(os.path.join(pkg, sub), exist_ok=True)
        open(os.path.join(pkg, sub, "__init__.py"), "w").close()
    for f in ("modules/linear/gemm.py", "utils/module.py", "utils/packing_utils.py"):
        shutil.copy(os.path.join(root, "awq", f), os.path.join(pkg, f))
    with open(os.path.join(pkg, "utils", "utils.py"), "w") as fh:  # the real one imports accelerate
        fh.write("def get_best_device():\n    return 'cpu'\n")
    sys.path.insert(0, tmp)
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    n = 0
    for gs in (32, 64):
        K, N = 128, 96
        tensors, w = awq_layer(K, N, gs, seed=gs)
        lin = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        zeros = awq.unpack_awq(tensors["qzeros"]).float()  # [G, N]
        mod = WQLinear_GEMM.from_linear(lin, 4, gs, scales=tensors["scales"].float(), zeros=zeros)
        assert torch.equal(mod.qweight, tensors["qweight"]), "AutoAWQ qweight words != fixture packer"
        assert torch.equal(mod.qzeros, tensors["qzeros"]), "AutoAWQ qzeros words != fixture packer"
        cfg = awq.parse_config({"bits": 4, "group_size": gs})
        ours = awq.convert_layer("l", {"l.qweight": mod.qweight, "l.qzeros": mod.qzeros, "l.scales": mod.scales},
                                 cfg).dequantize()
        theirs = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, 4, gs).float().T
        assert torch.equal(ours, w) and torch.equal(theirs.half().float(), theirs)
        assert torch.allclose(ours, theirs, rtol=1e-3, atol=0), "qkernels vs AutoAWQ dequantize_gemm"
        assert torch.equal(ours.half(), theirs.half())  # AutoAWQ dequantizes in fp16
        n += 1
    print(f"AutoAWQ from_linear words == fixture packer; dequantize_gemm == qkernels (fp16): {n} layers")


if __name__ == "__main__":
    check_gptqmodel(sys.argv[1])
    check_autoawq(sys.argv[2])
