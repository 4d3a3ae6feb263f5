"""Where the scorer's work goes (docs/evaluation.md, "Efficiency"), by the tokenizer alone: the
tokens a full-sequence scorer (lm-eval's hf backend) forwards against pretune's (the shared k-shot
prefix once, then each context's own tokens), and the padding of the contexts' batches.
Run: PYTHONPATH=src python scripts/eval_scorer_check.py [RUN, default runs/smollm2] [examples]"""
import random
import sys
from dataclasses import replace

from pretune.data.labelled import load_task
from pretune.data.tokenizers import load_tokenizer
from pretune.evaluation import loglikelihood as L
from pretune.evaluation.prompting import demonstrations, draw_shots
from pretune.evaluation.templates import load_template

run = sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
tok = load_tokenizer(f"{run}/tokenizer.json")


class _Batcher(L.Scorer):
    def __init__(self, batch_size):  # the batching rule alone, no model
        self.batch_size = batch_size


for phrase in (None, "a {} review"):
    t = load_task("movie-sentiment")
    tpl = load_template(None, t.name, t.labels)
    if phrase:
        tpl = replace(tpl, answers={y: phrase.format(a) for y, a in tpl.answers.items()})
    demos = demonstrations(tpl, draw_shots(t.train, 4, 2, 0), t.labels)
    ex = random.Random(1234).sample(t.test, n)  # the benchmark's examples (pretune_bench.evaluation)
    reqs = L.encode_requests(tok, [(demos + tpl.fill(e.text), " " + tpl.answers[y]) for e in ex for y in t.labels])
    p = L._common_prefix([c for c, _ in reqs])
    full = sum(len(c) + len(x) - 1 for c, x in reqs)
    ctxs: dict[tuple, list] = {}
    for c, x in reqs:
        ctxs.setdefault(tuple(c), []).append(x)
    ours = p + sum(len(c) - p for c in ctxs) + sum(len(x) - 1 for xs in ctxs.values() for x in xs)
    rests = sorted((len(c) - p for c in ctxs), reverse=True)
    b = _Batcher(8)
    b.budget = 8 * max(len(c) + len(x) - 1 for c, x in reqs)
    batches = b._batches(rests, lambda r: r)
    print(f"answers {phrase or 'one word'}: {len(reqs)} requests, shared prefix {p} tokens; a full-sequence "
          f"scorer forwards {full} tokens, pretune {ours} ({full / ours:.1f}x fewer); contexts in "
          f"{len(batches)} batches of {[len(x) for x in batches]} rows, padding "
          f"{sum(max(x) * len(x) - sum(x) for x in batches)} of {sum(rests)} context tokens; one batch of all: "
          f"{max(rests) * len(rests) - sum(rests)}")
