"""Task accuracy through lm-evaluation-harness (``lm-eval``), offline.

``qkernels eval --lm-eval TASKS`` hands every compared model to lm-eval. Its standard tasks (hellaswag, arc, ...)
download their data from a hub, which fails offline; so qkernels ships one task that needs no download:

* ``qkernels_pydoc_cloze``: multiple-choice continuation on the *evaluation* part of the text (never the calibration
  part). Each item is a passage of the text (a few lines) and four candidate continuations: the true next words
  and three continuations of other passages (deterministic, seeded). The model picks the candidate with the highest
  log-likelihood (lm-eval's ``acc``; ``acc_norm`` normalises by length in bytes). A random guess scores 0.25.

The task's data is written as a JSON-lines file next to a task YAML in a folder that lm-eval reads through its
``TaskManager(include_path=...)``; users add their own offline tasks the same way (``--lm-eval-include DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time

log = logging.getLogger("qkernels.eval")

CLOZE_TASK = "qkernels_pydoc_cloze"

_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def cloze_items(text: str, n_items: int = 200, context_words: int = 48, answer_words: int = 6, n_choices: int = 4,
                seed: int = 0) -> list[dict]:
    """Multiple-choice continuation items from ``text``: ``{"context", "choices", "label"}``.

    The text is cut into consecutive non-overlapping spans of ``context_words + answer_words`` words (whitespace
    split, re-joined by single spaces); the first ``context_words`` are the context, the rest the true answer. The
    distractors are the answers of other spans. Spans whose answer repeats another's are dropped (two right answers).
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    words = text.split()
    span = context_words + answer_words
    spans = [words[i:i + span] for i in range(0, len(words) - span + 1, span)]
    answers = [" " + " ".join(s[context_words:]) for s in spans]
    counts = {a: answers.count(a) for a in answers}
    keep = [i for i, a in enumerate(answers) if counts[a] == 1]
    if len(keep) < n_choices:
        raise ValueError(f"the evaluation text is too short for the cloze task: {len(keep)} usable passages of "
                         f"{span} words, at least {n_choices} are needed")
    rng = random.Random(seed)
    picked = keep if len(keep) <= n_items else sorted(rng.sample(keep, n_items))
    items = []
    for i in picked:
        others = rng.sample([j for j in keep if j != i], n_choices - 1)
        label = rng.randrange(n_choices)
        choices = [answers[j] for j in others]
        choices.insert(label, answers[i])
        items.append({"context": " ".join(spans[i][:context_words]), "choices": choices, "label": label})
    return items


def write_cloze_task(folder: str, eval_text: str, n_items: int = 200, seed: int = 0) -> str:
    """Writes ``qkernels_pydoc_cloze`` (data + YAML) into ``folder``; returns ``folder`` (an lm-eval include path)."""
    os.makedirs(folder, exist_ok=True)
    data_path = os.path.join(folder, f"{CLOZE_TASK}.jsonl")
    with open(data_path, "w", encoding="utf-8") as f:
        for it in cloze_items(eval_text, n_items=n_items, seed=seed):
            f.write(json.dumps(it) + "\n")
    with open(os.path.join(folder, f"{CLOZE_TASK}.yaml"), "w", encoding="utf-8") as f:
        f.write(_TASK_YAML.format(task=CLOZE_TASK, data=json.dumps(data_path)))
    return folder


def run_lm_eval(model, tokenizer, tasks: str, eval_text: str | None = None, include_path: str | None = None,
                limit: int | None = None, batch_size: int = 1) -> dict:
    """Hands ``model`` (a transformers causal LM) to lm-eval and returns ``{task: {metric: value}}``, or
    ``{"error": why}`` when lm-eval is missing or a task cannot run (e.g. its data would need a download).

    ``tasks``: comma-separated lm-eval task names; ``qkernels_pydoc_cloze`` is built from ``eval_text``.
    ``include_path``: a folder of the user's own task YAMLs. ``limit``: at most this many items per task.
    ``batch_size``: requests per forward (lm-eval's HFLM pads each batch on the right and reads every request's
    log-likelihood at its own positions, so the scores do not depend on it up to float summation order; >1 is
    several times faster on CPU). Every task's entry holds its metrics and their standard errors (``acc``,
    ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``), ``n`` (items scored), ``wall_s`` and ``cpu_s``, the wall
    and process CPU time of the whole lm-eval pass."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # lm-eval itself, or what its HF model wrapper imports (accelerate)
        msg = f"lm-eval is not installed or incomplete ({e}; pip install lm-eval accelerate); skipped --lm-eval"
        log.warning(msg)
        return {"error": msg}
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--lm-eval needs at least one task name, got {tasks!r}")
    with tempfile.TemporaryDirectory(prefix="qkernels_lm_eval_") as tmp:
        paths = [p for p in (include_path,) if p]
        if CLOZE_TASK in names:
            if eval_text is None:
                raise ValueError(f"the {CLOZE_TASK} task needs the evaluation text")
            paths.append(write_cloze_task(tmp, eval_text))
        try:
            # indexing lm-eval's own few thousand task YAMLs takes tens of seconds: skip it when the include
            # paths define every requested task
            tm = TaskManager(include_path=paths, include_defaults=False) if paths else None
            if tm is None or not set(names) <= set(tm.all_tasks):
                tm = TaskManager(include_path=paths or None)
            t0, c0 = time.perf_counter(), time.process_time()
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        except Exception as e:  # noqa: BLE001 - e.g. a hub task offline: report, do not lose the other results
            msg = f"lm-eval could not run {tasks!r}: {type(e).__name__}: {e} (its task data must be available offline)"
            log.warning(msg)
            return {"error": msg}
    out = {}
    for task, metrics in res.get("results", {}).items():
        # lm-eval's keys are "metric,filter" ("acc,none", "acc_stderr,none"); the standard errors are kept because
        # at --lm-eval-limit 50 they (about 0.07) are larger than most differences between schemes
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
        out[task]["n"] = res.get("n-samples", {}).get(task, {}).get("effective")
        out[task]["wall_s"] = round(wall, 2)
        out[task]["cpu_s"] = round(cpu, 2)  # all threads; on a shared machine the cost that wall time hides
        # logged as each model finishes: a long --lm-eval run (minutes per scheme on CPU) shows its results as it
        # goes, and an interrupted one keeps those already measured
        log.info("lm-eval %s: %s", task, " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in out[task].items()))
    return out
