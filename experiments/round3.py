"""Issue 20, item 2, third round: the levers round two left untried (docs/finetuning.md, Round 3).

  vocab OUT [STEPS] [REVIEW_EPOCHS]
        a WordPiece of 8,192 tokens trained on the built-in corpus + the task's unlabelled training
        reviews (no validation or test text); bert-mini (its 30,522-token BERT vocabulary is 7.8M of
        its 11M parameters, most of them rows no 1M-token pre-training ever updates) pre-trained with it
        on the built-in corpus + the reviews at REVIEW_EPOCHS (default 4: ~22% of the mixture), the
        demo's recipe (BERT_TRAIN, STEPS default 900); then pretrained vs scratch (the same vocabulary),
        3 seeds, 100 / 1,000 labels, the demo's fine-tuning recipe.
  longer INIT OUT
        the demo's recipe with more fine-tuning for both sides: 24 epochs at 100 labels (168 steps,
        3x the demo's), 6 at 1,000 (378 steps, 3x), 3 seeds, pretrained and scratch.

  small OUT DATA [STEPS] [LAYERS] [WIDTH]
        a smaller bert-mini (default 2 layers x 128 wide, 2 heads; BERT's vocabulary, as the demo's)
        pre-trained on the demo's built-in shards DATA for STEPS (default 1,800: twice the demo's tokens,
        in less time than the demo's 900 steps of the 4 x 256 mini), the demo's recipe otherwise; then
        pretrained vs scratch as above.

usage: nice -n 10 python experiments/round3.py vocab runs/r3/vocab   (one thread; resumable)
"""
import json, statistics, sys, time
from dataclasses import replace
from pathlib import Path

import torch

torch.set_num_threads(1)
from pretune.data.labelled import load_task, write_unlabelled
from pretune.recipes.transfer import POOL, _causal, run_transfer_experiment

SEEDS = (0, 1, 2)
SIZES = (100, 1000)


def vocab(out, steps="900", review_epochs="4"):
    from pretune.config.presets import preset
    from pretune.data.corpora import builtin_corpus
    from pretune.data.prepare import prepare
    from pretune.recipes.demo import BERT_TRAIN
    from pretune.tokenizer.core import Tokenizer
    from pretune.tokenizer.vocabularies import train_tokenizer
    from pretune.training.config import TrainConfig
    from pretune.training.pretrain import pretrain

    out, steps = Path(out), int(steps)
    out.mkdir(parents=True, exist_ok=True)
    reviews = out / "reviews.txt"
    if not reviews.exists():
        write_unlabelled("movie-sentiment", reviews)  # the training split only
    tokfile = out / "tok" / "tokenizer.json"
    if not tokfile.exists():
        t0 = time.time()
        texts = [text for _, text in builtin_corpus(None)]
        texts += [d for d in reviews.read_text().split("\n\n") if d.strip()]
        tok = train_tokenizer("wordpiece", 8192, texts, progress=False, name="wordpiece-8192-reviews")
        tokfile.parent.mkdir(parents=True, exist_ok=True)
        tok.save(tokfile)
        print(f"tokenizer trained in {time.time() - t0:.0f} s", flush=True)
    data = out / "data"
    if not (data / "meta.json").exists():
        meta = prepare(["builtin", str(reviews)], str(tokfile), data, weights={"reviews": float(review_epochs)},
                       progress=False)
        print("data", json.dumps({k: meta[k] for k in ("sources", "splits", "weights")}), flush=True)
    tok = Tokenizer.load(tokfile)
    cfg = replace(preset("bert-mini"), tokenizer=str(tokfile), vocab_size=tok.vocab_size)
    run = out / "pretrained-run"
    t0 = time.time()
    final = pretrain(cfg, TrainConfig.for_model(cfg, None, **{**BERT_TRAIN, "steps": steps}), data, run,
                     progress=False)
    print("pretrain", json.dumps({k: final.get(k) for k in ("val_loss", "val_mlm", "val_nsp")}),
          f"{time.time() - t0:.0f} s", flush=True)
    res = run_transfer_experiment({"bert-mini": run}, out / "ft", seeds=SEEDS, sizes=SIZES,
                                  variants=("pretrained", "scratch"), progress=False)
    print(json.dumps(res["summary"], indent=1))


def small(out, data, steps="1800", layers="2", width="128"):
    from pretune.config.presets import preset
    from pretune.recipes.demo import BERT_TRAIN
    from pretune.training.config import TrainConfig
    from pretune.training.pretrain import pretrain

    out, steps, width = Path(out), int(steps), int(width)
    cfg = replace(preset("bert-mini"), n_layer=int(layers), d_model=width, n_head=max(1, width // 64))
    run = out / "pretrained-run"
    t0 = time.time()
    final = pretrain(cfg, TrainConfig.for_model(cfg, None, **{**BERT_TRAIN, "steps": steps}), Path(data), run,
                     progress=False)
    print("pretrain", json.dumps({k: final.get(k) for k in ("val_loss", "val_mlm", "val_nsp")}),
          f"{time.time() - t0:.0f} s", flush=True)
    res = run_transfer_experiment({"bert-mini": run}, out / "ft", seeds=SEEDS, sizes=SIZES,
                                  variants=("pretrained", "scratch"), progress=False)
    print(json.dumps(res["summary"], indent=1))


def longer(init, out):
    sys.path.insert(0, str(Path(__file__).parent))
    from item2 import cell

    init, out = Path(init), Path(out)
    t = load_task("movie-sentiment")
    pool = POOL[_causal(init)]
    epochs = {100: 24.0, 1000: 6.0}
    res = {}
    for n in SIZES:
        for variant, scratch in (("pretrained", False), ("scratch", True)):
            accs = []
            for s in SEEDS:
                r = cell(t, init, out / variant / f"n{n}-s{s}-ep{epochs[n]:g}", n, s, 3e-4, epochs[n], scratch, pool)
                accs.append(100 * r["test"])
                print(variant, n, s, json.dumps(r), flush=True)
            res[(variant, n)] = accs
            print(f"{variant} {n:,} labels, {epochs[n]:g} epochs: " + " / ".join(f"{a:.1f}" for a in accs)
                  + f" (mean {statistics.fmean(accs):.1f})", flush=True)
        p, q = statistics.fmean(res[("pretrained", n)]), statistics.fmean(res[("scratch", n)])
        print(f"pre-trained minus scratch at {n:,} labels: {p - q:+.1f}", flush=True)


if __name__ == "__main__":
    {"vocab": vocab, "small": small, "longer": longer}[sys.argv[1]](*sys.argv[2:])
