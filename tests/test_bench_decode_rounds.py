"""bench_decode's interleaved rounds: batching with anchors, combining the rounds' samples and per-round ratios (the
arithmetic only; the processes are exercised by running the benchmark)."""

from benchmarks import bench_decode as bd


def _sample(tokens, steps, prefill=0.5):
    return dict(tokens=tokens, prefill_s=prefill, prefill_cpu_s=prefill, decode_s=steps, decode_cpu_s=steps)


def test_batches_put_the_anchors_in_every_batch():
    rows = ["hf-bf16", "int8-bf16", "int4-fp32", "int4-bf16", "fp8-bf16", "llama-q4_0"]
    got = bd.batches(rows, 2)
    assert got == [["hf-bf16", "llama-q4_0", "int8-bf16", "int4-fp32"],
                   ["hf-bf16", "llama-q4_0", "int4-bf16", "fp8-bf16"]]
    assert bd.batches(rows, 4) == [rows]  # everything fits: one batch, the order kept
    assert bd.batches(["hf-bf16", "llama-q4_0"], 1) == [["hf-bf16", "llama-q4_0"]]


def test_combine_takes_the_median_step_over_all_rounds():
    r = bd.combine("int4-bf16", "eager", 1, 64, [_sample([1, 2], [0.1, 0.3]), _sample([1, 2], [0.2, 0.2, 0.9])],
                   {"weight_bytes": 10})
    assert r["decode_tok_s"] == 1 / 0.2 and r["rounds"] == 2 and r["rounds_agree"]
    assert r["round_step_s"]["decode_s"] == [0.2, 0.2]
    assert r["prefill_tok_s"] == 64 / 0.5 and r["weight_bytes"] == 10
    r = bd.combine("x", "eager", 1, 64, [_sample([1, 2], [0.1]), _sample([1, 3], [0.1])], {})
    assert not r["rounds_agree"]


def test_ratios_are_medians_of_per_round_ratios_within_a_batch():
    # the machine is twice as slow in round 2: per-round ratios stay 2 and 0.5, a ratio of overall medians would not
    def res(row, mode, steps, batch=1):
        r = bd.combine(row, mode, 1, 8, [_sample([1], [s]) for s in steps], {})
        r["batch"] = batch
        return r

    results = [res("hf-bf16", "eager", [0.2, 0.4, 0.2]), res("int4-bf16", "compiled", [0.1, 0.2, 0.1]),
               res("llama-q4_0", "llama.cpp", [0.05, 0.1, 0.05]),
               res("hf-bf16", "eager", [0.3, 0.3, 0.3], batch=2), res("int8-bf16", "eager", [0.1, 0.1, 0.1], batch=2),
               res("w4a8-bf16-fused-h8", "compiled", [0.1, 0.2, 0.1])]
    bd._ratios(results, "decode_cpu_tok_s")
    assert results[1]["x_hf_bf16"] == 2.0 and results[1]["x_llama"] == 0.5
    assert results[5]["x_llama"] == 0.5  # W4A8 rows are compared with Q4_0 (int8 activations as Q8_0) too
    assert abs(results[4]["x_hf_bf16"] - 3.0) < 1e-12  # against batch 2's own anchor
    assert "x_llama" not in results[4]  # no int8 twin
