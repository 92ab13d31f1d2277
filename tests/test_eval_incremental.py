"""``qkernels eval`` keeps what it measured: results.json / results.txt are rewritten after every scheme, so a run
that is stopped (or fails) part-way still has its finished rows on disk."""

import json

import pytest

pytest.importorskip("transformers")

from qkernels.eval import data, models, runner  # noqa: E402


def test_rows_are_written_after_each_scheme(tmp_path, monkeypatch):
    d = tmp_path / "tiny"
    m = models.tiny_llama(vocab_size=258, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    m.config.bos_token_id, m.config.eos_token_id = 256, 257
    m.save_pretrained(d)
    models.tiny_tokenizer().save_pretrained(d)
    text = d / "text.txt"
    text.write_text(data.pydoc_text()[:6000])
    out = tmp_path / "out"
    real = runner._quantize
    seen = []

    def quantize_then_die(name, *a, **k):
        # the third scheme "crashes": the first two rows must already be on disk, the float one first
        if name == "rtn-int4-asym":
            on_disk = json.loads((out / "results.json").read_text())
            seen.append([r["scheme"] for r in on_disk["rows"]])
            assert on_disk["complete"] is False and on_disk["pending"] == ["rtn-int4-asym", "int8"]
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(runner, "_quantize", quantize_then_die)
    cfg = runner.EvalConfig(model=str(d), text=str(text), schemes=("rtn-int4", "float", "rtn-int4-asym", "int8"),
                            ctx=32, eval_tokens=64, calib_tokens=64, awq_calib_tokens=32, calib_ctx=32,
                            group_size=32, progress=False, out=str(out))
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    assert seen == [["float", "rtn-int4"]]
    res = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in res["rows"]] == ["float", "rtn-int4"]
    assert res["rows"][1]["ppl"] > 1 and res["time"]["total"]["wall_s"] >= 0
    table = (out / "results.txt").read_text().splitlines()
    assert table[0] == runner.HEADER and table[2].startswith("rtn-int4 ")
    assert not list(out.glob("*.tmp"))

    monkeypatch.setattr(runner, "_quantize", real)
    res = runner.run(cfg)
    assert res["complete"] and res["pending"] == []
    assert [r["scheme"] for r in json.loads((out / "results.json").read_text())["rows"]] == \
        ["float", "rtn-int4", "rtn-int4-asym", "int8"]
