"""Supervised fine-tuning of a pre-trained GPT or BERT on a labelled task (L2, L3).

The classifier is the pre-trained Transformer (`body`) plus a linear output
layer W_y on one summary vector of the sequence (Radford et al. 2018, eq. 3):

    P(y | x^1..x^m) = softmax(h_l^m W_y)

decoder  h_l^m is h_n at the last real (non-pad) token, the extract token `<e>`,
         the only position that has seen the whole text;
encoder  the pooled [CLS]: tanh(h_[CLS] W_p + b_p) (Devlin et al. 2019, sec. 4.1).
         W_p starts from the NSP head's pooler when the checkpoint has one (BERT's own
         fine-tuning reuses it), else it is fresh.
mean     (`pool="mean"`, either family) the mean of h_n over the real tokens, as
         Sentence-BERT pools (Reimers & Gurevych 2019, sec. 3); what an encoder whose
         [CLS] learned little besides NSP, or a sentence encoder trained this way
         (all-MiniLM), classifies from best (docs/finetuning.md).

Dropout 0.1 sits before W_y, as in both papers. Objectives:

    L2 = sum log P(y | x)                            (eq. 4)
    L3 = L2 + lambda * L1(labelled text)             (eq. 5; lambda = 0.5 in the paper)

L1 is the next-token loss of the labelled sequence itself, read off the same
forward pass. An encoder has no L1: L3 there uses its own pre-training LM
objective, MLM (15% of the text's tokens masked as BERT masks them, a second
forward pass on the masked copy), as the auxiliary term. A mixture-of-experts
body adds its routers' auxiliary losses.

Training runs in the one loop (`training.loop.Trainer`); early stopping is a hook on
the validation loss, and the best checkpoint by validation loss is the one
tested and the one `classify` loads.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.encoding import ClassificationBatches, Encoded, TextEncoder
from ..data.labelled import Task, load_task, subsample
from ..errors import PretuneError
from ..evaluation.classification import classification_metrics, format_confusion, plot_confusion, predict
from ..fileio import atomic_write_json, make_dir
from ..models.heads import check_pooling
from ..objectives.finetuning import OBJECTIVES, finetune_loss
from ..runs import checkpoint as ckpt
from ..training.config import TrainConfig
from ..training.hooks import EarlyStopping, Hook, KeepBest
from ..training.loop import Trainer
from ..training.resume import check_resume
from .build import build_classifier, freeze, load_init


# ---- fine-tuning ----------------------------------------------------------------

def finetune(init: str | Path, task: str | Task, out: str | Path, objective: str = "L2", lam: float = 0.5,
             lr: float | None = None, epochs: float | None = None, warmup: float | None = None,
             batch_size: int | None = None,
             freeze_what: str | None = None, patience: int | None = None, train_examples: int | None = None,
             max_len: int | None = None, scratch: bool = False, seed: int = 0, tokenizer: str | None = None,
             dropout: float | None = None, text_column="text", label_column: str = "label",
             eval_examples: int | None = None, eval_every: int | None = None, weight_decay: float | None = None,
             train: dict | None = None, progress: bool = True, keep_checkpoints: bool = True,
             verbose: bool = True, pool: str | None = None, keep_weights: bool = False) -> dict:
    """Fine-tune and test; returns results.json's contents. Everything that can be wrong
    with the input is checked before the run directory is written. lr, epochs, warmup,
    batch_size and weight_decay left None are the body's fine-tuning recipe (config/training_recipes.py).

    keep_checkpoints=False (the transfer experiment) deletes the training checkpoints at the
    end; keep_weights=True then keeps the tested weights alone (no optimizer state) as
    checkpoints/step-BEST, so `classify` and `evaluate` can use the run."""
    t0 = time.time()
    out = Path(out)
    if objective not in OBJECTIVES:
        raise PretuneError(f"unknown objective '{objective}'", None, "use L2 or L3")
    if (lr is not None and not (lr > 0 and math.isfinite(lr))) or (epochs is not None and epochs <= 0) \
            or (batch_size is not None and batch_size <= 0) or (warmup is not None and warmup < 0):
        raise PretuneError("lr, epochs and batch size must be positive, warmup >= 0", None, "fix the options")
    if lam < 0:
        raise PretuneError(f"--lam {lam} is negative", None, "use lambda >= 0 (0.5 in the GPT paper)")
    if train_examples is not None and train_examples <= 0:
        raise PretuneError(f"--train-examples {train_examples} must be positive", None, "e.g. 100 or 1000")
    t = task if isinstance(task, Task) else load_task(task, text_column, label_column)
    body, cfg, tok, pooler, origin = load_init(init, scratch, tokenizer, seed)
    from ..config.training_recipes import recipe_for
    recipe = recipe_for(cfg, "finetune")  # GPT-1's for a decoder, BERT's for an encoder
    lr, epochs, warmup, batch_size, weight_decay = (recipe[k] if v is None else v for k, v in (
        ("lr", lr), ("epochs", epochs), ("warmup", warmup), ("batch_size", batch_size),
        ("weight_decay", weight_decay)))
    if pool is not None:
        check_pooling(pool, cfg.causal, "--pool", str(init))
    if objective == "L3" and not cfg.lm_head:
        raise PretuneError("L3 needs the model's LM head (L1 for a decoder, MLM for an encoder); this "
                           "checkpoint has none", str(init), "use --objective L2")
    if objective == "L3" and not cfg.causal and tok.mask_id is None:
        raise PretuneError(f"L3 on an encoder uses MLM, and the tokenizer '{tok.name}' has no [MASK]", str(init),
                           "use --objective L2")
    window = body.max_positions
    max_len = min(max_len or window, window)
    train_set = t.train
    if train_examples is not None:
        if train_examples < len(t.labels):
            raise PretuneError(f"--train-examples {train_examples} is fewer than the {len(t.labels)} classes",
                               None, f"use at least {len(t.labels)}")
        train_set = subsample(t.train, train_examples, len(t.labels), seed)
    val_set = subsample(t.val, eval_examples, len(t.labels), 0) if eval_examples else t.val
    if not val_set or not t.test:
        raise PretuneError("the task is too small to hold validation and test examples", t.name,
                           "give at least 10 examples per class")

    te = TextEncoder(tok, cfg.causal, max_len)
    enc_train = te.encode(train_set, "training texts", warn=False)
    enc_val = te.encode(val_set, "validation texts", warn=False)
    enc_test = te.encode(t.test, "test texts", warn=False)
    cut = enc_train.truncated + enc_val.truncated + enc_test.truncated
    if cut:  # once for the whole task
        print(f"warning: {cut:,} of {len(enc_train) + len(enc_val) + len(enc_test):,} texts were longer than "
              f"{max_len} tokens and were truncated (train {enc_train.truncated:,}, val {enc_val.truncated:,}, "
              f"test {enc_test.truncated:,})", file=sys.stderr)

    torch.manual_seed(seed)  # W_y's initialisation
    model = build_classifier(body, cfg, len(t.labels), pooler, dropout, pool)
    frozen = freeze(model, freeze_what)
    steps_per_epoch = math.ceil(len(enc_train) / batch_size)
    steps = max(1, math.ceil(epochs * steps_per_epoch))
    ev = eval_every or steps_per_epoch
    tc = TrainConfig.for_model(cfg, train, "finetune", steps=steps, batch_size=batch_size, lr=lr,
                               warmup=int(warmup * steps) if warmup < 1 else int(warmup),
                               weight_decay=weight_decay, eval_every=ev,
                               ckpt_every=ev if keep_checkpoints else steps, log_every=max(1, min(10, ev)),
                               keep_last=1, seed=seed, seq_len=max_len,
                               guard_cooldown=min(50, max(1, steps // 10)))
    mlm = None
    if objective == "L3" and not cfg.causal:
        mlm = {"mask_id": tok.mask_id, "vocab_size": tok.vocab_size, "special_ids": sorted(tok.special_ids)}
    batches = ClassificationBatches(enc_train, tc.batch_size, tc.seed, te.pad_id, mlm=mlm)

    ft = {"init": str(init), "origin": origin, "scratch": scratch, "objective": objective, "lam": lam,
          "freeze": frozen, "train_examples": len(enc_train), "max_len": max_len, "head": model.head.pool,
          "epochs": epochs, "aux_lm": ("L1" if cfg.causal else "MLM") if objective == "L3" else None,
          "examples_sha256": examples_fingerprint(enc_train)}
    run_config = {"model": model.config.to_dict(), "train": asdict(tc), "objective": objective,
                  "finetune": ft, "task": t.info()}
    changes = check_resume(out, run_config, finetune_options)
    if changes and verbose:
        print(f"note: resuming {out} with changed options: {'; '.join(changes)}")
    make_dir(out, "the run directory")
    atomic_write_json(out / "config.json", run_config)
    tok.save(out)

    loss_fn = finetune_loss(objective, lam)

    def eval_fn():
        probs = predict(model, enc_val, te.pad_id)
        y = torch.tensor(enc_val.labels)
        return {"val_loss": F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
                "val_acc": (probs.argmax(-1) == y).float().mean().item()}

    aux_note = f" (lambda {lam}, auxiliary {ft['aux_lm']})" if objective == "L3" else ""
    if verbose:
        print(f"fine-tuning {origin} on {t.name} ({len(t.labels)} classes; {len(enc_train):,} train / "
              f"{len(enc_val):,} val / {len(enc_test):,} test), {objective}"
              f"{aux_note}, "
              f"{steps} steps, frozen: {frozen}")
    keep = KeepBest()
    hooks: list[Hook] = [EarlyStopping(patience)] + ([] if keep_checkpoints else [keep])
    if cfg.n_expert:  # the routers' loads, drops and entropy, as in pre-training
        from ..training.hooks import MoEStatsHook
        hooks.append(MoEStatsHook())
    if tc.guard:  # as in pre-training: roll back on a non-finite loss or a spike, skip the data, lower the lr
        from ..training.guard import LossGuard
        # A classifier's loss heads for 0, where 3x the median is one misread batch: a spike must also
        # be above factor x ln K (a uniform guess). L3's L1 term keeps its median above that anyway.
        hooks.append(LossGuard(tc.guard_factor, tc.guard_window, tc.guard_lr_scale, tc.guard_cooldown, tc.guard_max,
                               floor=math.log(len(t.labels))))
    trainer = Trainer(model, tc, batches, loss_fn, out, eval_fn=eval_fn, hooks=hooks,
                      run_config=run_config, progress=progress)
    trainer.fit()
    best = trainer.best_step
    ck = out / "checkpoints" / f"step-{best:06d}" if best is not None else None
    if keep.state is not None and keep.step == best:
        model.load_state_dict(keep.state)
    elif ck is not None and ck.is_dir():
        ckpt.load_weights(model, ck)
    else:
        best = trainer.step
    probs = predict(model, enc_test, te.pad_id)
    test = classification_metrics(enc_test.labels, probs.argmax(-1).tolist(), len(t.labels))
    maj_label, maj_acc = t.majority_baseline("test")
    res = {"task": t.name, "labels": t.labels, "test": test, "best_step": best, "steps": trainer.step,
           "best_val_loss": trainer.best_val if math.isfinite(trainer.best_val) else None,
           "majority_baseline": {"label": maj_label, "accuracy": maj_acc},
           "train_examples": len(enc_train), "truncated": cut,
           "objective": objective, "lam": lam, "origin": origin, "seconds": time.time() - t0}
    atomic_write_json(out / "results.json", res)
    try:
        plot_confusion(test["confusion"], t.labels, out / "confusion.png",
                       f"{t.name}: test accuracy {test['accuracy']:.1%}, macro-F1 {test['macro_f1']:.3f}")
    except Exception as e:  # a plot must never lose a run
        print(f"note: could not draw the confusion matrix: {e}", file=sys.stderr)
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if keep_weights:  # the weights just tested, under the step results.json names (weights only)
            ckpt.save_checkpoint(out, best, model, keep_last=1)
    if verbose:
        print(f"test accuracy {test['accuracy']:.1%}  macro-F1 {test['macro_f1']:.3f}  ({test['n']:,} examples; "
              f"majority class '{maj_label}' {maj_acc:.1%}); best step {best} of {trainer.step}")
        print(format_confusion(test["confusion"], t.labels))
    return res


def examples_fingerprint(enc: Encoded) -> str:
    """SHA-256 of the training examples as the model reads them (token ids, segments, labels): the
    task's texts, the tokenizer, the cut to max_len and the subsample, in one identity."""
    import hashlib
    return hashlib.sha256(json.dumps([enc.ids, enc.segments, enc.labels]).encode()).hexdigest()


# config.json section, key -> the name a resume's refusal uses
_FT_OPTIONS = {("task", "name"): "task", ("task", "labels"): "labels", ("task", "pair"): "pair",
               ("task", "text_columns"): "text_column", ("task", "label_column"): "label_column",
               ("finetune", "lam"): "lam", ("finetune", "init"): "init", ("finetune", "scratch"): "scratch",
               ("finetune", "train_examples"): "train_examples", ("finetune", "max_len"): "max_len",
               ("finetune", "freeze"): "freeze", ("finetune", "head"): "pool",
               ("finetune", "examples_sha256"): "examples_sha256"}


def finetune_options(run_config: dict) -> dict:
    """What a fine-tuning resume compares besides the model and training options (`check_resume`):
    the task, the encoded training examples, the objective's lambda, the init, freezing, the head."""
    out = {}
    for (section, key), name in _FT_OPTIONS.items():
        d = run_config.get(section)
        if isinstance(d, dict) and key in d:
            out[name] = d[key]
    return out


def finetune_cmd(init: str = "runs/gpt-mini", task: str = "movie-sentiment", objective: str = "L2",
                 lam: float = 0.5, lr: float | None = None, epochs: float | None = None,
                 warmup: float | None = None, batch_size: int | None = None, freeze: str | None = None, patience: int | None = None,
                 train_examples: int | None = None, max_len: int | None = None, scratch: bool = False,
                 seed: int = 0, tokenizer: str | None = None, dropout: float | None = None,
                 text_column: str = "text", label_column: str = "label", eval_examples: int | None = None,
                 pool: str | None = None, train: TrainConfig = None, out: Path | None = None) -> dict:
    """Fine-tune a pre-trained run on a labelled task (L2 or L3) and report test accuracy, macro-F1, confusion.

    Args:
        init: a run directory (pretrain, import, finetune) or a preset name (random init: the baseline)
        task: movie-sentiment, tweet-sentiment, sms-spam, trec, or a .csv/.tsv/.jsonl file
        objective: L2 (the label's log-likelihood) or L3 = L2 + lam * L1 (an encoder's L1 is MLM)
        lam: the weight of the auxiliary LM loss in L3 (0.5 in the GPT paper)
        lr: peak learning rate, linear warmup then linear decay to 0 (default: the recipe's, 6.25e-5 for
            a GPT (GPT-1), 5e-5 for a BERT)
        epochs: passes over the training examples (default: 3, both papers)
        warmup: warmup, as a fraction of the steps if < 1, else a number of steps (default: 0.002 for a
            GPT (GPT-1), 0.1 for a BERT)
        batch_size: examples per step (default: 32, both papers)
        freeze: 'embeddings', or N to freeze the embeddings and the lowest N blocks
        patience: stop after this many evaluations (one per epoch) without a better validation loss
        train_examples: use only N labelled training examples (stratified, fixed by the seed)
        max_len: cut texts to this many tokens (default: the model's window)
        scratch: keep the init run's architecture and tokenizer but start from random weights
        seed: seeds the initialisation of the head, the order of batches and the subsample
        tokenizer: a tokenizer name or path (default: the init run's own; must match its vocabulary)
        dropout: dropout in the body while fine-tuning (default: the checkpoint's)
        text_column: a user file's text column, or two comma-separated for text pairs
        label_column: a user file's label column
        eval_examples: validate on a fixed stratified subset of this many examples (default: all)
        pool: what W_y reads: last (decoder default), cls (encoder default; [CLS] through BERT's tanh pooler) or mean (over the real tokens)
        out: the run directory (default: runs/finetune/<task>-<init name>)
    """
    if out is None:
        tname = Path(task).stem if Path(task).suffix else task
        out = Path("runs/finetune") / f"{tname}-{Path(str(init)).name}{'-scratch' if scratch else ''}"
    res = finetune(init, task, out, objective, lam, lr, epochs, warmup, batch_size, freeze, patience,
                   train_examples, max_len, scratch, seed, tokenizer, dropout, text_column, label_column,
                   eval_examples, train=train or None, pool=pool)
    print(f"run directory: {out} (results.json, confusion.png)")
    return res
