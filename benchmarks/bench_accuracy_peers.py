"""Our int4 / int8 rows beside other quantizers' on the same model, text, windows and perplexity code.

    python -m benchmarks.bench_accuracy_peers [--ours gptq-int4,...] [--llmc-python /tmp/llmc-venv/bin/python]

* ours: ``qkernels eval`` schemes (``qkernels.eval.runner``), same :class:`EvalConfig` defaults (SmolLM2-135M,
  pydoc text, 8 x 512 evaluation tokens, 8 x 512 calibration tokens, group size 128);
* gguf-py (llama.cpp's reference quantizers in Python, the ``gguf`` package): Q4_0 (32-blocks, ``d = max / -8``,
  4.5 bits/w) and Q8_0 applied to every linear's weight (round trip to float: the perplexity is what matters here);
* llm-compressor (vLLM's quantizer): ``GPTQModifier`` with the ``W4A16`` (symmetric) / ``W4A16_ASYM`` presets (group
  128) on OUR calibration windows, and ``QuantizationModifier`` (RTN) ``W4A16``; the output head is left in float as
  ours. llm-compressor pins its own torch/transformers, so it runs in a separate virtual environment as a
  subprocess (this file, ``--llmc-worker``) that saves a compressed-tensors directory, which
  ``qkernels.load_quantized`` loads and the same perplexity code scores. Set it up once (reusing the project's
  torch 2.14.1 and transformers instead of downloading llm-compressor's pins):

      python -m venv /tmp/llmc-venv
      echo $PWD/.venv/lib/python3.11/site-packages > /tmp/llmc-venv/lib/python3.11/site-packages/zz_qkernels.pth
      /tmp/llmc-venv/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round \\
          nvidia-ml-py

  (the .pth line appends the project's packages after the venv's own, so the venv's compressed-tensors 0.19 wins).
  Without ``--llmc-python`` (or when it fails) the llm-compressor rows are reported as missing, not invented.
  Observed 2026-12-03 with llmcompressor 0.14.0.1 on SmolLM2-135M: its group-128 presets refuse K = 576 (not a
  multiple of 128) unless ``bypass_divisibility_checks=True``, and even then ``QuantizationModifier`` fails in its
  calibration forward ("unflatten: Provided sizes [-1, 128] don't multiply up to the size of dim 1 (576)"), so
  this version cannot produce the llmc rows for this model; the worker is kept for models whose K is a multiple.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

OURS = ("int8", "rtn-int4", "rtn-int4-full-wmse", "rtn-int4-asym", "gptq-int4", "gptq-int4-full-wmse", "gptq-int4-asym",
        "gptq-int4-asym-wmse", "awq-int4-asym", "awq-gptq-int4-asym-wmse", "awq-gptq-int4-full-wmse",
        "autoround-int4-full-wmse")
LLMC = {"llmc-rtn-w4a16": ("rtn", "W4A16"), "llmc-gptq-w4a16": ("gptq", "W4A16"),
        "llmc-gptq-w4a16-asym": ("gptq", "W4A16_ASYM")}
GGUF_PY = {"gguf-py-q4_0": "Q4_0", "gguf-py-q8_0": "Q8_0"}


def llmc_worker(model_dir: str, calib_path: str, out_dir: str, algo: str, scheme: str) -> None:
    """Runs inside llm-compressor's environment: quantizes ``model_dir`` on the token windows in ``calib_path``
    (int64 ``[n, L]``, torch.save) and saves a compressed-tensors directory ``out_dir``."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    ids = torch.load(calib_path)
    n, L = ids.shape
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # SmolLM2's K = 576 is not a multiple of 128: llm-compressor then refuses unless told that the runtime handles
    # a ragged last group (qkernels does)
    kw = dict(targets="Linear", scheme=scheme, ignore=["lm_head"], bypass_divisibility_checks=True)
    recipe = GPTQModifier(dampening_frac=0.01, **kw) if algo == "gptq" else QuantizationModifier(**kw)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * L] * n})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=L, num_calibration_samples=n,
            shuffle_calibration_samples=False)
    model.save_pretrained(out_dir, save_compressed=True)


def _gguf_py_round_trip(base, qtype: str):
    """A copy of ``base`` whose linears (output head excluded) hold gguf-py's ``qtype`` round trip of their weights;
    returns (model, bits per weight of the type)."""
    import copy

    import gguf
    import numpy as np
    import torch

    from qkernels.algorithms.rtn import quantizable_linears

    t = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    m = copy.deepcopy(base)
    for lin in quantizable_linears(m).values():
        w = lin.weight.detach().float().numpy()
        if w.shape[1] % block:
            raise ValueError(f"{qtype} needs K divisible by {block}, got {w.shape}")
        deq = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w), t), t)
        lin.weight.data = torch.from_numpy(np.asarray(deq, dtype=np.float32).reshape(w.shape))
    return m, 8.0 * nbytes / block


def _llmc_model(name: str, llmc_python: str, model_dir: str, cal, tmp: str):
    import torch

    import qkernels

    algo, scheme = LLMC[name]
    calib_path = os.path.join(tmp, "calib.pt")
    torch.save(cal.clone(), calib_path)
    out = os.path.join(tmp, name)
    cmd = [llmc_python, os.path.abspath(__file__), "--llmc-worker", model_dir, calib_path, out, algo, scheme]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"llm-compressor worker failed ({r.returncode}): {r.stderr[-2000:]}")
    return qkernels.load_quantized(out), {"wall_s": round(wall, 2), "cpu_s": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", default=",".join(OURS), help="qkernels eval schemes (default %(default)s)")
    p.add_argument("--peers", default=",".join(list(GGUF_PY) + list(LLMC)), help="peer rows (default %(default)s)")
    p.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON"),
                   help="python of the llm-compressor venv (or $LLMC_PYTHON); without it the llmc rows are skipped")
    p.add_argument("--model", help="HF directory or .gguf (default: the qkernels eval default model)")
    p.add_argument("--out", default="bench_accuracy_peers", help="folder for results.json and the plot")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--llmc-worker", nargs=5, metavar=("MODEL_DIR", "CALIB", "OUT", "ALGO", "SCHEME"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.llmc_worker:
        llmc_worker(*a.llmc_worker)
        return 0

    import torch

    from qkernels.eval import models, runner

    cfg = runner.EvalConfig(model=a.model, progress=not a.no_progress, out=a.out)
    ours = [s for s in a.ours.split(",") if s]
    peers = [s for s in a.peers.split(",") if s]
    for s in ours:
        runner.parse_scheme(s)
    for s in peers:
        if s not in GGUF_PY and s not in LLMC:
            raise SystemExit(f"unknown peer row {s!r}; choose from {list(GGUF_PY) + list(LLMC)}")
    inp = runner.prepare(cfg)
    # llm-compressor loads the float model from an HF directory: the eval's cached conversion of the GGUF file
    model_dir = (a.model if a.model and os.path.isdir(a.model)
                 else models._cache_dir(a.model or models.default_model_path()))
    rows, ref, notes, missing = [], {}, {}, []
    print(runner.HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["float"] + ours + peers:
            t0 = time.perf_counter()
            try:
                if name in GGUF_PY:
                    m, bpw = _gguf_py_round_trip(inp.base, GGUF_PY[name])
                    t_q = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": None}
                elif name in LLMC:
                    if not a.llmc_python:
                        missing.append(f"{name}: no --llmc-python / $LLMC_PYTHON")
                        continue
                    m, t_q = _llmc_model(name, a.llmc_python, model_dir, inp.cal, tmp)
                    bpw = None
                else:
                    clk = time.perf_counter()
                    m = runner._quantize(name, inp.base, cfg, inp.calib, inp.qat_windows, notes)
                    t_q, bpw = {"wall_s": round(time.perf_counter() - clk, 2), "cpu_s": None}, None
            except Exception as e:  # a peer that cannot run is reported, never replaced by a number
                if name == "float" or name in ours:
                    raise
                missing.append(f"{name}: {type(e).__name__}: {e}")
                continue
            row = runner.score(name, m, inp, cfg, ref, t_q, notes.get(name))
            if bpw is not None:  # float round trips: the stored format's bits, not the float copy's
                row["bits_per_weight"] = bpw
                row["note"] = "gguf-py round trip; bits/w of the GGUF type"
            rows.append(row)
            print(runner._format_row(row), flush=True)
            del m
    for s in missing:
        print(f"missing: {s}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "missing": missing, "machine": runner.machine(),
                   "data": {"eval_windows": list(inp.ev.shape), "calib_windows": list(inp.cal.shape)}}, f, indent=2)
    runner.plot(rows, os.path.join(a.out, "dppl_vs_bits.png"))
    print("\n" + runner.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
