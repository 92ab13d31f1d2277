"""End-to-end greedy decode of SmolLM2-135M: transformers fp32 / bf16, qkernels' quantized layers (eager and
compiled), torchao's CPU weight-only int4 / int8, and llama.cpp on the same weights.

    python -m benchmarks.bench_decode [--quick] [--threads 1,2] [--tokens 64] [--rows int4-bf16,llama-q4_0] [--list]

Per row and thread count: prefill tok/s (prompt tokens / prompt forward time), time to first token (the prompt
forward and the first argmax), decode tok/s (1 / median time of one generated token's forward + argmax; the median
keeps a burst of load from other processes on a shared machine out of it) in wall-clock and in process CPU time (on
a loaded machine the CPU time of a 1-thread step is its own work, the wall time mostly the scheduler's), peak RSS of
the row's process and the bytes of its weights.

* Interleaved rounds: this 2-core VM changes speed in phases (the same compiled step took 12-13 ms in one phase
  and 21-22 ms in the next, with nothing else running), so rows timed one after the other compare phases, not rows.
  Every row runs in its own process (``--row``), started once, built, warmed up and compiled; then in each of
  ``--rounds`` rounds every (row, mode, threads) decodes the prompt once, in a shuffled order. Decode tok/s is 1 / the
  median step over all rounds; ``x_hf_bf16`` and ``x_llama`` are the medians over rounds of the per-round ratios of
  median step times (a row and its anchor measured minutes, not a whole run, apart). Rows are started in batches of
  ``--batch`` (memory), and the anchors (hf-bf16, the llama.cpp rows) join and are re-measured in every batch.
* Peak RSS (``ru_maxrss``) is the row's process.
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
import random
import statistics
import subprocess
import sys
import tempfile
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


class TorchRow:
    """One torch row in a child process: the model, built once; ``eager`` runs on it directly, ``compiled`` through
    one :class:`CompiledDecoder` (compiled during :meth:`setup`, so the timed rounds only decode)."""

    def __init__(self, row: str, args, prompt: list, errors: list):
        self.row, self.args, self.prompt, self.errors = row, args, prompt, errors
        self.dec = None
        self.info = {}

    def setup(self) -> list:
        """Build, warm up and compile; returns the (mode, threads) pairs this row can run."""
        import torch

        from qkernels.generate import eager_generate

        self.model = dm.build_torch_model(self.row, self.args.workdir)
        self.info["weight_bytes"] = dm.weight_bytes(self.model)
        gc.collect()
        # eager runs the model's own attention (sdpa, transformers' default); the compiled rows set theirs below
        self.eager_attn = getattr(self.model.config, "_attn_implementation", None) or "sdpa"
        pairs = []
        for t in self.args.threads:
            torch.set_num_threads(t)
            eager_generate(self.model, self.prompt, 4)  # warm-up: first-call allocations, lazy inits
            pairs.append(("eager", t))
        if not self.args.compile:
            return pairs
        import torch._dynamo.utils
        import torch._inductor.config

        from qkernels.generate import CompiledDecoder

        # kernels read the thread count at run time (instead of baking in the count at compile time): one graph
        # serves both thread counts, and a 1-thread row really runs on one thread
        torch._inductor.config.cpp.dynamic_threads = True
        torch._dynamo.utils.counters.clear()
        self.dec = CompiledDecoder(self.model, MAX_LEN, attn_implementation=self.args.compile_attn,
                                   skip_guards=not self.args.no_skip_guards,
                                   cpp_wrapper=not self.args.no_cpp_wrapper)
        self.compiled_attn = getattr(self.model.config, "_attn_implementation", None)
        for t in self.args.threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            try:
                self.dec.generate(self.prompt, 4)  # compiles on the first thread count, warms up on the others
            except Exception as e:  # a graph break (fullgraph=True) or a compile error: keep the eager results
                msg = " ".join(str(e).split())[:300]
                print(f"ERROR {self.row} compiled: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
                self.errors.append(f"{self.row} compiled: {type(e).__name__}: {msg}")
                break
            self.info[f"compile_s_{t}"] = time.perf_counter() - t0
            pairs.append(("compiled", t))
        self.info["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        self.info["graph_breaks"] = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
        return pairs

    def run(self, mode: str, threads: int):
        import torch

        from qkernels.generate import eager_generate

        torch.set_num_threads(threads)
        if mode == "eager":
            self._attn(self.eager_attn)
            return eager_generate(self.model, self.prompt, self.args.tokens)
        self._attn(self.compiled_attn)  # the prompt runs eagerly on the model's attention setting
        return self.dec.generate(self.prompt, self.args.tokens)

    def _attn(self, name):
        if name and getattr(self.model.config, "_attn_implementation", None) != name:
            self.model.set_attn_implementation(name)

    def extra(self, mode: str, threads: int) -> dict:
        out = {"weight_bytes": self.info["weight_bytes"]}
        if mode == "compiled":
            out.update(compile_s=self.info.get(f"compile_s_{threads}", float("nan")), graphs=self.info["graphs"],
                       graph_breaks=self.info["graph_breaks"])
        return out


class LlamaRow:
    """One llama.cpp row in a child process: a ``Llama`` per thread count, kept open across the rounds."""

    def __init__(self, row: str, args, prompt: list, errors: list):
        self.row, self.args, self.prompt = row, args, prompt
        self.llms = {}

    def setup(self) -> list:
        import llama_cpp

        from .decode_loop import llama_cpp_generate

        path = dm.gguf_path(self.args.workdir, dm.LLAMA_ROWS[self.row])
        for t in self.args.threads:
            llm = llama_cpp.Llama(model_path=path, n_ctx=MAX_LEN, n_batch=MAX_LEN, n_threads=t, n_threads_batch=t,
                                  verbose=False)
            self.weight_bytes = int(llama_cpp.llama_model_size(llm.model))
            llama_cpp_generate(llm, self.prompt, 4)
            self.llms[t] = llm
        return [("llama.cpp", t) for t in self.args.threads]

    def run(self, mode: str, threads: int):
        from .decode_loop import llama_cpp_generate

        return llama_cpp_generate(self.llms[threads], self.prompt, self.args.tokens)

    def extra(self, mode: str, threads: int) -> dict:
        return {"weight_bytes": self.weight_bytes}


def child_main(args) -> None:
    """A row's process: set up, print ``READY``, then serve ``RUN <mode> <threads>`` lines from the parent (one timed
    generation each, answered with ``TIMING``) until ``QUIT`` (answered with ``DONE``: memory and setup facts)."""
    prompt = [int(x) for x in args.prompt_ids.split(",")]
    errors = []
    runner = (LlamaRow if args.row in dm.LLAMA_ROWS else TorchRow)(args.row, args, prompt, errors)
    pairs = runner.setup()
    print("READY " + json.dumps({"pairs": pairs, "errors": errors}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "RUN":
            mode, threads = cmd[1], int(cmd[2])
            tokens, timing = runner.run(mode, threads)
            print("TIMING " + json.dumps(dict(tokens=tokens, prefill_s=timing.prefill_s,
                                              prefill_cpu_s=timing.prefill_cpu_s, decode_s=timing.decode_s,
                                              decode_cpu_s=timing.decode_cpu_s)), flush=True)
        elif cmd[0] == "QUIT":
            gc.collect()
            facts = {f"{m} {t}": runner.extra(m, t) for m, t in pairs}
            print("DONE " + json.dumps({"facts": facts, "peak_rss_mb": _peak_rss_mb(), "rss_mb": _rss_now_mb()}),
                  flush=True)
            return


# ---- parent ------------------------------------------------------------------------------------------------------


def _prompt_ids(workdir: str, prompt_len: int) -> list:
    from qkernels.formats.gguf import load_gguf_tokenizer

    # the shipped file's tokenizer is the one every row (and llama.cpp) uses
    tok = load_gguf_tokenizer(dm.gguf_path(workdir, "shipped"))
    ids = tok(PROMPT)["input_ids"]
    if len(ids) < prompt_len:
        raise ValueError(f"--prompt-len {prompt_len} exceeds the prompt's {len(ids)} tokens")
    return ids[:prompt_len]


class Child:
    """The parent's handle on one row's process (stdin/stdout line protocol of :func:`child_main`)."""

    def __init__(self, row: str, args, prompt: list):
        cmd = [sys.executable, "-m", "benchmarks.bench_decode", "--row", row, "--threads",
               ",".join(map(str, args.threads)), "--tokens", str(args.tokens), "--workdir", args.workdir,
               "--prompt-ids", ",".join(map(str, prompt)), "--compile-attn", args.compile_attn] + \
            ([] if row in args.compile_rows else ["--no-compile"]) + \
            (["--no-skip-guards"] if args.no_skip_guards else []) + \
            (["--no-cpp-wrapper"] if args.no_cpp_wrapper else [])
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.row = row
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                  text=True, env=env, bufsize=1,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.pairs, self.error = [], None

    def _read(self, tag: str):
        """The JSON after the next line starting with ``tag`` (other stdout lines are skipped); None if the process
        ended first (self.error then says how)."""
        for line in self.p.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
        self.p.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().strip().splitlines()[-6:]
        self.error = f"{self.row}: exit {self.p.returncode}: " + " | ".join(tail)
        return None

    def ready(self) -> list:
        got = self._read("READY")
        if got is None:
            return []
        self.pairs = [tuple(p) for p in got["pairs"]]
        if got["errors"]:
            self.error = "; ".join(got["errors"])
        return self.pairs

    def run(self, mode: str, threads: int):
        self.p.stdin.write(f"RUN {mode} {threads}\n")
        self.p.stdin.flush()
        return self._read("TIMING")

    def quit(self):
        try:
            self.p.stdin.write("QUIT\n")
            self.p.stdin.flush()
            got = self._read("DONE")
        except (BrokenPipeError, OSError):
            got = None
        self.p.wait()
        return got


def _median(v):
    return statistics.median(v) if v else float("nan")


def combine(row: str, mode: str, threads: int, prompt_len: int, samples: list, extra: dict) -> dict:
    """One table row from the rounds' TIMING samples of (row, mode, threads): decode speed from the median step over
    all rounds, prefill from the median round; ``tokens`` from the first round (``rounds_agree``: every round
    generated the same tokens)."""
    dec = [s for smp in samples for s in smp["decode_s"]]
    cpu = [s for smp in samples for s in smp["decode_cpu_s"]]
    prefill = _median([smp["prefill_s"] for smp in samples])
    return dict(row=row, mode=mode, threads=threads, prefill_tok_s=prompt_len / prefill, ttft_ms=prefill * 1e3,
                decode_tok_s=1 / _median(dec), decode_cpu_tok_s=1 / _median(cpu),
                prefill_cpu_s=_median([smp["prefill_cpu_s"] for smp in samples]), tokens=samples[0]["tokens"],
                rounds=len(samples), rounds_agree=all(smp["tokens"] == samples[0]["tokens"] for smp in samples),
                round_step_s={"decode_s": [_median(smp["decode_s"]) for smp in samples],
                              "decode_cpu_s": [_median(smp["decode_cpu_s"]) for smp in samples]},
                **extra)


def run_batch(rows: list, args, prompt: list, rng) -> tuple[list, list]:
    """Start one process per row (one after the other: builds and compiles do not overlap), then ``args.rounds``
    rounds; in each, every (row, mode, threads) decodes once, in a shuffled order. The rows share every phase of a
    machine whose speed drifts, so their ratios per round (:func:`_ratios`) compare like with like."""
    children, errors = [], []
    for row in rows:
        t1 = time.perf_counter()
        c = Child(row, args, prompt)
        c.ready()
        if c.error:
            errors.append(c.error)
        print(f"  {row}: ready in {time.perf_counter() - t1:.0f} s" + (f"  ERROR {c.error}" if c.error else ""),
              flush=True)
        children.append(c)
    jobs = [(c, m, t) for c in children for m, t in c.pairs]
    samples = {(c.row, m, t): [] for c, m, t in jobs}
    for r in range(args.rounds):
        t1 = time.perf_counter()
        rng.shuffle(jobs)
        for c, m, t in list(jobs):
            got = c.run(m, t)
            if got is None:
                errors.append(c.error)
                jobs = [j for j in jobs if j[0] is not c]
                continue
            samples[(c.row, m, t)].append(got)
        print(f"  round {r + 1}/{args.rounds}: {time.perf_counter() - t1:.0f} s", flush=True)
    results = []
    for c in children:
        done = c.quit() if c.p.poll() is None else None
        for m, t in c.pairs:
            if samples[(c.row, m, t)]:
                extra = {}
                if done:
                    extra = dict(done["facts"][f"{m} {t}"], peak_rss_mb=done["peak_rss_mb"], rss_mb=done["rss_mb"])
                results.append(combine(c.row, m, t, len(prompt), samples[(c.row, m, t)], extra))
    return results, errors


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
    """Decode speed over eager HF bf16 and over the llama.cpp row with the same weights, same threads and batch, from
    ``key`` ("decode_tok_s": wall clock; "decode_cpu_tok_s": CPU time, the fair measure while other processes load
    the machine, for 1-thread rows): per round, the anchor's median step time over the row's, then the median over
    the rounds (each round's rows ran in the same phase of the machine)."""
    step = "decode_cpu_s" if key == "decode_cpu_tok_s" else "decode_s"
    base = {(r["batch"], r["threads"]): r for r in results if r["row"] == "hf-bf16" and r["mode"] == "eager"}
    llama = {(r["batch"], r["row"], r["threads"]): r for r in results if r["mode"] == "llama.cpp"}

    def over(anchor, r):
        a, b = anchor["round_step_s"][step], r["round_step_s"][step]
        return _median([x / y for x, y in zip(a, b)])

    for r in results:
        if (r["batch"], r["threads"]) in base:
            r["x_hf_bf16"] = over(base[(r["batch"], r["threads"])], r)
        twin = dm.SAME_WEIGHTS.get(r["row"])
        if twin is None and r["row"].startswith(("int4-", "w4a8-")):
            # the closest llama.cpp format (4-bit, one scale per block; W4A8 also rounds x to int8 as Q8_0 does)
            twin = "llama-q4_0"
        if twin and (r["batch"], twin, r["threads"]) in llama:
            r["x_llama"] = over(llama[(r["batch"], twin, r["threads"])], r)


def table_rows(results: list) -> set:
    return {r["row"] for r in results}


def batches(rows: list, size: int) -> list:
    """``rows`` in groups of at most ``size`` rows besides the anchors (hf-bf16 and the llama.cpp rows, when asked
    for), which join every group: all rows alive at once would not fit in memory (~1.2-1.8 GB per torch row)."""
    anchors = [r for r in rows if r == "hf-bf16" or r in dm.LLAMA_ROWS]
    others = [r for r in rows if r not in anchors]
    if len(rows) <= size + len(anchors) or not others:
        return [rows]
    return [anchors + others[i:i + size] for i in range(0, len(others), size)]


def _fmt(r: dict) -> dict:
    f = dict(r)
    for k in ("prefill_tok_s", "decode_tok_s", "decode_cpu_tok_s", "compile_s"):
        if k in r:
            f[k] = f"{r[k]:.1f}"
    f["ttft_ms"] = f"{r['ttft_ms']:.0f}"
    for k in ("x_hf_bf16", "x_llama"):
        if k in r:
            f[k] = f"{r[k]:.2f}"
    for k, src, scale in (("weights_MB", "weight_bytes", 2**20), ("peak_rss_MB", "peak_rss_mb", 1),
                          ("rss_MB", "rss_mb", 1)):
        if src in r:  # absent when the row's process died before reporting them
            f[k] = f"{r[src] / scale:.0f}"
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
    results, errors, table = [], [], []
    rng = random.Random(0)
    for b, group in enumerate(batches(rows, args.batch)):
        print(f"batch {b + 1}: {' '.join(group)}", flush=True)
        res, err = run_batch(group, args, prompt, rng)
        for r in res:
            r["batch"] = b + 1
        results += res
        errors += err
        # anchors re-measured in later batches serve those batches' ratios; the table shows their first batch
        table += [r for r in res if b == 0 or r["row"] not in table_rows(table)]
        if args.json:  # after every batch: a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                json.dump({"info": info, "prompt": prompt, "results": results, "errors": errors}, f, indent=1)
    _ratios(results, args.ratios)
    results = table
    _greedy_notes(results)
    try:  # asked after the rows: llama-cpp-python may have been installed while they ran
        import llama_cpp

        info["llama.cpp"] = f"llama-cpp-python {llama_cpp.__version__}: " + \
            llama_cpp.llama_print_system_info().decode().strip()
    except ImportError:
        info["llama.cpp"] = "llama-cpp-python not installed"
    info["rounds"] = args.rounds
    info["compiled"] = dict(attn=args.compile_attn, skip_guards=not args.no_skip_guards,
                            cpp_wrapper=not args.no_cpp_wrapper)
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
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per batch (default 5, --quick 2): in each, every row / mode / thread count decodes "
                         "once, in a shuffled order, so all rows share the machine's speed phases")
    ap.add_argument("--batch", type=int, default=6,
                    help="rows alive at once besides the anchors hf-bf16 and llama-* (default 6; memory: ~1.2-1.8 GB "
                         "per torch row)")
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
    ap.add_argument("--no-cpp-wrapper", action="store_true",
                    help="compiled rows keep inductor's Python wrapper (default: CompiledDecoder(cpp_wrapper=True), "
                         "the wrapper in C++; its first compile takes longer)")
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
        if all("batch" in r and "round_step_s" in r for r in saved["results"]):
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
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.rounds < 1 or args.batch < 1:
        raise SystemExit(f"--rounds and --batch must be >= 1, got {args.rounds} and {args.batch}")
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
