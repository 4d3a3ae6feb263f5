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
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.encoding import ClassificationBatches, Encoded, TextEncoder
from ..data.labelled import Task, load_task, subsample
from ..errors import PretuneError
from ..evaluation.classification import (choose_threshold, format_confusion, kind_metrics, metrics_line,
                                         plot_confusion, predict)
from ..fileio import make_dir
from ..models.heads import check_pooling
from ..objectives.finetuning import finetune_loss
from ..objectives.registry import body_objective, get
from ..runs import checkpoint as ckpt
from ..runs.layout import RunDir
from ..training import distributed
from ..training.config import TrainConfig
from ..training.hooks import Hook, KeepBest, default_hooks
from ..training.selection import BY_ACCURACY, BY_LOSS
from ..training.loop import Trainer
from ..training.resume import check_resume
from .heap import return_freed_memory
from .build import ADAPTER_FILE, attach_lora, build_classifier, check_lora_spec, freeze, load_init
from ..models.lora import save_adapter
from .config import FINETUNE_SEED, FinetuneConfig, default_pool, finetune_train_defaults, resolved_recipe


# ---- fine-tuning ----------------------------------------------------------------

def finetune(spec: FinetuneConfig, train: dict | None, init: str | Path, out: str | Path, *,
             hooks: Sequence[Hook] = (), progress: bool = True, report: Callable[[str], None] | None = print) -> dict:
    """Fine-tune and test; returns results.json's contents. Everything that can be wrong
    with the input is checked before the run directory is written.

    spec: what to fine-tune on and how (`--finetune.*`, with `--task`); train: the `--train.*`
    overrides, over the body's fine-tuning recipe (config/training_recipes.py: lr, epochs, warmup,
    batch size, weight decay) and fine-tuning's seed; init: the run or preset whose weights start it.
    hooks: more training hooks (a KeepBest's in-memory weights, when it has the best step, are the
    ones tested: the transfer experiment writes no checkpoint per evaluation); report: where the
    run's summary lines go (None: nowhere; warnings go to stderr either way)."""
    t0 = time.time()
    out, train = Path(out), dict(train or {})
    objective, lam, task, train_examples = spec.objective, spec.lam, spec.task, spec.train_examples
    max_len, pool = spec.max_len, spec.pool
    get(objective, "finetune")  # an unknown one fails here, before anything is read
    lr, batch_size, warmup = train.get("lr"), train.get("batch_size"), train.get("warmup")
    if (lr is not None and not (lr > 0 and math.isfinite(lr))) or (spec.epochs is not None and spec.epochs <= 0) \
            or (batch_size is not None and batch_size <= 0) or (warmup is not None and warmup < 0):
        raise PretuneError("lr, epochs and batch size must be positive, warmup >= 0", None, "fix the options")
    if lam < 0:
        raise PretuneError(f"--finetune.lam {lam} is negative", None, "use lambda >= 0 (0.5 in the GPT paper)")
    if train_examples is not None and train_examples <= 0:
        raise PretuneError(f"--finetune.train-examples {train_examples} must be positive", None, "e.g. 100 or 1000")
    seed = train.get("seed", FINETUNE_SEED)
    t = task if isinstance(task, Task) else load_task(task, spec.text_column, spec.label_column, spec.label_kind,
                                                      spec.val, spec.test, spec.split_column)
    kind = t.kind
    if spec.label_kind is not None and spec.label_kind != kind:
        raise PretuneError(f"--finetune.label-kind {spec.label_kind} does not fit the task '{t.name}' ({kind})",
                           None, f"leave it out, or give a task of {spec.label_kind} labels")
    if spec.adapter is not None and not RunDir(init).exists():
        raise PretuneError("LoRA adapts pre-trained weights; a preset is a random init", str(init),
                           "give --init a run directory (pretrain, import or finetune)")
    if spec.adapter is not None:  # before the body is read: a bad setting is one line either way
        check_lora_spec(spec, init)
    body, cfg, tok, pooler, origin = load_init(init, spec.scratch, spec.tokenizer, seed)
    pre = body_objective(cfg, RunDir(init).read_config() if RunDir(init).exists() else None)
    from ..config.training_recipes import recipe_for
    # GPT-1's for a decoder, BERT's for an encoder; a measured size band's settings over it (tasks/config.py)
    # LoRA (new, or continued from an adapter file): its lr and band
    recipe = resolved_recipe(cfg, recipe_for(cfg, "finetune"), None if spec.adapter is None else "lora")
    if pool is None:
        pool = default_pool(cfg, pooler is not None)
    epochs = recipe["epochs"] if spec.epochs is None else spec.epochs
    batch_size = train.get("batch_size", recipe["batch_size"])
    if pool is not None:
        check_pooling(pool, cfg.causal, "--finetune.pool", str(init))
    if objective == "L3" and not cfg.lm_head:
        raise PretuneError("L3 needs the model's LM head (L1 for a decoder, MLM for an encoder); this "
                           "checkpoint has none", str(init), "use --finetune.objective L2")
    if objective == "L3" and pre.aux_masks and tok.mask_id is None:
        raise PretuneError(f"L3 on an encoder uses MLM, and the tokenizer '{tok.name}' has no [MASK]", str(init),
                           "use --finetune.objective L2")
    window = body.max_positions
    max_len = min(max_len or window, window)
    train_set, single = t.train, kind == "single"
    n_strata = len(t.labels) if single else 1  # regression, multi-label: subsets by the hash alone
    if train_examples is not None:
        if single and train_examples < len(t.labels):
            raise PretuneError(f"--finetune.train-examples {train_examples} is fewer than the {len(t.labels)} classes",
                               None, f"use at least {len(t.labels)}")
        train_set = subsample(t.train, train_examples, n_strata, seed, stratify=single)
    val_set = subsample(t.val, spec.eval_examples, n_strata, 0, stratify=single) if spec.eval_examples else t.val
    if not val_set or not t.test:
        raise PretuneError("the task is too small to hold validation and test examples", t.name,
                           "give at least 10 examples per class")

    te = TextEncoder(tok, pre.template, max_len)
    enc_train = te.encode(train_set, "training texts", warn=False)
    enc_val = te.encode(val_set, "validation texts", warn=False)
    enc_test = te.encode(t.test, "test texts", warn=False)
    cut = enc_train.truncated + enc_val.truncated + enc_test.truncated
    if cut:  # once for the whole task
        print(f"warning: {cut:,} of {len(enc_train) + len(enc_val) + len(enc_test):,} texts were longer than "
              f"{max_len} tokens and were truncated (train {enc_train.truncated:,}, val {enc_val.truncated:,}, "
              f"test {enc_test.truncated:,})", file=sys.stderr)

    torch.manual_seed(seed)  # W_y's initialisation
    head_bias = spec.head_bias is not False
    if not 0 <= spec.head_dropout < 1:
        raise PretuneError(f"--finetune.head-dropout {spec.head_dropout} is not in [0, 1)", None,
                           "use 0.1 (the papers') or 0 (off)")
    model = build_classifier(body, cfg, len(t.labels), pooler, spec.dropout, pool, kind, head_bias,
                             spec.head_dropout)
    frozen = freeze(model, spec.freeze)
    init_sha = RunDir(init).weights_sha256() if RunDir(init).exists() else None
    lora = None
    if spec.adapter is not None:
        lora = attach_lora(model, spec, init_sha)
        frozen = f"the body, but for LoRA adapters on {','.join(lora['adapted'])} (rank {lora['rank']})"
    # an epoch is counted in global batches: micro-batch x accumulation x world (training/distributed.py)
    per_step = train.get("global_batch") or batch_size * train.get("grad_accum", 1) * distributed.env_world()
    steps_per_epoch = math.ceil(len(enc_train) / per_step)
    steps = max(1, math.ceil(epochs * steps_per_epoch))
    ev = train.get("eval_every") or steps_per_epoch  # one evaluation per epoch
    tc = TrainConfig.for_model(cfg, train, "finetune", steps=steps, **finetune_train_defaults(recipe), eval_every=ev,
                               ckpt_every=ev, log_every=max(1, min(10, ev)), keep_last=1, seq_len=max_len,
                               guard_cooldown=min(50, max(1, steps // 10)))
    mlm = None
    if objective == "L3" and pre.aux_masks:
        mlm = {"mask_id": tok.mask_id, "vocab_size": tok.vocab_size, "special_ids": sorted(tok.special_ids)}
    dp = distributed.setup(tc)
    batches = ClassificationBatches(enc_train, tc.batch_size, tc.seed, te.pad_id, mlm=mlm)
    batches.partition(dp.rank, dp.world, tc.grad_accum)  # this rank's share of each global batch

    ft = {"init": str(init), "origin": origin, "scratch": spec.scratch, "objective": objective, "lam": lam,
          "freeze": frozen, "train_examples": len(enc_train), "max_len": max_len, "head": model.head.pool,
          "epochs": epochs, "aux_lm": pre.aux_name if objective == "L3" else None,
          "body_objective": pre.name,
          "examples_sha256": examples_fingerprint(enc_train),
          "init_sha256": init_sha, "kind": kind, "head_bias": head_bias,
          "adapter": None if lora is None else {"kind": "lora", "file": ADAPTER_FILE, **lora}}
    rd = RunDir(out)  # paths (the init, a task file) stored relative to the run directory
    run_config = rd.portable({"model": model.config.to_dict(), "train": asdict(tc), "objective": objective,
                              "finetune": ft, "task": t.info()})
    dp.check_same("configs", run_config)
    changes = check_resume(out, run_config, finetune_options)
    say = (report or (lambda line: None)) if dp.main else (lambda line: None)  # only rank 0 talks
    if changes:
        say(f"note: resuming {out} with changed options: {'; '.join(changes)}")
    if dp.main:
        make_dir(out, "the run directory")
        rd.write_config(run_config)
        tok.save(out)
    dp.barrier()

    loss_fn = finetune_loss(objective, lam, pre)

    def eval_fn():
        out = predict(model, enc_val, te.pad_id)
        y = torch.tensor(enc_val.labels)
        if kind == "regression":
            return {"val_loss": F.mse_loss(out[:, 0], y.float()).item()}
        if kind == "multi":
            return {"val_loss": F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), y.float()).item()}
        return {"val_loss": F.nll_loss(out.clamp_min(1e-12).log(), y).item(),
                "val_acc": (out.argmax(-1) == y).float().mean().item()}

    aux_note = f" (lambda {lam}, auxiliary {ft['aux_lm']})" if objective == "L3" else ""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = {"single": f"{len(t.labels)} classes", "regression": "regression",
            "multi": f"multi-label, {len(t.labels)} labels"}[kind]
    say(f"fine-tuning {origin} on {t.name} ({what}; {len(enc_train):,} train / "
        f"{len(enc_val):,} val / {len(enc_test):,} test), {objective}{aux_note}, {steps} steps, frozen: {frozen}; {trainable:,} trainable parameters")
    # early stopping, MoE statistics, the guard (floor ln K), then the caller's (e.g. a KeepBest)
    hooks = default_hooks(cfg, tc, "finetune", extra=hooks, patience=spec.patience,
                          n_labels=len(t.labels) if single else None)
    keep = next((h for h in hooks if isinstance(h, KeepBest)), None)
    trainer = Trainer(model, tc, batches, loss_fn, out, eval_fn=eval_fn, hooks=hooks,
                      run_config=run_config, progress=progress, select=BY_ACCURACY if single else BY_LOSS)
    return_freed_memory()  # the peak RSS is then what the step holds, not glibc's kept heap (tasks/heap.py)
    trainer.fit()
    best = trainer.best_step
    ck = rd.checkpoint(best) if best is not None else None
    if keep is not None and keep.state is not None and keep.step == best:
        model.load_state_dict(keep.state)
    elif ck is not None and ck.is_dir():
        ckpt.load_weights(model, ck)
    else:
        best = trainer.step
    threshold = choose_threshold(enc_val.labels, predict(model, enc_val, te.pad_id).numpy()) \
        if kind == "multi" else None  # chosen on validation, applied to test
    test = kind_metrics(kind, enc_test.labels, predict(model, enc_test, te.pad_id), len(t.labels), threshold)
    maj_label, maj_acc = t.majority_baseline("test")
    if lora is not None:
        save_adapter(model, out / ADAPTER_FILE, lora, init_sha, {"labels": t.labels, "kind": kind})
    res = {"task": t.name, "labels": t.labels, "kind": kind, "test": test, "best_step": best, "steps": trainer.step,
           "trainable_params": trainable, "threshold": threshold,
           "best_val_loss": trainer.best_val if math.isfinite(trainer.best_val) else None,
           "best_val_acc": -trainer.best_score[0] if single and trainer.best_score else None,
           "selected_by": trainer.select.describe(),
           "majority_baseline": {"label": maj_label, "accuracy": maj_acc},
           "train_examples": len(enc_train), "truncated": cut,
           "objective": objective, "lam": lam, "origin": origin, "seconds": time.time() - t0}
    if not dp.main:
        return res
    rd.write_results(res)
    say(f"test {metrics_line(kind, test)}  ({test['n']:,} examples"
        + (f"; majority class '{maj_label}' {maj_acc:.1%}" if single else "") + f"); best step {best} of {trainer.step}, by {trainer.select.describe()}")
    if not single:
        return res
    try:
        plot_confusion(test["confusion"], t.labels, out / "confusion.png",
                       f"{t.name}: test accuracy {test['accuracy']:.1%}, macro-F1 {test['macro_f1']:.3f}")
    except Exception as e:  # a plot must never lose a run
        print(f"note: could not draw the confusion matrix: {e}", file=sys.stderr)
    say(format_confusion(test["confusion"], t.labels))
    return res


def examples_fingerprint(enc: Encoded) -> str:
    """SHA-256 of the training examples as the model reads them (token ids, segments, labels): the
    task's texts, the tokenizer, the cut to max_len and the subsample, in one identity."""
    import hashlib
    return hashlib.sha256(json.dumps([enc.ids, enc.segments, enc.labels]).encode()).hexdigest()


# run.json section, key -> the name a resume's refusal uses
_FT_OPTIONS = {("task", "name"): "task", ("task", "labels"): "labels", ("task", "pair"): "pair",
               ("task", "text_columns"): "text_column", ("task", "label_column"): "label_column",
               ("finetune", "lam"): "lam", ("finetune", "init"): "init", ("finetune", "init_sha256"): "init",
               ("finetune", "scratch"): "scratch",
               ("finetune", "train_examples"): "train_examples", ("finetune", "max_len"): "max_len",
               ("finetune", "freeze"): "freeze", ("finetune", "head"): "pool",
               ("finetune", "examples_sha256"): "examples_sha256", ("finetune", "kind"): "label_kind",
               ("finetune", "adapter"): "adapter", ("finetune", "head_bias"): "head_bias"}


def finetune_options(run_config: dict) -> dict:
    """What a fine-tuning resume compares besides the model and training options (`check_resume`):
    the task, the encoded training examples, the objective's lambda, the init, freezing, the head."""
    out = {}
    ft = run_config.get("finetune") if isinstance(run_config.get("finetune"), dict) else {}
    for (section, key), name in _FT_OPTIONS.items():
        d = run_config.get(section)
        if section == "finetune" and key in ("init", "init_sha256"):
            continue
        if isinstance(d, dict) and key in d:
            out[name] = d[key]
    # the init: a run by its weights' SHA-256 (the same wherever the runs lie), a preset by its name;
    # a run from before init_sha256 recorded its path, relative to another folder: not compared
    if "init_sha256" in ft:
        out["init"] = ft["init_sha256"] if ft["init_sha256"] is not None else ft.get("init")
    elif "init" in ft:
        out["init_path"] = ft["init"]
    return out


def finetune_cmd(init: str = "runs/gpt-mini", task: str = "movie-sentiment", finetune: FinetuneConfig = None,
                 train: TrainConfig = None, out: Path | None = None, val: str | None = None,
                 test: str | None = None) -> dict:
    """Fine-tune a pre-trained run on a labelled task (L2 or L3) and report test accuracy, macro-F1, confusion.

    The optimiser and schedule are the body's fine-tuning recipe (GPT-1's for a decoder: lr 6.25e-5,
    warmup 0.2%; BERT's for an encoder: lr 5e-5, warmup 10%; batch 32, 3 epochs), with a measured
    size band's settings over it (an encoder of 10M-100M parameters: lr 1e-4, batch 16, 2 epochs,
    mean pooling without an NSP pooler; docs/finetuning.md, "Defaults from measurements"), seed 0,
    one evaluation per epoch; --train.* overrides any (--train.warmup < 1 is a fraction of the steps).

    Args:
        init: the run directory (pretrain, import, finetune) or the preset (random init: the baseline) whose
            weights start the fine-tuning
        task: movie-sentiment, movie-scores (regression), tweet-sentiment, sms-spam, trec, or a .csv/.tsv/.jsonl file
        val: the user's own validation file (with --test; the task file is then the training set, used as given)
        test: the user's own test file (with --val)
        out: the run directory (default: runs/finetune/<task>-<init name>)
    """
    spec = FinetuneConfig.from_overrides(finetune, task=task, val=val, test=test)
    if out is None:
        tname = Path(task).stem if Path(task).suffix else task
        out = Path("runs/finetune") / f"{tname}-{Path(str(init)).name}{'-scratch' if spec.scratch else ''}"
    res = _finetune(spec, train or None, init, out)
    if not distributed.current().main:
        return res
    print(f"run directory: {out} (results.json, confusion.png)")
    return res


_finetune = finetune  # the verb's `finetune` parameter (--finetune.*) shadows the function's name
