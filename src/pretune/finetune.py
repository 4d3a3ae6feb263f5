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

Training runs in the one loop (`train.Trainer`); early stopping is a hook on
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
import torch.nn as nn
import torch.nn.functional as F

from .config.model import ModelConfig
from .data.encoding import ClassificationBatches, Encoded, TextEncoder, eval_batches
from .data.labelled import Example, Task, load_task, read_labelled_file, subsample
from .errors import PretuneError
from .fileio import atomic_write_json, make_dir
from .models.heads import POOLS, Classifier
from .models.load import _check_tokenizer, load_classifier, load_model
from .objectives.finetuning import OBJECTIVES, finetune_loss
from .runs import checkpoint as ckpt
from .training.config import TrainConfig
from .training.hooks import EarlyStopping, Hook, KeepBest
from .training.loop import Trainer
from .training.resume import check_resume


def load_init(init: str | Path, scratch: bool = False, tokenizer: str | None = None, seed: int = 0):
    """(body Transformer, ModelConfig, tokenizer, NSP pooler state or None, where) to fine-tune from.

    init: a run directory (pretrain, import, or finetune: its body) or a preset name (random init).
    scratch: the run's architecture and tokenizer, randomly initialised (the experiment's baseline)."""
    from .config.presets import PRESETS, preset
    from .models.transformer import Transformer
    from .tokenizer.core import Tokenizer
    from .data.tokenizers import load_tokenizer

    p = Path(init)
    if str(init) in PRESETS and not (p / "config.json").exists():
        cfg = preset(str(init))
        tok = load_tokenizer(tokenizer or cfg.tokenizer)
        _check_tokenizer(tok, cfg, f"preset {init}")
        torch.manual_seed(seed)
        return Transformer(cfg), cfg, tok, None, f"{init} (random init)"
    if not (p / "config.json").exists():
        import difflib
        near = difflib.get_close_matches(str(init), PRESETS, n=2)
        raise PretuneError(f"--init '{init}' is neither a run directory nor a preset", None,
                           (f"did you mean {' or '.join(near)}? " if near else "")
                           + "give a folder made by `pretune pretrain` or `pretune import`, or a preset name")
    run_cfg = ckpt.read_run_config(p)
    own = Tokenizer.load(p) if (p / "tokenizer.json").exists() else None
    if "task" in run_cfg:  # a fine-tuned run: continue from its body (intermediate-task transfer)
        clf, cfg, _, _ = load_classifier(p)
        body = clf.body
    else:
        body, cfg, _ = load_model(p)
    tok = load_tokenizer(tokenizer) if tokenizer else own
    _check_tokenizer(tok, cfg, str(p), own if tokenizer else None)
    pooler = None
    if getattr(body, "nsp_head", None) is not None:  # the pooler moves into the classification head
        pooler = {k: v.clone() for k, v in body.nsp_head.pooler.dense.state_dict().items()}
    if scratch:
        torch.manual_seed(seed)
        body, pooler = Transformer(cfg), None
    return body, cfg, tok, pooler, f"{p}{' (architecture only, random init)' if scratch else ''}"


def build_classifier(body, cfg: ModelConfig, n_classes: int, pooler: dict | None = None,
                     dropout: float | None = None, pool: str | None = None) -> Classifier:
    """The body without its NSP head (its pooler, if any, initialises the head's) plus W_y."""
    body.train()
    if getattr(body, "nsp_head", None) is not None:
        body.nsp_head = None
    body.config = cfg.replace(nsp_head=False, **({"dropout": dropout} if dropout is not None else {}))
    if dropout is not None:
        for m in body.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        for b in body.blocks:
            b.attn.dropout = dropout
    clf = Classifier(body, n_classes, pool=pool)
    if pooler is not None and clf.head.pooler is not None:
        clf.head.pooler.load_state_dict(pooler)
    return clf


def freeze(model: Classifier, what: str | None) -> str:
    """requires_grad=False on the embeddings ("embeddings") or the embeddings and the lowest N blocks ("N").
    Must run before the optimizer is built (it only takes trainable parameters)."""
    if what in (None, "", "none", "0"):
        return "nothing"
    body = model.body
    emb = [m for m in (body.wte, body.wpe, body.wse, body.emb_norm) if m is not None]
    if what == "embeddings":
        mods, desc = emb, "the embeddings"
    else:
        try:
            k = int(what)
        except ValueError:
            raise PretuneError(f"--freeze {what!r} is not understood", None,
                               "use 'embeddings' or a number of lowest blocks N (embeddings included)")
        if not 0 <= k <= len(body.blocks):
            raise PretuneError(f"--freeze {k}: the model has {len(body.blocks)} blocks", None,
                               f"use 0 .. {len(body.blocks)}")
        mods, desc = emb + list(body.blocks[:k]), f"the embeddings and the lowest {k} blocks"
    for m in mods:
        for prm in m.parameters():
            prm.requires_grad_(False)
    return desc


# ---- evaluation -------------------------------------------------------------------

@torch.no_grad()
def predict(model: Classifier, enc: Encoded, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """P(y | x) for every example, (N, n_classes), in the order of `enc`."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.empty(len(enc), model.head.out.out_features)
    for idx, b in eval_batches(enc, batch_size, pad_id):
        logits, _ = model(b["input_ids"].to(dev), b["attention_mask"].to(dev), b["lengths"].to(dev),
                          b["segment_ids"].to(dev) if "segment_ids" in b else None, padded=b.get("padded"))
        out[torch.as_tensor(idx)] = logits.float().softmax(-1).cpu()
    model.train(was)
    return out


def classification_metrics(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted).
    Macro-F1 averages F1 over the classes present in y_true or y_pred, as scikit-learn's
    f1_score(average="macro") does; a class never predicted has precision 0."""
    y_true, y_pred = list(map(int, y_true)), list(map(int, y_pred))
    cm = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    n = len(y_true)
    f1s = []
    for c in sorted(set(y_true) | set(y_pred)):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(n_classes)) - tp
        fn = sum(cm[c]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / max(n, 1),
            "macro_f1": sum(f1s) / max(len(f1s), 1), "confusion": cm, "n": n}


def format_confusion(cm, labels) -> str:
    w = max(8, *(len(l) for l in labels)) + 1
    lines = ["true \\ predicted".ljust(w + 2) + "".join(l[:w].rjust(w) for l in labels)]
    for l, row in zip(labels, cm):
        lines.append(l[:w].ljust(w + 2) + "".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


def plot_confusion(cm, labels, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runs.plots import save_figure

    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, cm[i][j], ha="center", va="center", color="white" if cm[i][j] > top / 2 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)


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
    batch_size and weight_decay left None are the body's fine-tuning recipe (recipes.py).

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
    from .config.training_recipes import recipe_for
    recipe = recipe_for(cfg, "finetune")  # GPT-1's for a decoder, BERT's for an encoder
    lr, epochs, warmup, batch_size, weight_decay = (recipe[k] if v is None else v for k, v in (
        ("lr", lr), ("epochs", epochs), ("warmup", warmup), ("batch_size", batch_size),
        ("weight_decay", weight_decay)))
    if pool is not None and pool not in POOLS:
        raise PretuneError(f"unknown pooling '{pool}'", None, f"use one of {', '.join(POOLS)}")
    if pool == "cls" and cfg.causal:
        raise PretuneError("a decoder has no [CLS] token to pool", str(init), "use --pool last or --pool mean")
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
        from .training.hooks import MoEStatsHook
        hooks.append(MoEStatsHook())
    if tc.guard:  # as in pre-training: roll back on a non-finite loss or a spike, skip the data, lower the lr
        from .training.guard import LossGuard
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
        pool: what W_y reads: last (decoder default), cls (encoder default) or mean (over the real tokens)
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


# ---- using a fine-tuned run -----------------------------------------------------------

def _read_texts(texts: list[str], pair: bool, text_columns) -> list[tuple[str, str | None]]:
    """Texts from the command line: each argument a text ("A<TAB>B" for a pair task),
    "@FILE" (.txt: one per line; .csv/.tsv/.jsonl: the task's text column(s)), "-" stdin."""
    out = []
    for s in texts:
        if s == "-":
            lines = sys.stdin.read().splitlines()
        elif s.startswith("@"):
            p = Path(s[1:])
            if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
                rows = read_labelled_file(p, text_columns or "text", None)
                out += [(a, b) for a, b, _ in rows]
                continue
            if not p.is_file():
                raise PretuneError("no such file", str(p), "give @FILE with one text per line")
            lines = p.read_text(encoding="utf-8").splitlines()
            lines = [l for l in lines if l.strip()]
        else:
            lines = [s]
        for l in lines:
            a, _, b = l.partition("\t") if pair else (l, "", "")
            if not a.strip() or (pair and not b.strip()):
                raise PretuneError("an empty text cannot be classified" if not pair else
                                   "a pair task needs two texts, separated by a tab", None,
                                   "give non-empty text" + (" as 'A<TAB>B'" if pair else ""))
            out.append((a.strip(), b.strip() if pair else None))
    if not out:
        raise PretuneError("no texts to classify", None, 'give texts, "@FILE" or "-" (stdin)')
    return out


def classify_cmd(texts: list[str], run: Path = Path("runs/finetune/movie-sentiment-gpt-mini"),
                 json_out: bool = False, batch_size: int = 64) -> list[dict]:
    """Classify texts with a fine-tuned run: the label and the probability of each label.

    Args:
        texts: the texts; "@FILE" reads a file (.txt one per line, or .csv/.jsonl), "-" reads stdin
        run: a run directory made by `pretune finetune`
        json_out: print JSON lines instead of a table
        batch_size: texts per forward pass
    """
    model, cfg, tok, info = load_classifier(run)
    pairs = _read_texts(texts, info.get("pair", False), info.get("text_columns"))
    max_len = json.loads((Path(run) / "config.json").read_text()).get("finetune", {}).get("max_len") \
        or model.body.max_positions
    te = TextEncoder(tok, cfg.causal, min(max_len, model.body.max_positions))
    enc = te.encode([Example(a, 0, b) for a, b in pairs], "texts")
    probs = predict(model, enc, te.pad_id, batch_size)
    labels = info["labels"]
    out = []
    for (a, b), p in zip(pairs, probs.tolist()):
        k = max(range(len(p)), key=p.__getitem__)
        rec = {"text": a if b is None else [a, b], "label": labels[k],
               "probabilities": {l: round(v, 4) for l, v in zip(labels, p)}}
        out.append(rec)
        if json_out:
            print(json.dumps(rec))
        else:
            others = sorted(((v, l) for l, v in zip(labels, p) if l != labels[k]), reverse=True)[:4]
            rest = "  ".join(f"{l} {v:.3f}" for v, l in others)
            text = a if b is None else f"{a} | {b}"
            print(f"{labels[k]:<12} {p[k]:.3f}   ({rest})   {text[:80]}")
    return out


def evaluate_cmd(run: Path = Path("runs/finetune/movie-sentiment-gpt-mini"), task: str | None = None, split: str = "test", text_column: str | None = None,
                 label_column: str | None = None, data: Path | None = None, json_out: bool = False) -> dict:
    """Evaluate a run: a fine-tuned one on a task (accuracy, macro-F1, confusion), a pre-trained LM on held-out text.

    Args:
        run: a run directory
        task: the task (default: the run's own); a .csv/.jsonl file is evaluated whole
        split: train, val or test, for a built-in task or the run's own
        text_column: a file's text column(s) (default: the run's)
        label_column: a file's label column (default: the run's, else 'label')
        data: for a pre-trained run: a folder made by `pretune prepare` (default: the run's own data)
        json_out: print JSON instead of a table
    """
    run = Path(run)
    d = ckpt.read_run_config(run)
    if "task" not in d:
        return _evaluate_lm(run, d, data, json_out)
    model, cfg, tok, info = load_classifier(run)
    labels = info["labels"]
    name = task or info["name"]
    tcols = text_column or ",".join(info.get("text_columns") or ["text"])
    lcol = label_column or info.get("label_column") or "label"
    p = Path(str(name))
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson", ".json") and p.exists():
        rows = read_labelled_file(p, tcols, lcol)
        index = {y: i for i, y in enumerate(labels)}
        unseen = sorted({y for _, _, y in rows if y not in index})
        if unseen:
            raise PretuneError(f"label '{unseen[0]}' was not seen in training (the run knows "
                               f"{', '.join(labels)})", str(p), "evaluate on the run's label set only")
        examples = [Example(a, index[y], b) for a, b, y in rows]
        where = str(p)
    else:
        if name == info["name"] and info.get("source") and Path(info["source"]).suffix and \
                Path(info["source"]).exists():  # the run's own user file: its split
            t = load_task(info["source"], tcols, lcol)
        else:
            t = load_task(name, tcols, lcol)
        if t.labels != labels:
            extra = sorted(set(t.labels) - set(labels))
            if extra:
                raise PretuneError(f"label '{extra[0]}' was not seen in training (the run knows "
                                   f"{', '.join(labels)})", str(name), "evaluate on a task with the run's labels")
            index = {y: i for i, y in enumerate(labels)}
            examples = [Example(e.text, index[t.labels[e.label]], e.text_b) for e in t.split(split)]
        else:
            examples = t.split(split)
        where = f"{t.name} {split}"
    max_len = d.get("finetune", {}).get("max_len") or model.body.max_positions
    te = TextEncoder(tok, cfg.causal, min(max_len, model.body.max_positions))
    enc = te.encode(examples, "texts")
    probs = predict(model, enc, te.pad_id)
    m = classification_metrics(enc.labels, probs.argmax(-1).tolist(), len(labels))
    m["where"] = where
    if json_out:
        print(json.dumps(m))
    else:
        print(f"{where}: accuracy {m['accuracy']:.1%}  macro-F1 {m['macro_f1']:.3f}  ({m['n']:,} examples)")
        print(format_confusion(m["confusion"], labels))
    return m


def _evaluate_lm(run: Path, d: dict, data: Path | None, json_out: bool) -> dict:
    """Validation loss (and perplexity, for L1) of a pre-trained run on a prepared data folder."""
    from .data.loaders import eval_batches as lm_eval_batches
    from .objectives.losses import pretrain_task_loss

    model, cfg, tok = load_model(run)
    data = Path(data or d.get("data") or "")
    if not (data / "meta.json").exists():
        raise PretuneError("no prepared data to evaluate on", str(data), "pass --data FOLDER made by `pretune prepare`")
    meta = json.loads((data / "meta.json").read_text())
    if meta.get("vocab_size", 0) > cfg.vocab_size:
        raise PretuneError(f"the data was tokenized with {meta['vocab_size']:,} tokens, the model has "
                           f"{cfg.vocab_size:,}", str(data), "prepare the data with the run's tokenizer")
    tc = d.get("train", {})
    seq_len = min(tc.get("seq_len") or cfg.max_seq_len, cfg.max_seq_len)
    losses, aux_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in lm_eval_batches(data, "val", tc.get("batch_size", 16), seq_len,
                                     n_batches=tc.get("eval_batches", 10), causal=cfg.causal):
            loss, _ = pretrain_task_loss(model, batch)  # the perplexity is of L1 alone, not the routers' aux
            losses += loss.item()
            aux_sum += float(model.moe_losses())
            n += 1
    val = losses / max(n, 1)
    m = {"val_loss": val, "batches": n, "data": str(data)}
    if cfg.n_expert:
        m["val_moe_aux"] = aux_sum / max(n, 1)
    if cfg.causal:
        m["perplexity"] = math.exp(val)
    print(json.dumps(m) if json_out else
          f"{run}: validation loss {val:.4f}" + (f", perplexity {m['perplexity']:.1f}" if cfg.causal else "")
          + f" on {data} ({n} batches)")
    return m
