"""GGUF block formats: reconstruction error per type, bits per weight of the llama.cpp mixes, encoder/decoder/GEMM
speed on CPU, and (--gpu) the Triton decode and gguf_mm on a GPU.

    python -m benchmarks.bench_gguf [--llama-cpp /path/to/llama.cpp] [--rows 256] [--gpu]

With --llama-cpp, llama.cpp's own quantizers (ggml-quants.c, built by benchmarks/gguf_llamacpp_oracle.py) encode the
same data and the table reports their RMSE and whether the bytes are identical to ours.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import qkernels
from qkernels import gguf as qg

TYPES = ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "MXFP4", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


def datasets(rows: int, cols: int = 4096):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # torch.distributions samples from the global generator
    gauss = torch.randn(rows, cols, generator=g)
    # "real-ish" weights: Student-t(3) (heavy tails like LLM weight matrices) with per-row scales spread 10x
    t = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    t = t * torch.exp(torch.randn(rows, 1, generator=g) * 0.6)
    return {"gaussian": gauss, "student-t(3)": t}


def rmse(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def timeit(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def error_table(rows: int, llama_cpp: str | None):
    lib = None
    if llama_cpp:
        from .gguf_llamacpp_oracle import build, quantize as ll_quantize

        lib = build(llama_cpp)
    data = datasets(rows)
    lines = ["| type | bits/weight | " + " | ".join(f"RMSE {k} (rel)" for k in data) +
             (" | llama.cpp RMSE (same data) | bytes identical |" if lib else " |"),
             "|---|---|" + "---|" * len(data) + ("---|---|" if lib else "")]
    for name in TYPES:
        bs, ts = qg.block_info(name)
        cells = [name, f"{ts * 8 / bs:.4f}"]
        ll_cells = []
        same = True
        for x in data.values():
            q = qg.quantize(x, name)
            y = qg.dequantize(q, name, x.shape)
            e = rmse(x, y)
            cells.append(f"{e:.5g} ({e / float(x.double().pow(2).mean().sqrt()):.4f})")
            if lib:
                ll = ll_quantize(lib, x.numpy(), name)
                same &= bool((ll == q.numpy()).all())
                ly = qg.dequantize(torch.from_numpy(ll), name, x.shape)
                ll_cells.append(f"{rmse(x, ly):.5g}")
        if lib:
            cells += [" / ".join(ll_cells), "yes" if same else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def imatrix_table(rows: int):
    """Importance-weighted RMSE sqrt(mean(imatrix * err^2)) with and without passing the imatrix (K-quants)."""
    g = torch.Generator().manual_seed(1)
    x = datasets(rows)["student-t(3)"]
    im = torch.exp(torch.randn(x.shape[1], generator=g) * 1.5)  # activation-energy-like column weights
    lines = ["| type | weighted RMSE, no imatrix | weighted RMSE, with imatrix |", "|---|---|---|"]
    for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        cells = [name]
        for w in (None, im):
            y = qg.dequantize(qg.quantize(x, name, w), name, x.shape)
            cells.append(f"{float(((x - y).double() ** 2 * im.double()).mean().sqrt()):.5g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (gguf name -> torch shape) of a llama model; tied: no output.weight
def llama_shapes(vocab, hidden, inter, layers, heads, kv, tied):
    hd = hidden // heads
    s = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        s.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                  f"blk.{i}.attn_q.weight": (heads * hd, hidden), f"blk.{i}.attn_k.weight": (kv * hd, hidden),
                  f"blk.{i}.attn_v.weight": (kv * hd, hidden), f"blk.{i}.attn_output.weight": (hidden, heads * hd),
                  f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                  f"blk.{i}.ffn_down.weight": (hidden, inter)})
    if not tied:
        s["output.weight"] = (vocab, hidden)
    return s


MODELS = {
    "SmolLM2-135M (tied)": dict(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv=3, tied=True),
    "Llama-3.2-1B (tied)": dict(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv=8, tied=True),
    "Llama-2-7B": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, tied=False),
    "Llama-3-8B": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv=8, tied=False),
}


def mix_table():
    lines = ["| model | " + " | ".join(qg.RECIPES) + " |", "|---|" + "---|" * len(qg.RECIPES)]
    for mname, m in MODELS.items():
        shapes = llama_shapes(**m)
        cells = [mname]
        for mix in qg.RECIPES:
            bpw, per = qg.bits_per_weight(shapes, m["layers"], mix, tied_embeddings=m["tied"])
            cells.append(f"{bpw:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table():
    N, K = 2048, 2048
    w = torch.randn(N, K)
    lines = ["| type | encode C++ (ms) | encode reference (ms) | decode C++ (ms) | gguf_mm M=1 (ms) | gguf_mm M=64 (ms) |",
             "|---|---|---|---|---|---|"]
    x1, x64 = torch.randn(1, K), torch.randn(64, K)
    for name in ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q2_K"]:
        cpp = "cpu"
        te = timeit(lambda: qg.quantize(w, name, backend=cpp), 3) * 1e3
        tr = timeit(lambda: qg.quantize(w[:256], name, backend="reference"), 3) * 1e3 * (N / 256)
        q = qg.quantize(w, name)
        td = timeit(lambda: qg.dequantize(q, name, (N, K))) * 1e3
        t1 = timeit(lambda: qkernels.gguf_mm(x1, q, name, N, K), 20) * 1e3
        t64 = timeit(lambda: qkernels.gguf_mm(x64, q, name, N, K), 10) * 1e3
        te_s = f"{te:.1f}" if cpp == "cpu" else f"(no C++ encoder: reference, {te:.0f})"
        lines.append(f"| {name} | {te_s} | {tr:.0f} (extrapolated) | {td:.1f} | {t1:.2f} | {t64:.2f} |")
    tf1 = timeit(lambda: torch.nn.functional.linear(x1, w), 20) * 1e3
    tf64 = timeit(lambda: torch.nn.functional.linear(x64, w), 10) * 1e3
    lines.append(f"| fp32 F.linear | | | | {tf1:.2f} | {tf64:.2f} |")
    return f"N = K = {N}\n\n" + "\n".join(lines)


def gpu_speed_table():
    """Triton decode (qkernels/triton/gguf.py) to bf16 vs the reference on the same GPU, and gguf_mm (decode +
    cuBLAS, not fused) vs bf16 F.linear; triton.testing.do_bench medians. GB/s counts block bytes read plus bf16
    bytes written."""
    from triton.testing import do_bench

    N, K = 4096, 4096
    dev = torch.device("cuda")
    w = torch.randn(N, K, device=dev)
    wb = w.to(torch.bfloat16)
    x1 = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    lines = ["| type | decode Triton (us) | GB/s | decode reference (us) | speedup | gguf_mm M=1 (us) "
             "| bf16 F.linear M=1 (us) |", "|---|---|---|---|---|---|---|"]
    tl1 = do_bench(lambda: torch.nn.functional.linear(x1, wb)) * 1e3
    for name in TYPES:
        q = qg.quantize(w.cpu(), name).to(dev)
        tt = do_bench(lambda: qg.dequantize(q, name, (N, K), torch.bfloat16, backend="triton")) * 1e3
        tr = do_bench(lambda: qg.dequantize(q, name, (N, K), torch.bfloat16, backend="reference")) * 1e3
        tm = do_bench(lambda: qkernels.gguf_mm(x1, q, name, N, K, backend="triton")) * 1e3
        gbs = (q.numel() + 2 * N * K) / (tt * 1e-6) / 1e9
        lines.append(f"| {name} | {tt:.1f} | {gbs:.0f} | {tr:.1f} | {tr / tt:.1f}x | {tm:.1f} | {tl1:.1f} |")
    return f"{torch.cuda.get_device_name()}, N = K = {N}, torch {torch.__version__} CUDA {torch.version.cuda}\n\n" + \
        "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-cpp", default=None)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--gpu", action="store_true", help="only the GPU table (Triton decode, gguf_mm)")
    a = p.parse_args()
    if a.gpu:
        print("## GPU speed (Triton decode)\n")
        print(gpu_speed_table())
        return
    print(f"machine: {platform.machine()} {platform.processor()} threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}\n")
    print(f"## Reconstruction error ({a.rows} x 4096 values per dataset)\n")
    print(error_table(a.rows, a.llama_cpp))
    print("\n## Importance matrix (Student-t data, importance-weighted RMSE)\n")
    print(imatrix_table(min(a.rows, 64)))
    print("\n## Bits per weight of the mixes (whole model, llama.cpp rules)\n")
    print(mix_table())
    if not a.no_speed:
        print("\n## CPU speed\n")
        print(speed_table())


if __name__ == "__main__":
    main()
