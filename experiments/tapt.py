"""Item 2 experiment: does continued pre-training on the task's own unlabelled training texts
(TAPT, Gururangan et al. 2020) give the minis >= 5 points over scratch at 100 and 1,000 labels?

  A  built-in corpus, the demo's budget
  B  A + continued pre-training on the 8,054 training reviews (labels dropped)
  C  the reviews alone, from random weights, the demo's budget
  scratch  random weights

usage: nice -n 10 python experiments/tapt.py gpt-mini|bert-mini [tapt_steps] [seeds, e.g. 0,1,2] [C: 1 to run it] [sizes, e.g. 100,1000]
"""
import json, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
from pretune.config.presets import preset
from pretune.data.labelled import write_unlabelled
from pretune.data.prepare import prepare
from pretune.recipes.demo import GPT_TRAIN, BERT_TRAIN
from pretune.recipes.transfer import run_transfer_experiment
from pretune.runs.checkpoint import load_weights, require_checkpoint
from pretune.training.config import TrainConfig
from pretune.training.hooks import Hook
from pretune.training.pretrain import default_data_dir, pretrain


class InitFrom(Hook):
    """Start a pre-training run from another run's weights (continued pre-training)."""
    def __init__(self, run):
        self.run = Path(run)

    def on_start(self, trainer):
        if trainer.step == 0:
            load_weights(trainer.model, require_checkpoint(self.run, "pre-train it first"))


def main(name, tapt_steps=None, seeds="0,1,2", with_c="0", sizes="100,1000"):
    root = Path("runs/exp-tapt")
    cfg = preset(name)
    kw = GPT_TRAIN if cfg.causal else BERT_TRAIN
    tapt_steps = int(tapt_steps or kw["steps"] // 2)
    data = default_data_dir(cfg.tokenizer)
    if not (data / "meta.json").exists():
        prepare(["builtin"], cfg.tokenizer, data, progress=False)
    rev_txt = root / "reviews.txt"
    if not rev_txt.exists():
        root.mkdir(parents=True, exist_ok=True)
        write_unlabelled("movie-sentiment", rev_txt)
    rev = root / f"data-reviews-{cfg.tokenizer}"
    if not (rev / "meta.json").exists():
        prepare([str(rev_txt)], cfg.tokenizer, rev, progress=False)
    print(json.load(open(rev / "meta.json")).get("tokens", "?"), "review tokens", flush=True)
    log = {}
    t = time.time()
    A = root / name / "A-builtin"
    log["A"] = pretrain(cfg, TrainConfig.for_model(cfg, None, **kw), data, A, progress=False)
    log["A_s"] = time.time() - t; t = time.time()
    print(json.dumps(log, default=str), flush=True)
    seeds = tuple(int(x) for x in seeds.split(","))
    sizes = tuple(int(x) for x in sizes.split(","))
    res = {}
    res["A"] = run_transfer_experiment({name: A}, root / name / "ft-A", seeds=seeds, sizes=sizes,
                                       variants=("pretrained", "scratch"), progress=False)["summary"]
    json.dump({"log": log, "res": res}, open(root / name / "summary.json", "w"), indent=1, default=str)
    print(json.dumps(res["A"]), flush=True)
    B = root / name / f"B-tapt{tapt_steps}"
    bkw = {**kw, "steps": tapt_steps, "warmup": max(1, tapt_steps // 10),
           "eval_every": tapt_steps, "ckpt_every": tapt_steps}
    log["B"] = pretrain(cfg, TrainConfig.for_model(cfg, None, **bkw), rev, B, progress=False, hooks=[InitFrom(A)])
    log["B_s"] = time.time() - t; t = time.time()
    print(json.dumps(log, default=str), flush=True)
    res["B"] = run_transfer_experiment({name: B}, root / name / "ft-B", seeds=seeds, sizes=sizes,
                                       variants=("pretrained",), progress=False)["summary"]
    log["ftAB_s"] = time.time() - t; t = time.time()
    json.dump({"log": log, "res": res}, open(root / name / "summary.json", "w"), indent=1, default=str)
    if with_c != "1":
        print(json.dumps(res, indent=1))
        return
    C = root / name / "C-reviews"
    log["C"] = pretrain(cfg, TrainConfig.for_model(cfg, None, **kw), rev, C, progress=False)
    log["C_s"] = time.time() - t; t = time.time()
    res["C"] = run_transfer_experiment({name: C}, root / name / "ft-C", seeds=seeds, sizes=sizes,
                                       variants=("pretrained",), progress=False)["summary"]
    log["ftC_s"] = time.time() - t
    json.dump({"log": log, "res": res}, open(root / name / "summary.json", "w"), indent=1, default=str)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
