"""The offline comparison behind ``qkernels eval``: float vs int8 weight-only vs int4 RTN / GPTQ / AWQ (/ QAT) vs
llama.cpp's GGUF Q8_0 / Q4_K_M (plain and GPTQ-aware) on one model and one text; prints a table, writes
results.json and a plot of dPPL vs bits per weight."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..algorithms._layers import UnsupportedModel
from ..nn import Int4WeightOnly, Int8WeightOnly, quantize_, use_int8_activations
from ..algorithms import AWQConfig, GPTQConfig, QATScheme, QuantConfig, awq_quantize_model, gptq_quantize_model, \
    rtn_quantize_model
from ..algorithms import qat as qat_mod
from ..algorithms.autoround import AutoRoundConfig, autoround_quantize_model
from ..algorithms.gptq_gguf import GGUFGPTQConfig, gguf_quantize_model, gptq_gguf_quantize_model
from . import data, metrics, models
from .lm_eval_bridge import run_lm_eval

log = logging.getLogger("qkernels.eval")

# q8_0 / q4_k_m: llama.cpp's own quantizer (the GGUF mixes of the same names, per-tensor types by llama.cpp's rules);
# gptq-q4_k_m: the same mix and bytes format with GPTQ choosing the codes (qkernels.algorithms.gptq_gguf). It is
# not in the default run: its column loop adds about 5 minutes on a 2-core CPU (`qkernels eval --gguf-gptq`).
#
# Integer schemes are named ALGO-intBITS[-asym][-full][-mse|-wmse] (parse_scheme): ALGO is rtn, gptq, awq, awq-gptq
# (AWQ's scales folded, then GPTQ's rounding), autoround (AutoRound-style learned rounding per block, opt-in: about
# --autoround-steps block forwards and backwards per decoder layer) or qat; -asym: zero points (default: --asym or symmetric); -full: the
# symmetric grid uses all 2^b levels (llama.cpp Q4_0's scale); -mse: each group's range searched for the smallest
# squared error; -wmse: that error weighted by the inputs' E[x^2] (llama.cpp's imatrix; not for awq / qat)
# (qkernels.algorithms.grids). The group size is --group-size.
DEFAULT_SCHEMES = ("float", "int8", "rtn-int4", "rtn-int4-asym", "gptq-int4", "gptq-int4-asym", "awq-int4",
                   "awq-int4-asym", "q8_0", "q4_k_m")
ALL_SCHEMES = DEFAULT_SCHEMES + ("rtn-int4-full-mse", "rtn-int4-asym-mse", "gptq-int4-full-mse", "gptq-int4-asym-mse",
                                 "awq-gptq-int4-asym-mse", "gptq-int4-asym-mse+head8", "rtn-int4-full-wmse",
                                 "rtn-int4-asym-wmse", "gptq-int4-full-wmse", "gptq-int4-asym-wmse",
                                 "awq-gptq-int4-asym-wmse", "awq-gptq-int4-full-wmse", "autoround-int4-full-wmse",
                                 "autoround-int4-asym-wmse", "gptq-q4_k_m", "qat-int4")
GGUF_MIXES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
HEAD8 = "+head8"  # suffix: the output head (lm_head, untied from the embedding) also int8 weight-only per channel
HEAD4 = "+head4"  # the same with an int4 head: RTN, asymmetric, groups of --group-size (W4A16; W4A8 with +a8)
# last suffix of an int2..int4 scheme: its int4 layers run as W4A8 (qkernels.use_int8_activations: the same codes,
# activations rounded to int8 per token and weight group)
A8 = "+a8"
# after +head8: the input embedding reads its rows from the int8 head's codes (quantize_(embedding_from_head=True))
# instead of keeping its float copy
EMB = "+emb"
_INT_SCHEME = re.compile(r"^(rtn|gptq|awq|awq-gptq|autoround|qat)-int([2-8])((?:-(?:asym|full|mse|wmse))*)$")


def parse_scheme(name: str, group_size: int = 128, symmetric: bool = True) -> tuple[str, QuantConfig] | None:
    """``(algorithm, QuantConfig)`` of an integer scheme name (see the comment above), None for float / int8 /
    GGUF names; raises ValueError for an unknown name. A ``+head8`` suffix (int8 output head) is allowed on any
    name but float and the GGUF mixes (whose head type is part of the mix); a final ``+a8`` (W4A8) on integer schemes
    of at most 4 bits."""
    if name.endswith(A8):
        parsed = parse_scheme(name[:-len(A8)], group_size, symmetric)
        if parsed is None or parsed[1].bits > 4 or parsed[0] == "qat":
            raise ValueError(f"scheme {name!r}: +a8 (W4A8) applies to the rtn / gptq / awq / autoround int2-int4 "
                             "schemes only")
        return parsed
    if name.endswith(EMB):
        if not name[:-len(EMB)].endswith((HEAD8, HEAD4)):
            raise ValueError(f"scheme {name!r}: +emb (embedding from the quantized head) follows +head8 or +head4")
        return parse_scheme(name[:-len(EMB)], group_size, symmetric)
    for head in (HEAD8, HEAD4):
        if name.endswith(head):
            name = name[:-len(head)]
            if name == "float" or name in GGUF_MIXES or name == "gptq-q4_k_m":
                raise ValueError(f"scheme {name + head!r}: {head} applies to the int8 / integer schemes only")
    if name in ("float", "int8", "gptq-q4_k_m") or name in GGUF_MIXES:
        return None
    m = _INT_SCHEME.match(name)
    if m is None:
        raise ValueError(f"unknown scheme {name!r}; choose from {ALL_SCHEMES} or a name ALGO-intBITS[-asym][-full]"
                         "[-mse|-wmse] with ALGO in rtn, gptq, awq, awq-gptq, autoround, qat")
    flags = m.group(3).split("-")[1:]
    if len(set(flags)) != len(flags):
        raise ValueError(f"scheme {name!r} repeats an option")
    sym = symmetric and "asym" not in flags
    if "full" in flags and not sym:
        raise ValueError(f"scheme {name!r}: -full applies to the symmetric grid only")
    if "wmse" in flags and ("mse" in flags or m.group(1) in ("awq", "qat")):
        raise ValueError(f"scheme {name!r}: -wmse (activation-weighted search) replaces -mse and applies to rtn, "
                         "gptq, awq-gptq and autoround only")
    return m.group(1), QuantConfig(int(m.group(2)), group_size, sym, full_range="full" in flags,
                                   mse="mse" in flags or "wmse" in flags, act_weighted="wmse" in flags)


@dataclass
class EvalConfig:
    model: str | None = None
    text: str | None = None
    schemes: tuple = DEFAULT_SCHEMES
    ctx: int = 512
    eval_tokens: int = 4096
    calib_tokens: int = 4096
    awq_calib_tokens: int = 1024
    calib_ctx: int = 512
    batch_size: int = 4
    group_size: int = 128
    symmetric: bool = True
    gptq_act_order: bool = True
    gguf_gptq_act_order: bool = False
    gptq_true_sequential: bool = True
    awq_grid: int = 10
    autoround_steps: int = 30  # measured on the default model: 397 CPU-s at 1 thread, dPPL +9.5% (docs/eval.md)
    autoround_batch: int = 1  # calibration windows per AutoRound step
    qat_steps: int = 16
    qat_lr: float = 5e-5
    qat_tokens: int = 8192
    eval_fraction: float = 0.3
    out: str = "qkernels_eval"
    progress: bool = True
    lm_eval: str | None = None
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    # requests per forward in lm-eval: the scores do not depend on it (right padding, per-request positions), and
    # 16 was ~6x faster than 1 on the default model (lm_eval_bridge.run_lm_eval)
    lm_eval_batch_size: int = 16
    extra: dict = field(default_factory=dict)


class _Clock:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(time.process_time() - self.cpu, 2)}


def _quantize(name: str, base, cfg: EvalConfig, calib, qat_windows, notes: dict | None = None):
    notes = {} if notes is None else notes
    if name.endswith(A8):
        m = _quantize(name[:-len(A8)], base, cfg, calib, qat_windows, notes)
        notes[name] = notes.pop(name[:-len(A8)], None)
        if not use_int8_activations(m):
            raise RuntimeError(f"{name}: the model has no Int4WeightOnly layer to run as W4A8")
        return m
    emb = name.endswith(EMB)
    bare = name[:-len(EMB)] if emb else name
    if bare.endswith((HEAD8, HEAD4)):
        body = bare[:-len(HEAD8)]  # both suffixes are 6 characters
        head = Int8WeightOnly() if bare.endswith(HEAD8) else Int4WeightOnly(group_size=cfg.group_size,
                                                                             symmetric=False)
        m = _quantize(body, base, cfg, calib, qat_windows, notes)
        notes[name] = notes.pop(body, None)
        # the body is quantized already: the filter keeps only the output head (untied from the embedding)
        return quantize_(m, head, filter_fn=lambda mod, n: False, include_lm_head=head, embedding_from_head=emb)
    if name == "float":
        return base
    m = copy.deepcopy(base)
    if name == "int8":
        return rtn_quantize_model(m, QuantConfig(8, -1, True))
    if name in GGUF_MIXES:
        return gguf_quantize_model(m, GGUF_MIXES[name])
    if name == "gptq-q4_k_m":
        return gptq_gguf_quantize_model(m, calib["gptq"], "Q4_K_M",
                                        GGUFGPTQConfig(act_order=cfg.gguf_gptq_act_order,
                                                       true_sequential=cfg.gptq_true_sequential),
                                        progress=cfg.progress)
    algo, qc = parse_scheme(name, cfg.group_size, cfg.symmetric)
    gptq_cfg = GPTQConfig(qc, act_order=cfg.gptq_act_order, true_sequential=cfg.gptq_true_sequential)
    if algo == "rtn":
        return rtn_quantize_model(m, qc, calib["gptq"] if qc.act_weighted else None)
    if algo == "gptq":
        return gptq_quantize_model(m, calib["gptq"], gptq_cfg, progress=cfg.progress)
    if algo in ("awq", "awq-gptq"):
        fold_only = algo == "awq-gptq"  # AWQ's scales only (its clipping would fight GPTQ's error feedback)
        # AWQ's scale search rounds with an unweighted grid (its objective is the block output itself); before
        # GPTQ (fold_only) with the plain min-max grid of the same kind: GPTQ rounds in the end, and an MSE search
        # inside each of the n_grid trial roundings of every linear cost hours on 2 shared cores (measured:
        # awq-gptq-int4-full-wmse still in AWQ's scale search after 37 CPU-minutes)
        awq_qc = replace(qc, act_weighted=False, mse=qc.mse and not fold_only)
        try:
            awq_quantize_model(m, calib["awq"], AWQConfig(awq_qc, n_grid=cfg.awq_grid, clip=not fold_only),
                               progress=cfg.progress, quantize=not fold_only)
        except UnsupportedModel as e:
            # never a silently broken row: RTN instead, and the table says so
            log.warning("%s: %s; this row is RTN", name, e)
            notes[name] = f"AWQ refused ({e}); RTN instead"
            return rtn_quantize_model(copy.deepcopy(base), qc, calib["gptq"] if qc.act_weighted else None)
        if fold_only:
            return gptq_quantize_model(m, calib["gptq"], gptq_cfg, progress=cfg.progress)
        return m
    if algo == "autoround":
        stats = []
        m = autoround_quantize_model(m, calib["autoround"], AutoRoundConfig(qc, steps=cfg.autoround_steps),
                                     progress=cfg.progress, stats=stats)
        kept = sum(st["kept"] for st in stats)
        log.info("%s: block MSE summed over layers %.4g -> %.4g (optimised rounding kept in %d of %d layers)", name,
                 sum(st["loss_start"] for st in stats), sum(st["loss_end"] for st in stats), kept, len(stats))
        return m
    if algo == "qat":
        qat_mod.prepare(m, QATScheme(qc))
        losses = qat_mod.finetune(m, qat_windows, steps=cfg.qat_steps, lr=cfg.qat_lr, teacher=base,
                                  progress=cfg.progress)
        log.info("QAT loss %.4f -> %.4f", losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
        return qat_mod.convert(m)
    raise AssertionError(algo)


@dataclass
class EvalInputs:
    """The model and token windows every row of one comparison shares (``prepare``)."""

    base: torch.nn.Module
    tok: object
    ev: torch.Tensor  # [n, ctx] evaluation windows (BOS first)
    cal: torch.Tensor  # [n, calib_ctx] calibration windows (BOS first)
    calib: dict  # {"gptq": [B, L] batches, "awq": the first windows' batches, "autoround": all, autoround_batch each}
    qat_windows: torch.Tensor
    ev_text: str
    bos: int | None
    t_load: dict


def prepare(cfg: EvalConfig) -> EvalInputs:
    """Loads the model and splits/tokenizes the text into evaluation and calibration windows."""
    torch.manual_seed(0)
    clk = _Clock()
    base, tok = models.load_model(cfg.model)
    t_load = clk.read()
    cal_text, ev_text = data.split_text(data.load_text(cfg.text), cfg.eval_fraction)
    bos = data.bos_id(tok)
    ev = data.windows(data.tokenize(tok, ev_text), cfg.ctx, cfg.eval_tokens, bos, "evaluation")
    cal_ids = data.tokenize(tok, cal_text)
    cal = data.windows(cal_ids, cfg.calib_ctx, cfg.calib_tokens, bos, "calibration")
    n_awq = max(1, cfg.awq_calib_tokens // (cfg.calib_ctx - 1))  # AWQ's grid search costs ~n_grid forwards
    calib = {"gptq": data.batches(cal, cfg.batch_size), "awq": data.batches(cal[:n_awq], cfg.batch_size),
             "autoround": data.batches(cal, cfg.autoround_batch)}
    qat_windows = data.windows(cal_ids, cfg.calib_ctx, cfg.qat_tokens, bos, "calibration")
    log.info("model loaded in %.1fs; eval windows %s, calibration windows %s", t_load["wall_s"], tuple(ev.shape),
             tuple(cal.shape))
    return EvalInputs(base, tok, ev, cal, calib, qat_windows, ev_text, bos, t_load)


def score(name: str, m, inp: EvalInputs, cfg: EvalConfig, ref: dict, t_q: dict, note: str | None = None) -> dict:
    """One table row for model ``m``; the first call (``ref`` empty) must be the float model: it fills ``ref`` with
    the float perplexity and top-1 tokens that dPPL and agreement compare with."""
    res, top1 = metrics.evaluate_lm(m, inp.ev, cfg.batch_size, ref.get("top1"), cfg.progress, desc=f"eval {name}")
    if not ref:
        ref.update(top1=top1, ppl=res["ppl"])
        res["top1_agree"] = 1.0
    row = {"scheme": name, "bits_per_weight": metrics.bits_per_weight(m), "size_mb": metrics.model_size_bytes(m) / 1e6,
           **res, "dppl_pct": 100.0 * (res["ppl"] / ref["ppl"] - 1.0), "quantize_time": t_q}
    if note:
        row["note"] = note
    return row


def run(cfg: EvalConfig) -> dict:
    """Runs the comparison; returns the results dict (also written to ``cfg.out``/results.json)."""
    for s in cfg.schemes:
        parse_scheme(s, cfg.group_size, cfg.symmetric)  # unknown names fail before the model is loaded
    total = _Clock()
    inp = prepare(cfg)
    rows, ref, notes = [], {}, {}
    schemes = list(cfg.schemes)
    if "float" in schemes:
        schemes.remove("float")
    for name in ["float"] + schemes:  # float first: the reference for dPPL and agreement
        clk = _Clock()
        m = _quantize(name, inp.base, cfg, inp.calib, inp.qat_windows, notes)
        row = score(name, m, inp, cfg, ref, clk.read(), notes.get(name))
        rows.append(row)
        print(_format_row(row), flush=True)
        if cfg.lm_eval:
            row["lm_eval"] = run_lm_eval(m, inp.tok, cfg.lm_eval, eval_text=inp.ev_text,
                                         include_path=cfg.lm_eval_include, limit=cfg.lm_eval_limit,
                                         batch_size=cfg.lm_eval_batch_size)
        del m
        # after every row: a long run that is stopped (or dies) keeps every row it measured
        out = write_results(cfg, inp, rows, total, pending=schemes[len(rows) - 1:])
    out["plot"] = plot(rows, os.path.join(cfg.out, "dppl_vs_bits.png"))
    return out


def write_results(cfg: EvalConfig, inp: EvalInputs, rows: list[dict], total: _Clock, pending: list[str]) -> dict:
    """Writes ``results.json`` and ``results.txt`` (the printed table) to ``cfg.out``; ``pending`` names the schemes
    not measured yet (empty: the run is complete). Returns the results dict."""
    out = {"config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "rows": rows,
           "complete": not pending, "pending": list(pending),
           "data": {"eval_windows": list(inp.ev.shape), "calib_windows": list(inp.cal.shape), "bos": inp.bos},
           "machine": machine(), "time": {"load": inp.t_load, "total": total.read()}}
    os.makedirs(cfg.out, exist_ok=True)
    # written to a temporary name and renamed: a run killed mid-write never leaves a truncated results.json
    for name, text in (("results.json", json.dumps(out, indent=2)), ("results.txt", format_table(rows) + "\n")):
        path = os.path.join(cfg.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


HEADER = f"{'scheme':<26} {'bits/w':>7} {'size MB':>8} {'PPL':>8} {'dPPL %':>8} {'top1 agree':>10} {'tok/s':>7} {'quant s':>8}"


def _format_row(r: dict) -> str:
    note = f"  ({r['note']})" if r.get("note") else ""
    return (f"{r['scheme']:<26} {r['bits_per_weight']:>7.2f} {r['size_mb']:>8.1f} {r['ppl']:>8.3f} "
            f"{r['dppl_pct']:>8.2f} {r['top1_agree']:>10.4f} {r['tokens_per_s']:>7.1f} {r['quantize_time']['wall_s']:>8.1f}"
            + note)


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [_format_row(r) for r in rows])


def format_lm_eval(rows: list[dict]) -> str:
    """The --lm-eval results: one line per (scheme, task) with acc / acc_norm and the number of items."""
    lines = []
    for r in rows:
        res = r.get("lm_eval")
        if not res:
            continue
        if "error" in res:
            lines.append(f"{r['scheme']:<12} lm-eval error: {res['error']}")
            continue
        for task, m in res.items():
            vals = " ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n" and isinstance(v, float))
            lines.append(f"{r['scheme']:<12} {task:<24} {vals} (n={m.get('n')})")
    return "\n".join(lines)


PLOT_FLOOR_PCT = 0.01  # the log axis cannot show 0 or less: such rows (the float reference) sit on this floor


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 8.0) -> list:
    """One label per point, right of it, moved down or up in whole line heights until its box (estimated from the
    font size, in display pixels) overlaps no marker and no label placed before; greedy, in order of decreasing y.
    Call after the axes limits and the layout are final."""
    fig = ax.figure
    px = fig.dpi / 72.0
    h, cw = 1.25 * fontsize * px, 0.62 * fontsize * px  # line height, generous average glyph width
    disp = ax.transData.transform(points)
    r = 4 * px  # the markers are obstacles too
    placed, texts = [(x - r, y - r, x + r, y + r) for x, y in disp], []
    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        x0, y0 = disp[i]
        w = cw * len(labels[i])
        for k in range(200):  # offsets 0, -1, +1, -2, +2 ... line heights
            dy = h * ((k + 1) // 2) * (1 if k % 2 == 0 else -1)
            box = (x0 + 6 * px, y0 - h / 2 + dy, x0 + 6 * px + w, y0 + h / 2 + dy)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        texts.append(ax.annotate(labels[i], points[i], textcoords="offset points", fontsize=fontsize, va="center",
                                 xytext=(6, dy / px), arrowprops=dict(arrowstyle="-", lw=0.4, color="gray")
                                 if dy else None))
    return texts


def plot(rows: list[dict], path: str) -> str | None:
    """dPPL (log axis) vs stored bits per weight, one labelled point per scheme; labels never overlap."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(r["bits_per_weight"], max(r["dppl_pct"], PLOT_FLOOR_PCT)) for r in rows]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ys = [p[1] for p in pts]
    ax.set_ylim(min(ys) / 2, max(ys) * 3)
    xs = [p[0] for p in pts]
    ax.set_xlim(min(xs) / 1.15, max(xs) * 1.6)  # room for the labels right of the points
    ax.set_xlabel("stored bits per weight (linear layers)")
    ax.set_ylabel(f"perplexity increase vs float (%, log; <= {PLOT_FLOOR_PCT} shown at {PLOT_FLOOR_PCT})")
    ax.set_title("quality vs size")
    ax.grid(True, which="major", lw=0.3)
    fig.tight_layout()
    _place_labels(ax, pts, [r["scheme"] for r in rows])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
