"""End-to-end greedy decode of SmolLM2-135M: transformers fp32 / bf16, qkernels' quantized layers (eager and
compiled), torchao's CPU weight-only int4 / int8, and llama.cpp on the same weights.

    python -m benchmarks.bench_decode [--quick] [--threads 1,2] [--tokens 64] [--rows int4-bf16,llama-q4_0] [--list]

Per row and thread count: prefill tok/s (prompt tokens / prompt forward time), time to first token (the prompt
forward and the first argmax), decode tok/s (1 / median time of one generated token's forward + argmax; the median
keeps a burst of load from other processes on a shared machine out of it) in wall-clock and in process CPU time (on
a loaded machine the CPU time of a 1-thread step is its own work, the wall time mostly the scheduler's), peak RSS of
the row's process and the bytes of its weights.

* Every row runs in its own process (``--row``, spawned by the parent), so peak RSS (``ru_maxrss``) is that row's.
  It includes building the row's model (the quantized rows quantize from the float model, so they peak above their
  steady size); ``rss_MB`` is the resident size after decoding.
* torch rows: ``eager`` is a plain loop over ``model(...)`` with a DynamicCache (what ``model.generate`` runs, minus
  its sampling machinery); ``compiled`` is :class:`qkernels.generate.CompiledDecoder` (a StaticCache and a
  ``torch.compile(fullgraph=True)`` single-token step, compiled once per row with inductor's run-time thread count,
  so both thread counts use the same graph); ``graphs`` counts the graphs dynamo built for it (1: no recompiles).
* llama.cpp rows: llama-cpp-python's low-level ``Llama.eval`` one token at a time and a numpy argmax (its
  ``generate()`` would time the binding's Python sampler instead of ggml).
* Same prompt token ids and the same number of new tokens everywhere; greedy outputs are compared: compiled with
  eager, 2 threads with 1, and each qkernels row holding a llama.cpp file's weights with that llama.cpp row (llama.cpp
  rounds activations to 8 bits inside its matmuls, so its tokens may drift from ours after a while).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

from . import decode_models as dm

PROMPT = ("The history of the city of Paris begins with a small settlement of Celtic fishermen on an island in the "
          "Seine. Over the following two thousand years it grew into one of the largest and most influential cities "
          "of Europe, a centre of trade, learning, politics and the arts. Its old streets, bridges and squares still "
          "show how each period left its mark. In this short essay we follow that story from the beginning, and")
MAX_LEN = 256  # static cache length: fixed, so the compiled graph (and inductor's on-disk cache) is the same per row
QUICK_ROWS = ["hf-bf16", "int4-bf16", "int4-q4_0", "llama-q4_0"]
COLUMNS = ["row", "mode", "threads", "prefill_tok_s", "ttft_ms", "decode_tok_s", "decode_cpu_tok_s", "x_hf_bf16",
           "x_llama", "weights_MB", "peak_rss_MB", "rss_MB", "graphs", "compile_s", "greedy"]


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _result(row, mode, threads, prompt_len, tokens, timing, **extra) -> dict:
    return dict(row=row, mode=mode, threads=threads, prefill_tok_s=prompt_len / timing.prefill_s,
                ttft_ms=timing.prefill_s * 1e3, decode_tok_s=timing.decode_tok_s,
                decode_cpu_tok_s=timing.decode_cpu_tok_s, prefill_cpu_s=timing.prefill_cpu_s, tokens=tokens,
                **extra)


def run_torch_row(row: str, args, prompt: list, errors: list) -> list:
    import torch

    from qkernels.generate import CompiledDecoder, eager_generate

    model = dm.build_torch_model(row, args.workdir)
    wbytes = dm.weight_bytes(model)
    gc.collect()
    out = []
    for t in args.threads:
        torch.set_num_threads(t)
        eager_generate(model, prompt, 4)  # warm-up: first-call allocations, lazy inits
        tokens, timing = eager_generate(model, prompt, args.tokens)
        out.append(_result(row, "eager", t, len(prompt), tokens, timing, weight_bytes=wbytes))
    if args.compile:
        import torch._dynamo.utils
        import torch._inductor.config

        # kernels read the thread count at run time (instead of baking in the count at compile time): one graph
        # serves both thread counts, and a 1-thread row really runs on one thread
        torch._inductor.config.cpp.dynamic_threads = True
        torch._dynamo.utils.counters.clear()
        dec = CompiledDecoder(model, MAX_LEN, attn_implementation=args.compile_attn,
                              skip_guards=not args.no_skip_guards)
        for t in args.threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            try:
                dec.generate(prompt, 4)  # compiles on the first thread count, warms up on the others
            except Exception as e:  # a graph break (fullgraph=True) or a compile error: keep the eager results
                msg = " ".join(str(e).split())[:300]
                print(f"ERROR {row} compiled: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
                errors.append(f"{row} compiled: {type(e).__name__}: {msg}")
                break
            compile_s = time.perf_counter() - t0
            tokens, timing = dec.generate(prompt, args.tokens)
            out.append(_result(row, "compiled", t, len(prompt), tokens, timing, weight_bytes=wbytes,
                               compile_s=compile_s))
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        breaks = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
        for r in out:
            if r["mode"] == "compiled":
                r.update(graphs=graphs, graph_breaks=breaks)
    return out


def run_llama_row(row: str, args, prompt: list, errors: list) -> list:
    import llama_cpp

    from .decode_loop import llama_cpp_generate

    path = dm.gguf_path(args.workdir, dm.LLAMA_ROWS[row])
    out = []
    for t in args.threads:
        llm = llama_cpp.Llama(model_path=path, n_ctx=MAX_LEN, n_batch=MAX_LEN, n_threads=t, n_threads_batch=t,
                              verbose=False)
        try:
            wbytes = int(llama_cpp.llama_model_size(llm.model))
            llama_cpp_generate(llm, prompt, 4)
            tokens, timing = llama_cpp_generate(llm, prompt, args.tokens)
        finally:
            llm.close()
        out.append(_result(row, "llama.cpp", t, len(prompt), tokens, timing, weight_bytes=wbytes))
    return out


def child_main(args) -> None:
    prompt = [int(x) for x in args.prompt_ids.split(",")]
    errors = []
    run = run_llama_row if args.row in dm.LLAMA_ROWS else run_torch_row
    results = run(args.row, args, prompt, errors)
    gc.collect()
    for r in results:
        r.update(peak_rss_mb=_peak_rss_mb(), rss_mb=_rss_now_mb())
    print("RESULT " + json.dumps({"results": results, "errors": errors}), flush=True)


# ---- parent ------------------------------------------------------------------------------------------------------


def _prompt_ids(workdir: str, prompt_len: int) -> list:
    from qkernels.formats.gguf import load_gguf_tokenizer

    # the shipped file's tokenizer is the one every row (and llama.cpp) uses
    tok = load_gguf_tokenizer(dm.gguf_path(workdir, "shipped"))
    ids = tok(PROMPT)["input_ids"]
    if len(ids) < prompt_len:
        raise ValueError(f"--prompt-len {prompt_len} exceeds the prompt's {len(ids)} tokens")
    return ids[:prompt_len]


def _run_child(row: str, args, prompt: list) -> tuple[list, str]:
    cmd = [sys.executable, "-m", "benchmarks.bench_decode", "--row", row, "--threads",
           ",".join(map(str, args.threads)), "--tokens", str(args.tokens), "--workdir", args.workdir,
           "--prompt-ids", ",".join(map(str, prompt)), "--compile-attn", args.compile_attn] + \
        ([] if row in args.compile_rows else ["--no-compile"]) + (["--no-skip-guards"] if args.no_skip_guards else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            got = json.loads(line[len("RESULT "):])
            return got["results"], "; ".join(got["errors"])
    tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
    return [], f"{row}: exit {p.returncode}: " + " | ".join(tail)


def _first_diff(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _greedy_notes(results: list) -> None:
    by = {(r["row"], r["mode"], r["threads"]): r for r in results}
    for r in results:
        checks = []
        ref = None
        if r["mode"] == "compiled":
            ref = ("eager", by.get((r["row"], "eager", r["threads"])))
        elif r["threads"] != min(x["threads"] for x in results if x["row"] == r["row"]):
            ref = (f"{min(x['threads'] for x in results if x['row'] == r['row'])}t",
                   by.get((r["row"], r["mode"], min(x["threads"] for x in results if x["row"] == r["row"]))))
        for name, other in [ref] if ref else []:
            if other is not None:
                d = _first_diff(r["tokens"], other["tokens"])
                checks.append(f"={name}" if d is None else f"!={name}@{d}")
        twin = dm.SAME_WEIGHTS.get(r["row"])
        if twin and (twin, "llama.cpp", r["threads"]) in by:
            d = _first_diff(r["tokens"], by[(twin, "llama.cpp", r["threads"])]["tokens"])
            checks.append("=llama.cpp" if d is None else f"llama.cpp same {d}/{len(r['tokens'])}")
        r["greedy"] = " ".join(checks)


def _ratios(results: list, key: str) -> None:
    """Decode speed over eager HF bf16 and over the llama.cpp row with the same weights, same threads, from ``key``
    ("decode_tok_s": wall clock; "decode_cpu_tok_s": CPU time, the fair measure while other processes load the
    machine, for 1-thread rows)."""
    base = {r["threads"]: r[key] for r in results if r["row"] == "hf-bf16" and r["mode"] == "eager"}
    llama = {(r["row"], r["threads"]): r[key] for r in results if r["mode"] == "llama.cpp"}
    for r in results:
        if r["threads"] in base:
            r["x_hf_bf16"] = r[key] / base[r["threads"]]
        twin = dm.SAME_WEIGHTS.get(r["row"])
        if twin is None and r["row"].startswith("int4-"):
            twin = "llama-q4_0"  # the closest llama.cpp format (4-bit, one scale per block)
        if twin and (twin, r["threads"]) in llama:
            r["x_llama"] = r[key] / llama[(twin, r["threads"])]


def _fmt(r: dict) -> dict:
    f = dict(r)
    for k in ("prefill_tok_s", "decode_tok_s", "decode_cpu_tok_s", "compile_s"):
        if k in r:
            f[k] = f"{r[k]:.1f}"
    f["ttft_ms"] = f"{r['ttft_ms']:.0f}"
    for k in ("x_hf_bf16", "x_llama"):
        if k in r:
            f[k] = f"{r[k]:.2f}"
    f["weights_MB"] = f"{r['weight_bytes'] / 2**20:.0f}"
    f["peak_rss_MB"] = f"{r['peak_rss_mb']:.0f}"
    f["rss_MB"] = f"{r['rss_mb']:.0f}"
    return f


def parent_main(args) -> None:
    from .harness import machine_info, print_table, write_csv

    rows = args.rows or (QUICK_ROWS if args.quick else list(dm.TORCH_ROWS) + list(dm.LLAMA_ROWS))
    unknown = [r for r in rows if r not in dm.TORCH_ROWS and r not in dm.LLAMA_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {list(dm.TORCH_ROWS) + list(dm.LLAMA_ROWS)}")
    need = {dm.LLAMA_ROWS[r] for r in rows if r in dm.LLAMA_ROWS}
    need |= {"Q4_K_M" for r in rows if r == "gguf-q4_k_m"} | {"Q4_0" for r in rows if r == "int4-q4_0"}
    t0 = time.perf_counter()
    dm.export_files(args.workdir, sorted(need))
    prompt = _prompt_ids(args.workdir, args.prompt_len)
    info = machine_info()
    info["threads"] = ",".join(map(str, args.threads))
    print(f"prompt {len(prompt)} tokens, {args.tokens} new tokens, rows: {' '.join(rows)}", flush=True)
    results, errors = [], []
    for row in rows:
        t1 = time.perf_counter()
        res, err = _run_child(row, args, prompt)
        results += res
        if err:
            errors.append(err)
        print(f"  {row}: {time.perf_counter() - t1:.0f} s" + (f"  FAILED {err}" if err else ""), flush=True)
        if args.json:  # after every row: a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                json.dump({"info": info, "prompt": prompt, "results": results, "errors": errors}, f, indent=1)
    _greedy_notes(results)
    _ratios(results, args.ratios)
    try:  # asked after the rows: llama-cpp-python may have been installed while they ran
        import llama_cpp

        info["llama.cpp"] = f"llama-cpp-python {llama_cpp.__version__}: " + \
            llama_cpp.llama_print_system_info().decode().strip()
    except ImportError:
        info["llama.cpp"] = "llama-cpp-python not installed"
    print()
    print(json.dumps(info))
    print_table([_fmt(r) for r in results], COLUMNS)
    for e in errors:
        print("ERROR", e)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.csv:
        write_csv(args.csv, [_fmt(r) for r in results], COLUMNS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "prompt": prompt, "results": results, "errors": errors}, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"rows {QUICK_ROWS}, 16 new tokens")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per decode (default 64, --quick 16)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--no-compile", action="store_true", help="eager torch rows only")
    ap.add_argument("--compile-rows", default=None,
                    help="comma-separated torch rows that also run compiled (default: all of them; compiling one "
                         "row took 5-9 minutes on the loaded 2-core machine)")
    ap.add_argument("--compile-attn", default="qkernels_decode", choices=["qkernels_decode", "eager", "sdpa"],
                    help="attention of the compiled rows (CompiledDecoder(attn_implementation=...); default "
                         "qkernels_decode: qkernels.ops.decode_attention on the cache's open positions; eager: "
                         "inductor fuses HF's attention over every cache slot (compiles slower); sdpa: torch's "
                         "flash-attention call per layer)")
    ap.add_argument("--no-skip-guards", action="store_true",
                    help="compiled rows check dynamo's guards every step (default: skipped after the first step, "
                         "CompiledDecoder(skip_guards=True))")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get(
        "QKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qkernels")), "bench_decode"),
        help="where the exported GGUF files are kept")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--json", default=None, help="all results, generated tokens included")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child process: one row
    ap.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ratios", default="decode_cpu_tok_s", choices=["decode_cpu_tok_s", "decode_tok_s"],
                    help="speed the x_ columns divide (default: CPU-time tok/s, robust to other processes' load)")
    ap.add_argument("--table-from", default=None, metavar="JSON",
                    help="print the table of a --json file (e.g. of a run cut short) and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        from .harness import print_table

        with open(args.table_from) as f:
            saved = json.load(f)
        _greedy_notes(saved["results"])
        _ratios(saved["results"], args.ratios)
        print(json.dumps(saved["info"]))
        print_table([_fmt(r) for r in saved["results"]], COLUMNS)
        for e in saved["errors"]:
            print("ERROR", e)
        return
    if args.list:
        for name, what in {**dm.TORCH_ROWS, **{k: f"llama.cpp, {v} GGUF" for k, v in dm.LLAMA_ROWS.items()}}.items():
            print(f"{name:20s} {what}")
        return
    args.threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in args.threads):
        raise SystemExit(f"--threads must be positive ints, got {args.threads}")
    args.tokens = args.tokens or (16 if args.quick else 64)
    if args.tokens < 2:
        raise SystemExit(f"--tokens must be >= 2 (the first token comes from the prefill), got {args.tokens}")
    if args.prompt_len + args.tokens > MAX_LEN:
        raise SystemExit(f"--prompt-len + --tokens must be <= {MAX_LEN}")
    args.rows = args.rows.split(",") if args.rows else None
    args.compile = not args.no_compile
    args.compile_rows = set(args.compile_rows.split(",")) if args.compile_rows else set(dm.TORCH_ROWS)
    if args.no_compile:
        args.compile_rows = set()
    if args.row:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
