"""Evaluation metrics, data splitting, model loading errors and a CLI smoke run on a tiny random Llama."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from qkernels.algorithms import QuantConfig, rtn_quantize_model  # noqa: E402
from qkernels.eval import data, metrics, models, runner  # noqa: E402


def test_pydoc_text_split_is_deterministic_and_disjoint():
    text = data.pydoc_text()
    assert len(text) > 100_000
    cal, ev = data.split_text(text, 0.3)
    assert cal + ev == text and cal.endswith("\n")
    assert abs(len(ev) / len(text) - 0.3) < 0.01
    assert data.split_text(data.pydoc_text(), 0.3) == (cal, ev)
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_text(text, 1.5)


def test_windows_and_too_short_text():
    ids = torch.arange(100)
    w = data.windows(ids, 10, None, 7, "evaluation")
    assert w.shape == (11, 10) and torch.all(w[:, 0] == 7) and torch.equal(w[0, 1:], torch.arange(9))
    assert data.windows(ids, 10, 20, 7, "evaluation").shape == (2, 10)
    assert data.windows(ids, 10, None, None, "evaluation").shape == (10, 10)
    with pytest.raises(ValueError, match="calibration text is too short: it has 5 tokens"):
        data.windows(torch.arange(5), 10, None, 1, "calibration")


@pytest.fixture(scope="module")
def tiny():
    m = models.tiny_llama(vocab_size=258, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    w = torch.randint(0, 258, (3, 17), generator=torch.Generator().manual_seed(0))
    return m, w


def test_evaluate_lm_matches_manual(tiny):
    m, w = tiny
    res, top1 = metrics.evaluate_lm(m, w, batch_size=2, progress=False)
    with torch.no_grad():
        logits = m(w).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), w[:, 1:].reshape(-1))
    assert math.isclose(res["ppl"], math.exp(float(nll)), rel_tol=1e-5)
    assert res["n_scored"] == 3 * 16
    assert math.isclose(res["top1_acc"], float((logits.argmax(-1) == w[:, 1:]).float().mean()), rel_tol=1e-6)
    res2, _ = metrics.evaluate_lm(m, w, batch_size=3, ref_top1=top1, progress=False)
    assert res2["top1_agree"] == 1.0 and res2["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="windows must be"):
        metrics.evaluate_lm(m, w[:, :1], progress=False)


def test_size_and_bits_per_weight(tiny):
    import copy

    m, _ = tiny
    assert metrics.bits_per_weight(m) == 32.0
    q = rtn_quantize_model(copy.deepcopy(m), QuantConfig(4, 32, True))
    # int4 codes + one fp32 scale per 32 weights (symmetric: no zero points stored)
    assert metrics.bits_per_weight(q) == pytest.approx(4 + 32 / 32)
    qa = rtn_quantize_model(copy.deepcopy(m), QuantConfig(4, 32, False))
    assert metrics.bits_per_weight(qa) == pytest.approx(4 + 64 / 32)
    q8 = rtn_quantize_model(copy.deepcopy(m), QuantConfig(8, -1, True))
    assert 8 < metrics.bits_per_weight(q8) < 9
    assert metrics.model_size_bytes(q) < metrics.model_size_bytes(m)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf"):
        models.load_model(str(f))


def test_lm_eval_missing_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    out = runner.run_lm_eval(None, None, "hellaswag")
    assert "lm-eval is not installed" in out["error"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    m = models.tiny_llama(vocab_size=258, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    m.config.bos_token_id, m.config.eos_token_id = 256, 257
    m.save_pretrained(d)
    models.tiny_tokenizer().save_pretrained(d)
    text = d / "text.txt"
    text.write_text(data.pydoc_text()[:12000])
    return d, text


from qkernels.eval.runner import DEFAULT_SCHEMES  # noqa: E402


def test_cli_smoke(tiny_dir, tmp_path, capsys):
    from qkernels.cli import main

    d, text = tiny_dir
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(d), "--text", str(text), "--ctx", "64", "--eval-tokens", "256",
               "--calib-tokens", "256", "--awq-calib-tokens", "128", "--calib-ctx", "64", "--group-size", "32",
               "--awq-grid", "4", "--qat", "--qat-steps", "2", "--no-progress", "--out", str(out),
               "--schemes", ",".join(DEFAULT_SCHEMES + ("awq-gptq-int4-asym-mse",))])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    schemes = [r["scheme"] for r in res["rows"]]
    assert schemes == list(DEFAULT_SCHEMES) + ["awq-gptq-int4-asym-mse", "qat-int4"]
    assert {"rtn-int4-asym", "gptq-int4-asym", "awq-int4-asym"} <= set(schemes)
    for r in res["rows"]:
        assert r["ppl"] > 1 and math.isfinite(r["dppl_pct"]) and 0 <= r["top1_agree"] <= 1
        assert r["scheme"] in printed
    assert res["rows"][0]["dppl_pct"] == 0 and res["rows"][0]["bits_per_weight"] == 32
    assert res["rows"][2]["bits_per_weight"] == pytest.approx(5.0)
    assert (out / "dppl_vs_bits.png").stat().st_size > 1000


def test_awq_row_refused_model_is_rtn_with_a_note():
    from qkernels.eval import runner

    m = models.tiny_llama()
    m.config.model_type = "mystery"  # a family without an AWQ mapping
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    notes = {}
    q = runner._quantize("awq-int4", m, runner.EvalConfig(group_size=32, progress=False), {"awq": [ids]}, None, notes)
    assert "AWQ refused" in notes["awq-int4"] and "RTN instead" in notes["awq-int4"]
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    row = {"scheme": "awq-int4", "bits_per_weight": 5.0, "size_mb": 1.0, "ppl": 2.0, "dppl_pct": 1.0, "top1_agree": 1.0,
           "tokens_per_s": 1.0, "quantize_time": {"wall_s": 1.0}, "note": notes["awq-int4"]}
    assert "RTN instead" in runner.format_table([row])


def test_head8_suffix_quantizes_the_output_head():
    from qkernels.nn import QuantLinear

    m = models.tiny_llama()
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = runner.EvalConfig(group_size=32, progress=False)
    body = runner._quantize("rtn-int4", m, cfg, None, None)
    q = runner._quantize("rtn-int4+head8", m, cfg, None, None)
    assert isinstance(q.lm_head, QuantLinear) and not isinstance(body.lm_head, QuantLinear)
    assert isinstance(m.lm_head, torch.nn.Linear) and m.lm_head.weight is m.model.embed_tokens.weight  # base intact
    with torch.no_grad():
        a, b, ref = q(ids).logits, body(ids).logits, m(ids).logits
    assert 0 < (a - b).norm() / b.norm() < 0.02  # the head is int8 now: a small, nonzero change
    assert metrics.model_size_bytes(q) > metrics.model_size_bytes(body)  # the untied head is stored in addition
    with pytest.raises(ValueError, match=r"\+head8 applies"):
        runner.parse_scheme("q4_k_m+head8")
    # +emb: the tied embedding reads the int8 head's codes, no float table left; the embeddings move a little
    from qkernels.nn import QuantEmbedding

    e = runner._quantize("rtn-int4+head8+emb", m, cfg, None, None)
    assert isinstance(e.model.embed_tokens, QuantEmbedding) and e.model.embed_tokens.head is e.lm_head
    assert type(m.model.embed_tokens) is torch.nn.Embedding  # base intact
    with torch.no_grad():
        c = e(ids).logits
    assert 0 < (c - a).norm() / a.norm() < 0.02
    assert metrics.model_size_bytes(e) < metrics.model_size_bytes(body)  # the table is held once, in int8
    # +head4: an int4 (asymmetric, --group-size) head; with +emb and +a8 the embedding follows the W4A8 head
    from qkernels.nn import Int8DynamicInt4Weight

    h4 = runner._quantize("rtn-int4+head4+emb+a8", m, cfg, None, None)
    assert h4.lm_head.scheme == Int8DynamicInt4Weight(32, symmetric=False)
    assert h4.model.embed_tokens.head is h4.lm_head
    assert metrics.model_size_bytes(h4) < metrics.model_size_bytes(e)
    with pytest.raises(ValueError, match=r"\+emb .* follows"):
        runner.parse_scheme("rtn-int4+emb")


def test_plot_labels_do_not_overlap(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qkernels.eval.runner import _place_labels

    pts = [(4.25, 30.1), (4.25, 28.0), (4.5, 20.3), (4.5, 21.0), (4.5, 11.0), (4.25, 29.5), (8.0, 0.05), (8.5, 0.06)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(*zip(*pts))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    fig.tight_layout()
    texts = _place_labels(ax, pts, [f"scheme-number-{i}" for i in range(len(pts))])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, r) for t in texts]
    assert len(boxes) == len(pts)
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    plt.close(fig)


def test_cli_errors(tiny_dir, tmp_path, capsys):
    from qkernels.cli import main

    d, _ = tiny_dir
    short = tmp_path / "short.txt"
    short.write_text("too short\n" * 3)
    rc = main(["eval", "--model", str(d), "--text", str(short), "--schemes", "float", "--ctx", "64",
               "--no-progress", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "text is too short" in capsys.readouterr().err
    assert main([]) == 2
    rc = main(["eval", "--model", str(d), "--schemes", "float,bogus", "--no-progress", "--out", str(tmp_path / "o")])
    assert rc == 1 and "unknown scheme" in capsys.readouterr().err


def test_python_m_entry_point():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-m", "qkernels", "eval", "--help"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "--lm-eval" in r.stdout
