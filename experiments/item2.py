"""Issue 20, item 2, second round: what was not tried in round one (experiments/tapt.py).

  recipe INIT OUT      a fine-tuning recipe per case, chosen on validation: for each (variant, labels,
                       seed), lr in {1e-4, 3e-4, 1e-3} x epochs in EPOCHS[labels], the final weights
                       (one evaluation, at the end), the setting with the best validation accuracy on
                       the fixed 200-review validation subset (ties: the lower validation loss) is the
                       one whose test accuracy counts, as recipes/baseline.py chooses its C.
  tapt INIT@STEP STEPS OUT
                       continued pre-training on the task's unlabelled training reviews from INIT's
                       checkpoint STEP (the split of the budget: 750 built-in + 250 review steps is the
                       demo's 1,000), then fine-tuned as the demo fine-tunes (3 seeds, 100 / 1,000).
  freeze INIT OUT      the demo's recipe (final weights) with the embeddings frozen, 100 labels (pre-trained only).

usage: nice -n 10 python experiments/item2.py recipe|tapt|freeze ...   (one thread; resumable)
"""
import json, math, shutil, statistics, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
from pretune.data.labelled import load_task
from pretune.recipes.transfer import RECIPE, POOL, _causal, _run_cell, _steps_at, epochs_for, run_transfer_experiment
from pretune.tasks.config import FinetuneConfig

LRS = (1e-4, 3e-4, 1e-3)
EPOCHS = {100: (8.0,), 1000: (2.0,)}  # (8, 24) at 100 labels cost 3x: 24 gave the pre-trained +2 on seed 0
SEEDS = (0, 1, 2)
SIZES = (100, 1000)
FREEZE_SIZES = (100,)


def _last_val(d: Path) -> dict:
    vals = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if "val_acc" in l]
    return vals[-1]


def cell(task, init, d: Path, n, seed, lr, epochs, scratch, pool, freeze=None, evals=1) -> dict:
    d = Path(d)
    if not (d / "results.json").exists():
        shutil.rmtree(d, ignore_errors=True)  # a killed cell starts again
        steps = _steps_at(n, epochs, RECIPE["batch_size"])
        _run_cell(FinetuneConfig(task=task, objective="L2", epochs=epochs, train_examples=n, scratch=scratch,
                                 pool=pool, freeze=freeze),
                  {"lr": lr, "seed": seed, "eval_every": max(1, math.ceil(steps / evals))}, init, d, RECIPE, steps,
                  False)
    res = json.loads((d / "results.json").read_text())
    v = _last_val(d)
    return {"test": res["test"]["accuracy"], "val_acc": v["val_acc"], "val_loss": v["val_loss"],
            "seconds": res.get("seconds")}


def recipe(init, out):
    init, out = Path(init), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = load_task("movie-sentiment")
    pool = POOL[_causal(init)]
    log = {}
    for n in SIZES:
        for s in SEEDS:
            for variant, scratch in (("pretrained", False), ("scratch", True)):
                for lr in LRS:
                    for ep in EPOCHS[n]:
                        key = f"{variant}|{n}|{s}|{lr:g}|{ep:g}"
                        log[key] = cell(t, init, out / variant / f"n{n}-s{s}-lr{lr:g}-ep{ep:g}", n, s, lr, ep,
                                        scratch, pool)
                        print(key, json.dumps(log[key]), flush=True)
                        json.dump(log, open(out / "grid.json", "w"), indent=1)
    summarise(out)


def summarise(out):
    log = json.load(open(Path(out) / "grid.json"))
    chosen = {}
    for key, r in log.items():
        variant, n, s, lr, ep = key.split("|")
        k = (variant, int(n), int(s))
        if k not in chosen or (r["val_acc"], -r["val_loss"]) > (chosen[k][1]["val_acc"], -chosen[k][1]["val_loss"]):
            chosen[k] = ((lr, ep), r)
    print("| variant | labels | chosen (lr, epochs) per seed | test per seed | mean |")
    print("|---|---|---|---|---|")
    means = {}
    for (variant, n) in sorted({(k[0], k[1]) for k in chosen}, key=lambda x: (x[1], x[0])):
        ks = sorted(k for k in chosen if k[:2] == (variant, n))
        accs = [100 * chosen[k][1]["test"] for k in ks]
        means[(variant, n)] = statistics.fmean(accs)
        print(f"| {variant} | {n:,} | " + " / ".join(f"{chosen[k][0][0]}, {chosen[k][0][1]}" for k in ks)
              + " | " + " / ".join(f"{a:.1f}" for a in accs) + f" | {means[(variant, n)]:.1f} |")
    for n in SIZES:
        if ("pretrained", n) in means and ("scratch", n) in means:
            print(f"pre-trained minus scratch at {n:,} labels: {means[('pretrained', n)] - means[('scratch', n)]:+.1f}")
    print("\nevery setting (test accuracy per seed, mean):\n| variant | labels | lr, epochs | seeds 0 / 1 / 2 | mean |\n|---|---|---|---|---|")
    by: dict = {}
    for key, r in log.items():
        variant, n, s, lr, ep = key.split("|")
        by.setdefault((int(n), variant, float(lr), ep), {})[int(s)] = 100 * r["test"]
    for (n, variant, lr, ep), v in sorted(by.items()):
        print(f"| {variant} | {n:,} | {lr:g}, {ep} | " + " / ".join(f"{v[k]:.1f}" for k in sorted(v))
              + f" | {statistics.fmean(v.values()):.1f} |")


def tapt(init_at, steps, out):
    from pretune.recipes.demo import BERT_TRAIN, GPT_TRAIN
    from pretune.recipes.tapt import task_data
    from pretune.runs.checkpoint import load_weights
    from pretune.runs.resolve import resolve_model_config
    from pretune.training.config import TrainConfig
    from pretune.training.hooks import Hook
    from pretune.training.pretrain import pretrain

    init, step = init_at.split("@")
    ck = Path(init) / "checkpoints" / f"step-{int(step):06d}"

    class InitAt(Hook):
        def on_start(self, trainer):
            if trainer.step == 0:
                load_weights(trainer.model, ck)

    out, steps = Path(out), int(steps)
    cfg = resolve_model_config(Path(init))
    kw = GPT_TRAIN if cfg.causal else BERT_TRAIN
    data = task_data(Path(init), "movie-sentiment", out.parent / f"data-reviews-{cfg.tokenizer}")
    run = out / "pretrained-run"
    t0 = time.time()
    kw = {**kw, "steps": steps, "warmup": max(1, steps // 10), "eval_every": steps, "ckpt_every": steps}
    final = pretrain(cfg, TrainConfig.for_model(cfg, None, **kw), data, run, progress=False, hooks=[InitAt()])
    print("tapt", json.dumps({k: final.get(k) for k in ("val_loss", "val_mlm", "val_nsp")}),
          f"{time.time() - t0:.0f} s", flush=True)
    name = "gpt-mini" if cfg.causal else "bert-mini"
    res = run_transfer_experiment({name: run}, out / "ft", seeds=SEEDS, sizes=SIZES, variants=("pretrained",),
                                  progress=False)
    print(json.dumps(res["summary"], indent=1))


def freeze(init, out):
    init, out = Path(init), Path(out)
    t = load_task("movie-sentiment")
    pool = POOL[_causal(init)]
    for n in FREEZE_SIZES:
        accs = []
        for s in SEEDS:
            r = cell(t, init, out / f"n{n}-s{s}", n, s, 3e-4, epochs_for(n), False, pool, freeze="embeddings", evals=1)
            accs.append(100 * r["test"])
            print(n, s, json.dumps(r), flush=True)
        print(f"frozen embeddings, {n:,} labels: " + " / ".join(f"{a:.1f}" for a in accs)
              + f" (mean {statistics.fmean(accs):.1f})", flush=True)


if __name__ == "__main__":
    {"recipe": recipe, "tapt": tapt, "freeze": freeze, "summarise": summarise}[sys.argv[1]](*sys.argv[2:])
