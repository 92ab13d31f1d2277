"""--lm-eval: the offline cloze task and the hand-off to lm-evaluation-harness, checked against our own scoring."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from qkernels.eval import data, models  # noqa: E402
from qkernels.eval.lm_eval_bridge import CLOZE_TASK, cloze_items, run_lm_eval, write_cloze_task  # noqa: E402
from qkernels.eval.runner import format_lm_eval  # noqa: E402

from .test_eval import tiny_dir  # noqa: E402,F401 - the saved tiny Llama + text fixture


def _eval_text():
    return data.split_text(data.pydoc_text(), 0.3)[1]


def test_cloze_items_are_deterministic_and_well_formed():
    text = _eval_text()
    items = cloze_items(text, n_items=50, seed=3)
    assert items == cloze_items(text, n_items=50, seed=3) and len(items) == 50
    assert items != cloze_items(text, n_items=50, seed=4)
    flat = " ".join(text.split())
    labels = [it["label"] for it in items]
    assert len(set(labels)) == 4  # the right answer is not always in the same place
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        right = it["choices"][it["label"]]
        assert right.startswith(" ") and len(right.split()) == 6
        assert it["context"] + right in flat  # the true continuation of the passage
    with pytest.raises(ValueError, match="too short for the cloze task"):
        cloze_items("a b c " * 20)


def test_task_files(tmp_path):
    write_cloze_task(str(tmp_path), _eval_text(), n_items=10)
    rows = [json.loads(l) for l in (tmp_path / f"{CLOZE_TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"context", "choices", "label"}
    assert f"task: {CLOZE_TASK}" in (tmp_path / f"{CLOZE_TASK}.yaml").read_text()


def _our_accuracy(model, tok, items):
    """Multiple-choice accuracy by our own log-likelihoods: sum of log p(continuation tokens | context)."""
    hits = 0
    for it in items:
        ctx = tok(it["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for ch in it["choices"]:
            cont = tok(ch, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            scores.append(float(lp[torch.arange(len(tgt)), tgt][len(ctx) - 1:].sum()))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return hits / len(items)


def test_lm_eval_cloze_matches_our_scoring():
    # byte-level tokenizer: a continuation's tokens are exactly its bytes, so the split lm-eval makes between
    # context and continuation is unambiguous and our scoring must give the same accuracy
    m = models.tiny_llama(vocab_size=258, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seed=1)
    tok = models.tiny_tokenizer()
    text = _eval_text()
    res = run_lm_eval(m, tok, CLOZE_TASK, eval_text=text, limit=12)
    assert "error" not in res, res
    acc = res[CLOZE_TASK]["acc"]
    assert res[CLOZE_TASK]["n"] == 12 and 0 <= res[CLOZE_TASK]["acc_norm"] <= 1
    assert math.isclose(acc, _our_accuracy(m, tok, cloze_items(text)[:12]), abs_tol=1e-9)
    # lm-eval's standard error of a mean of 0/1 hits (sample standard deviation / sqrt(n)) is kept
    assert math.isclose(res[CLOZE_TASK]["acc_stderr"], math.sqrt(acc * (1 - acc) / 11), rel_tol=1e-6, abs_tol=1e-12)
    line = format_lm_eval([{"scheme": "float", "lm_eval": res}])
    assert CLOZE_TASK in line and "acc" in line and "(n=12)" in line


def test_lm_eval_unavailable_task_is_reported_not_raised(tmp_path):
    # a user task whose data file is missing (like a hub task offline): reported in the results, not raised
    write_cloze_task(str(tmp_path), _eval_text(), n_items=4)
    (tmp_path / f"{CLOZE_TASK}.jsonl").rename(tmp_path / "moved.jsonl")
    (tmp_path / f"{CLOZE_TASK}.yaml").rename(tmp_path / "mine.yaml")
    y = (tmp_path / "mine.yaml").read_text().replace(f"task: {CLOZE_TASK}", "task: my_task")
    (tmp_path / "mine.yaml").write_text(y)
    m = models.tiny_llama(vocab_size=258, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    res = run_lm_eval(m, models.tiny_tokenizer(), "my_task", include_path=str(tmp_path))
    assert "could not run 'my_task'" in res["error"] and "FileNotFoundError" in res["error"]
    assert "lm-eval error" in format_lm_eval([{"scheme": "int8", "lm_eval": res}])
    with pytest.raises(ValueError, match="at least one task"):
        run_lm_eval(m, models.tiny_tokenizer(), " , ")


def test_cli_lm_eval(tiny_dir, tmp_path, capsys):  # noqa: F811 - the fixture imported above
    from qkernels.cli import main

    d, text = tiny_dir
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(d), "--text", str(text), "--schemes", "float,rtn-int4", "--ctx", "64",
               "--eval-tokens", "128", "--group-size", "32", "--no-progress", "--out", str(out),
               "--lm-eval", CLOZE_TASK, "--lm-eval-limit", "4", "--lm-eval-batch-size", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        assert r["lm_eval"][CLOZE_TASK]["n"] == 4 and 0 <= r["lm_eval"][CLOZE_TASK]["acc"] <= 1
        assert f"{r['scheme']:<12} {CLOZE_TASK}" in printed


def test_lm_eval_batched_matches_batch_one_and_our_scoring():
    # right-padded batches through QuantLinear layers must not change any decision
    from qkernels import Int4WeightOnly, quantize_

    m = models.tiny_llama(vocab_size=258, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seed=2)
    quantize_(m, Int4WeightOnly(group_size=32))
    tok = models.tiny_tokenizer()
    text = _eval_text()
    one = run_lm_eval(m, tok, CLOZE_TASK, eval_text=text, limit=12, batch_size=1)[CLOZE_TASK]
    four = run_lm_eval(m, tok, CLOZE_TASK, eval_text=text, limit=12, batch_size=4)[CLOZE_TASK]
    assert four["n"] == one["n"] == 12 and four["wall_s"] > 0 and four["cpu_s"] > 0
    assert four["acc"] == one["acc"] and four["acc_norm"] == one["acc_norm"]
    assert math.isclose(four["acc"], _our_accuracy(m, tok, cloze_items(text)[:12]), abs_tol=1e-9)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        run_lm_eval(m, tok, CLOZE_TASK, eval_text=text, batch_size=0)


def test_cli_passes_the_lm_eval_batch_size(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    from qkernels.cli import main
    from qkernels.eval import runner

    seen = []

    def spy(*args, **kw):
        seen.append(kw.get("batch_size"))
        return {CLOZE_TASK: {"acc": 0.5, "n": 1}}

    monkeypatch.setattr(runner, "run_lm_eval", spy)
    d, text = tiny_dir
    for extra, want in (([], 16), (["--lm-eval-batch-size", "5"], 5)):
        seen.clear()
        rc = main(["eval", "--model", str(d), "--text", str(text), "--schemes", "float", "--ctx", "64",
                   "--eval-tokens", "128", "--no-progress", "--out", str(tmp_path / f"o{want}"),
                   "--lm-eval", CLOZE_TASK, *extra])
        assert rc == 0 and seen == [want]
