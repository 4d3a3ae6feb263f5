"""What each endpoint computes, through the library functions the command line uses, so that the
API and the command line give the same outputs for the same inputs (tests/test_serve.py)."""

from __future__ import annotations

from ..errors import PretuneError
from .runs import Loaded, Refused


def fill_mask(r: Loaded, text: str, top_k: int) -> dict:
    from ..inference.generate import fill_mask as fm
    with r.lock:
        answers = fm(r.model, r.tok, text, top_k)
    return {"run": r.name, "masks": [[{"token": w, "probability": p} for w, p in cands] for cands in answers]}


def prompt_ids(r: Loaded, prompt: str) -> list[int]:
    """The prompt's ids, refused as `pretune generate` refuses them (empty, the window full)."""
    ids = r.tok.encode(prompt)
    W = r.model.max_positions
    if not ids:
        raise PretuneError("the prompt is empty", None, "give some text to continue")
    if len(ids) >= W:
        raise PretuneError(f"the prompt has {len(ids)} tokens; the model's window is {W}", None, "shorten the prompt")
    return ids


def classify(r: Loaded, texts: list[str]) -> list[dict]:
    """As `pretune classify --json-out`, except that a text is only ever text (never @FILE)."""
    from ..data.encoding import TextEncoder
    from ..data.labelled import Example
    from ..evaluation.classification import predict
    from ..objectives.registry import body_objective
    from ..runs.layout import RunDir

    pair = r.info.get("pair", False)
    pairs = []
    for t in texts:
        a, _, b = t.partition("\t") if pair else (t, "", "")
        if not a.strip() or (pair and not b.strip()):
            raise Refused("a pair task needs two texts, separated by a tab" if pair else "an empty text cannot be classified")
        pairs.append((a.strip(), b.strip() if pair else None))
    rc = RunDir(r.path).read_config()
    W = r.body.max_positions
    max_len = rc.get("finetune", {}).get("max_len") or W
    te = TextEncoder(r.tok, body_objective(r.cfg, rc).template, min(max_len, W))
    enc = te.encode([Example(a, 0, b) for a, b in pairs], "texts")
    with r.lock:
        probs = predict(r.model, enc, te.pad_id, 64)
    labels = r.info["labels"]
    out = []
    for (a, b), p in zip(pairs, probs.tolist()):
        k = max(range(len(p)), key=p.__getitem__)
        out.append({"text": a if b is None else [a, b], "label": labels[k],
                    "probabilities": {l: round(v, 4) for l, v in zip(labels, p)}})
    return out


def similarity(r: Loaded, a: str, b: str, pooling: str | None, normalize: bool | None) -> dict:
    """cos(e_a, e_b) of `pretune embed`'s vectors (its default pooling and normalisation)."""
    import torch.nn.functional as F

    from ..inference.embed import embed_texts
    from ..models import heads

    pooling = pooling or r.source.get("pooling") or heads.default_pooling(r.cfg.causal, "embed")
    normalize = bool(r.source.get("normalize", False)) if normalize is None else normalize
    with r.lock:
        e = embed_texts(r.model, r.tok, [a, b], pooling, normalize, 2, r.source.get("max_seq_length"))
    return {"run": r.name, "pooling": pooling, "normalize": normalize,
            "similarity": float(F.cosine_similarity(e[0:1], e[1:2])[0])}


def cost(runs: dict[str, Loaded], models: list[str], tokens: float, hardware: str, gpus: int, mfu: float,
         price: float | None) -> dict:
    """`pretune cost --json` for presets and loaded runs (by name: no file is read for a request)."""
    import difflib

    from ..config.presets import PRESETS
    from ..hardware.peak import get_hardware
    from ..planning.cost import plan
    from ..runs.resolve import resolve_model_config

    cfgs = []
    for m in models:
        if m in runs:
            cfgs.append(resolve_model_config(runs[m].path, where="pretune serve"))
        elif m in PRESETS:
            cfgs.append(resolve_model_config(m, where="pretune serve"))
        else:
            near = difflib.get_close_matches(m, list(PRESETS) + list(runs), n=2)
            raise Refused(f"unknown model {m[:40]!r}: give a preset or a loaded run's name"
                          + (f" (did you mean {' or '.join(near)}?)" if near else ""))
    if hardware == "cpu":
        raise Refused("hardware 'cpu' means this machine's measured peak; the server plans for a named device")
    hw = get_hardware(hardware)
    plans = [plan(c, tokens, hw, gpus, mfu, None, None, None, price) for c in cfgs]
    return {"hardware": {"name": hw.name, "label": hw.label, "peak": hw.peak, "sparse": hw.sparse,
                         "power_w": hw.power_w, "note": hw.note, "source": hw.source}, "plans": plans}


def metrics(r: Loaded, offset: int) -> dict:
    """The run's metrics.jsonl (RunDir: up to the last complete line; a run still training appends)."""
    from ..runs.layout import RunDir

    import math

    def finite(v):  # JSON has no NaN: a diverged loss is null
        return None if isinstance(v, float) and not math.isfinite(v) else v
    recs = RunDir(r.path).metrics()
    return {"run": r.name, "total": len(recs), "records": [{k: finite(v) for k, v in m.items()} for m in recs[offset:]]}
