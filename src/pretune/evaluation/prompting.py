"""Prompted classification of a labelled task, without fine-tuning.

Decoders: zero- and k-shot in-context learning (Brown et al. 2020, GPT-3 sec. 2): k training
examples, drawn per seed and balanced over the classes, each written with the task's template
and its answer, then the test example; the label is the answer with the highest log-likelihood
(the harness's `acc`). The k demonstrations are the same for every test example, so the scorer
computes them once (loglikelihood.py's shared prefix). Optional contextual calibration (Zhao et
al. 2021, sec. 5): the label probabilities of content-free inputs ("N/A", "", "[MASK]", averaged)
under the same prompt give W = diag(p_cf)^-1, and the prediction is argmax W p.

Encoders with an MLM head: the task as a cloze pattern (Schick and Schuetze 2021, PET): the
label whose word scores highest at [MASK].
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..errors import PretuneError
from .templates import Template, load_template

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021, sec. 5


def draw_shots(train, k: int, n_classes: int, seed: int, where: str = "the task") -> list:
    """k training examples, balanced over the classes (k // C each, the remainder to classes
    drawn by the seed), in a seeded random order."""
    if k < 0:
        raise PretuneError(f"--tasks.shots {k} is negative", where, "use 0 (zero-shot) or more")
    if k == 0:
        return []
    if k > len(train):
        raise PretuneError(f"{k} shots asked for, the training split holds {len(train)} examples", where,
                           f"use at most {len(train)} shots")
    rng = random.Random(seed)
    by = {c: [e for e in train if e.label == c] for c in range(n_classes)}
    classes = [c for c in range(n_classes) if by[c]]
    per = {c: k // len(classes) for c in classes}
    for c in rng.sample(classes, k % len(classes)):
        per[c] += 1
    short = [c for c in classes if per[c] > len(by[c])]
    if short:
        raise PretuneError(f"{k} balanced shots need {per[short[0]]} examples of a class the training split "
                           f"holds {len(by[short[0]])} of", where, "use fewer shots")
    shots = [e for c in classes for e in rng.sample(by[c], per[c])]
    rng.shuffle(shots)
    return shots


def demonstrations(t: Template, shots, labels) -> str:
    return "".join(t.fill(e.text, e.text_b) + " " + t.answers[labels[e.label]] + t.separator for e in shots)


def _label_logprobs(model, tok, contexts, t: Template, labels, batch_size, truncate, where) -> torch.Tensor:
    """(N, C) log P(answer_c | context_n), normalised over the C answers."""
    from .loglikelihood import score_pairs
    answers = [" " + t.answers[y] for y in labels]
    scored = score_pairs(model, tok, [(c, a) for c in contexts for a in answers], batch_size, truncate, where=where)
    ll = torch.tensor([s.loglik for s in scored], dtype=torch.float64).view(len(contexts), len(labels))
    return ll.log_softmax(-1)


def _mlm_logprobs(model, tok, texts, t: Template, labels, truncate, where, batch_size: int = 32) -> torch.Tensor:
    """(N, C) log-probabilities of each label's word at [MASK], normalised over the C words (PET)."""
    if tok.mask_id is None or model.lm_head is None:
        raise PretuneError("the model has no MLM head or its tokenizer no [MASK]", where,
                           "prompt a decoder, or an encoder pre-trained with MLM")
    words = [t.mlm_answers[y] for y in labels]
    ids = [tok.encode(w, add_special_tokens=False) for w in words]
    bad = [w for w, i in zip(words, ids) if len(i) != 1]
    if bad:
        raise PretuneError(f"the answer '{bad[0]}' is not one token of the vocabulary", where,
                           "choose single-token answer words (mlm_answers) in the template")
    cand = torch.tensor([i[0] for i in ids])
    window, out = model.max_positions, []
    seqs = []
    for x in texts:
        s = tok.encode_pair(x)[0]
        if len(s) > window:
            if truncate != "left":
                raise PretuneError(f"an input has {len(s)} tokens, more than the model's window of {window}",
                                   where, "pass --tasks.truncate left, or shorten it")
            s = s[:1] + s[len(s) - window + 1:]
        if tok.mask_id not in s:
            raise PretuneError("[MASK] was cut off the input", where, "put [MASK] near the end of the pattern")
        seqs.append(s)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b:b + batch_size]
            T = max(map(len, chunk))
            ids_t = torch.tensor([s + [tok.pad_id or 0] * (T - len(s)) for s in chunk], device=dev)
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in chunk], device=dev)
            h = model(ids_t, attention_mask=mask)
            pos = torch.tensor([s.index(tok.mask_id) for s in chunk], device=dev)
            logits = model.logits(h[torch.arange(len(chunk), device=dev), pos]).float()
            out.append(logits[:, cand.to(dev)].double().log_softmax(-1).cpu())
    return torch.cat(out)


def accuracy_f1(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy and macro-F1 over the classes present in y_true or y_pred (scikit-learn's
    f1_score(average="macro")); classification.py's metrics, here so that the evaluate verb's
    module and this one do not import each other."""
    f1s = []
    for c in sorted(set(y_true) | set(y_pred)):
        tp = sum(t == p == c for t, p in zip(y_true, y_pred))
        fp = sum(p == c != t for t, p in zip(y_true, y_pred))
        fn = sum(t == c != p for t, p in zip(y_true, y_pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    n = len(y_true)
    return {"accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / max(n, 1),
            "macro_f1": sum(f1s) / max(len(f1s), 1), "n": n}


def _load(run_or_model):
    if isinstance(run_or_model, (str, Path)):
        from ..models.load import load_model
        model, _, tok = load_model(run_or_model)
        return model, tok
    return run_or_model


def prompted_accuracy(run_or_model, task: str = "movie-sentiment", shots: int = 0, seed: int = 0,
                      limit: int | None = None, calibrate: bool = False, template: str | Path | None = None,
                      split: str = "test", batch_size: int = 16, truncate: str | None = None) -> dict:
    """Accuracy and macro-F1 of a model prompted on a labelled task: `run_or_model` a run directory
    or (model, tokenizer); `task` a built-in task or a .csv/.jsonl file; `shots` demonstrations
    from the training split drawn by `seed`; `limit` the first N test examples (in a seeded order).
    A decoder is prompted (k-shot, optionally calibrated); an encoder fills the cloze pattern."""
    from ..data.labelled import load_task

    model, tok = _load(run_or_model)
    t = load_task(task)
    where = f"{t.name} ({split})"
    tpl = load_template(template, t.name, t.labels, t.pair)
    examples = list(t.split(split))
    if limit is not None and limit < len(examples):
        examples = random.Random(1234).sample(examples, limit)  # a fixed subset, the same for every seed
    if model.config.causal:
        demos = demonstrations(tpl, draw_shots(t.train, shots, len(t.labels), seed, where), t.labels)
        contexts = [demos + tpl.fill(e.text, e.text_b) for e in examples]
        lp = _label_logprobs(model, tok, contexts, tpl, t.labels, batch_size, truncate, where)
        if calibrate:
            cf = [demos + tpl.fill(x, x if t.pair else None) for x in CONTENT_FREE]
            p_cf = _label_logprobs(model, tok, cf, tpl, t.labels, batch_size, truncate, where).exp().mean(0)
            lp = (lp - p_cf.log()).log_softmax(-1)
    else:
        if shots:
            raise PretuneError("k-shot prompting needs a decoder", where, "use --tasks.shots 0 with an encoder (PET's pattern)")
        lp = _mlm_logprobs(model, tok, [tpl.fill_pattern(e.text, e.text_b) for e in examples], tpl, t.labels,
                           truncate, where)
        if calibrate:
            cf = _mlm_logprobs(model, tok, [tpl.fill_pattern(x) for x in CONTENT_FREE], tpl, t.labels, truncate, where)
            lp = (lp - cf.exp().mean(0).log()).log_softmax(-1)
    pred = lp.argmax(-1).tolist()
    m = accuracy_f1([e.label for e in examples], pred, len(t.labels))
    m.update(task=t.name, split=split, shots=shots, seed=seed, calibrated=calibrate,
             method="prompt" if model.config.causal else "cloze pattern", acc=m["accuracy"],
             majority=t.majority_baseline(split)[1], mean_logprob_gold=sum(
                 float(lp[i, e.label]) for i, e in enumerate(examples)) / max(len(examples), 1))
    if math.isnan(m["mean_logprob_gold"]):
        m["mean_logprob_gold"] = None
    return m
