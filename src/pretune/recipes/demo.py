"""`pretune demo`: the paradigm's story on a laptop CPU, with measured numbers (<= 15 minutes).

1. prepare the built-in corpus (movie dialogs, Wikipedia, the King James Bible)
   for each tokenizer;
2. pre-train gpt-mini (L1) and bert-mini (MLM + NSP) from scratch;
3. show what they learned (validation loss against the unigram entropy, samples, fill-mask)
   beside what a model pre-trained on trillions of tokens knows (SmolLM2's next tokens);
4. one table: a bag-of-words baseline, the minis pre-trained / from scratch / L3, all-MiniLM-L6
   pre-trained by others / from scratch, SmolLM2 prompted, at 0, 100 and 1,000 labels;
5. what it cost, beside the published figures of GPT-1, GPT-3 and GPT-4 (recipes/story.py);
6. the commands that use its runs (recipes/next_steps.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config.presets import preset
from ..errors import PretuneError
from ..fileio import check_creatable
from ..objectives.registry import pretraining_objective
from ..training.config import TrainConfig
from ..training.pretrain import default_data_dir, pretrain


PROMPTS = ["It is a truth universally acknowledged", "And God said", "I don't know what you"]


# The blank asked of a model pre-trained at scale as its next token (a decoder reads left to right).
SCALE_PROMPTS = {"Washington is the [MASK] of the US.": "Washington is the"}


MASKED = ["Washington is the [MASK] of the US.", "and god said , let there be [MASK] .",
          "i don't [MASK] what you mean ."]


# Budgets sized so `make demo` fits 15 minutes on 2 quiet cores (measured 2026-12-02 on fresh clones:
# 400 + 1,000 steps 16.7 min, gpt-mini 4.9 and bert-mini 5.1 of it; 250 + 900 14.1 min; 175 + 900,
# with MiniLM from scratch at 1,000 labels added to the grid, 16.2 min: gpt-mini 2.2, bert-mini 5.8,
# the grid 7.0, the machine running 15-25% slower per step than for the 14.1-min run). So gpt-mini
# 150 steps (0.31M tokens; its fine-tuned accuracy did not move from 0.8M to 2.5M tokens and its
# pre-training bought -0.2 / -1.0 points over 3 seeds at 0.8M, docs/finetuning.md) and bert-mini
# 650 (0.67M tokens), which leave about a minute and a half of margin for a slower machine.
# What a budget leaves out (eps, beta1, which parameters decay, the clip) is the preset's recipe.
GPT_TRAIN = dict(steps=150, batch_size=16, seq_len=128, lr=2e-3, warmup=40, min_lr_ratio=0.1,
                 weight_decay=0.1, eval_every=100, eval_batches=8, log_every=10, ckpt_every=100)


# bert-mini: many small steps. Masked-LM sits on the unigram plateau until attention learns to
# read the neighbours, and what gets it off is the number of updates: for the same 1M tokens,
# 250 steps of 32 at lr 1e-3 ended at val MLM 6.66 (above the unigram entropy, [CLS] the same for
# every input), 500 of 16 at 5e-4 at 6.17, 1,000 of 8 at 5e-4 at 5.98 (docs/training.md).
BERT_TRAIN = dict(steps=650, batch_size=8, seq_len=128, lr=5e-4, warmup=100, min_lr_ratio=0.1,
                  decay="linear", beta2=0.98, weight_decay=0.01, eval_every=250, eval_batches=16,
                  log_every=10, ckpt_every=250)


def demo_cmd(out: Path = Path("runs/demo"), gpt_steps: int = GPT_TRAIN["steps"],
             bert_steps: int = BERT_TRAIN["steps"], finetune: bool = True, full: bool = False,
             seeds: int = 1, gpt_tapt_steps: int = 0, bert_tapt_steps: int = 0) -> dict:
    """Pre-train gpt-mini and bert-mini on the built-in corpus, show what they learned, then fine-tune.

    Args:
        out: where the runs go (rerunning resumes and reuses finished runs)
        gpt_steps: pre-training steps of gpt-mini
        bert_steps: pre-training steps of bert-mini
        finetune: run the transfer-learning experiment after pre-training
        full: the whole fine-tuning grid (100, 1,000, all labels; 3 seeds) and the real-weights runs
        seeds: fine-tuning seeds of every cell of the table (1 fits the 15-minute budget on 2 cores)
        gpt_tapt_steps: then continue gpt-mini's pre-training this many steps on the task's unlabelled
            training reviews (task-adaptive pre-training, Gururangan et al. 2020; docs/finetuning.md)
        bert_tapt_steps: the same for bert-mini
    """
    from ..data.prepare import prepare
    from ..data.loaders import unigram_entropy

    for flag, v in (("--gpt-tapt-steps", gpt_tapt_steps), ("--bert-tapt-steps", bert_tapt_steps)):
        if v < 0:
            raise PretuneError(f"{flag} {v} must be 0 (none) or a positive number of steps", "pretune demo",
                               f"e.g. {flag} 60")
    for flag, v, what, eg in (("--gpt-steps", gpt_steps, "number of steps", 100),
                              ("--bert-steps", bert_steps, "number of steps", 100), ("--seeds", seeds, "count", 3)):
        if v <= 0:
            raise PretuneError(f"{flag} {v} must be a positive {what}", "pretune demo", f"e.g. {flag} {eg}")
    check_creatable(out, "the demo folder")  # before the corpus is prepared and the models trained
    t0 = time.time()
    report: dict = {}
    phases: dict[str, float] = {}  # seconds per phase, printed at the end (where the 15 minutes go)
    runs = {}
    trained = []  # what the cost lines count: {model, tokens, seq_len, seconds}
    for name, train_kw, steps in (("gpt-mini", GPT_TRAIN, gpt_steps), ("bert-mini", BERT_TRAIN, bert_steps)):
        cfg = preset(name)
        data = default_data_dir(cfg.tokenizer)
        if not (data / "meta.json").exists():
            print(f"== preparing the built-in corpus for {cfg.tokenizer}")
            t1 = time.time()
            prepare(["builtin"], cfg.tokenizer, data)
            phases[f"preparing the corpus ({cfg.tokenizer})"] = time.time() - t1
        print(f"== pre-training {name} ({steps} steps)")
        tc = TrainConfig.for_model(cfg, None, **{**train_kw, "steps": steps})  # the recipe under the budget
        t1 = time.time()
        final = pretrain(cfg, tc, data, out / name)
        tokens = steps * tc.batch_size * tc.seq_len
        trained.append({"model": name, "tokens": tokens, "seq_len": tc.seq_len,
                        "seconds": _train_seconds(out / name, tokens, time.time() - t1)})
        runs[name] = out / name
        phases[f"pre-training {name}"] = time.time() - t1
        report[name] = {"val_loss": final.get("val_loss"), "steps": steps}
        if pretraining_objective(cfg).perplexity:  # a loss over every token: against the unigram entropy
            h = unigram_entropy(data, "val")
            report[name].update(unigram_entropy=h, lm_loss=final["val_loss"])
            gap = h - final["val_loss"]
            print(f"{name}: validation loss {final['val_loss']:.3f} nats/token; unigram entropy of the "
                  f"same split {h:.3f}; below it by {gap:.3f} nats ({'>= 1 nat: learned' if gap >= 1 else '< 1 nat'})")
        elif final.get("val_mlm") is not None:  # masked-LM never predicts a special token
            from ..tokenizer.core import Tokenizer
            h = unigram_entropy(data, "val", exclude=Tokenizer.load(out / name).special_ids)
            report[name].update(unigram_entropy=h, lm_loss=final["val_mlm"])
            print(f"{name}: validation MLM loss {final['val_mlm']:.3f} nats/masked token (unigram entropy of "
                  f"the split's ordinary tokens {h:.3f}: {h - final['val_mlm']:+.3f} below it); "
                  f"NSP {final.get('val_nsp', float('nan')):.3f} (chance ln 2 = 0.693)")
    for name, extra in (("gpt-mini", gpt_tapt_steps), ("bert-mini", bert_tapt_steps)):
        if extra:  # the last stage on the task's own texts: the fine-tuning starts from it
            from .tapt import continue_on_task

            print(f"== continuing {name}'s pre-training on the task's unlabelled training reviews ({extra} steps)")
            kw = GPT_TRAIN if name == "gpt-mini" else BERT_TRAIN
            t1 = time.time()
            continue_on_task(runs[name], "movie-sentiment", extra, out / f"{name}-tapt", kw)
            trained.append({"model": name, "tokens": extra * kw["batch_size"] * kw["seq_len"], "seq_len": kw["seq_len"],
                            "seconds": time.time() - t1})
            runs[name] = out / f"{name}-tapt"
            phases[f"continued pre-training {name}"] = time.time() - t1
    from .others import smollm2

    t1 = time.time()
    smol = smollm2()
    _show(runs, smol)
    phases["samples and fill-mask"] = time.time() - t1
    if finetune:
        from .paradigm import run_paradigm

        report.update(run_paradigm(runs, out, smol, full=full, seeds=tuple(range(seeds))))
        phases.update(report["paradigm"].get("seconds", {}))
        note = transfer_caveat(report, full)
        if note:
            print(note)
    from .story import cost_lines, demo_figures

    report["cost"] = demo_figures(trained)
    print()
    for line in cost_lines(report["cost"]):
        print(line)
    report["minutes"] = (time.time() - t0) / 60
    if "paradigm" in report:  # the argument, last, where the reader looks
        print(f"\n== the table (also {out / 'paradigm.md'}, plotted in {out / 'paradigm.png'})")
        print(report["paradigm"]["table"])
    report["phases"] = phases
    print(f"\ndemo finished in {report['minutes']:.1f} minutes; runs in {out}")
    print("   time per phase: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()))
    from .next_steps import next_commands, print_next

    kept = report.get("transfer", {}).get("classifiers", {})
    clf = kept.get("bert-mini") or next(iter(kept.values()), None)
    report["next"] = next_commands(runs["gpt-mini"], runs["bert-mini"], clf, trained[0]["tokens"])
    print_next(report["next"])
    return report


def _train_seconds(run: Path, tokens: int, fallback: float) -> float:
    """A run's training seconds: its tokens at the last logged throughput (tok_per_s), so a run
    reused from an earlier demo still counts its time; the measured seconds when nothing is logged."""
    import json

    try:
        for line in reversed((run / "metrics.jsonl").read_text().splitlines()):
            rate = json.loads(line).get("tok_per_s")
            if rate:
                return tokens / float(rate)
    except (OSError, ValueError):
        pass
    return fallback


def transfer_caveat(report: dict, full: bool) -> str | None:
    """When a mini's pre-training did not pay in the default demo, say why one should not
    conclude that pre-training does not pay: the budget, the single seed, and where to look."""
    from .transfer import pretraining_gains

    losing = [m for m, by_n in pretraining_gains(report["transfer"]["summary"]).items()
              if any(g < 0 for g in by_n.values())]
    if full or not losing:
        return None
    how = []
    for m in losing:
        r = report.get(m, {})
        if r.get("unigram_entropy") is not None and r.get("lm_loss") is not None:
            how.append(f"{m} {r['unigram_entropy'] - r['lm_loss']:.2f} nats below the unigram entropy")
    return (f"note: in some cells above pre-training lost to training from scratch ({', '.join(losing)}). "
            f"The pre-training here is a few minutes on about 1M tokens"
            + (f" ({'; '.join(how)})" if how else "")
            + ", and each cell is one seed of 50-130 fine-tuning steps, which moves by several points. "
            "all-MiniLM-L6's rows above are what a real pre-training budget buys over the same architecture "
            "from scratch; `pretune demo --full` runs three seeds and all labels; docs/finetuning.md "
            "reports what was tried to make the minis' own pre-training pay.")


def _show(runs: dict, smol=None) -> None:
    from ..models.load import load_model
    from ..inference.generate import fill_mask, generate
    from .others import blank_scores, next_tokens

    import torch

    model, cfg, tok = load_model(runs["gpt-mini"])
    print("\n== gpt-mini samples (temperature 0.8, top-k 50)")
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p)])
        y = generate(model, ids, 40, temperature=0.8, top_k=50, seed=0)
        print(f"  {p}|{tok.decode(y[0, ids.shape[1]:].tolist())}")
    model, cfg, tok = load_model(runs["bert-mini"])
    print("\n== bert-mini fill-mask")
    for t in MASKED:
        ans = fill_mask(model, tok, t, top_k=5)
        print(f"  {t}  ->  " + "; ".join(", ".join(f"{w} {p:.2f}" for w, p in a[:5]) for a in ans))
        if smol is not None and t in SCALE_PROMPTS:  # the same question to a model pre-trained at scale
            prompt = SCALE_PROMPTS[t]
            top = next_tokens(*smol, prompt, 5)
            print(f"  SmolLM2-135M (pre-trained on ~2T tokens), next tokens after '{prompt}':  "
                  + ", ".join(f"{w!r} {p:.2f}" for w, p in top))
            print(f"  SmolLM2-135M, the blank's candidates scored in the whole sentence:  "
                  + ", ".join(f"{w} {p:.2f}" for w, p in blank_scores(*smol, t)))
    print()
