"""What fine-tuning is asked to do (`--finetune.*`): the task, the objective, the head, how much of
the task and of the model it uses. How it trains (lr, batch size, seed, warmup, weight decay,
evaluations) is `TrainConfig`'s (`--train.*`), one knob per setting; fine-tuning's defaults for
those are `finetune_train_defaults` below."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import PretuneError


# The seed fine-tuning uses when --train.seed is not given (TrainConfig's own default, 1337, is
# pre-training's): it seeds W_y's initialisation, the order of batches and the subsample.
FINETUNE_SEED = 0


@dataclass
class FinetuneConfig:
    """A fine-tuning run besides its training options. `task` is the `--task` option itself."""

    task: str = "movie-sentiment"  # movie-sentiment, tweet-sentiment, sms-spam, trec, or a .csv/.tsv/.jsonl file (or a Task)
    objective: str = "L2"  # L2 (the label's log-likelihood) or L3 = L2 + lam * L1 (an encoder's L1 is MLM)
    lam: float = 0.5  # the weight of the auxiliary LM loss in L3 (0.5 in the GPT paper)
    epochs: float | None = None  # passes over the training examples (default: the recipe's, 3 in both papers)
    freeze: str | None = None  # 'embeddings', or N to freeze the embeddings and the lowest N blocks
    patience: int | None = None  # stop after this many evaluations without a better validation loss
    train_examples: int | None = None  # use only N labelled training examples (stratified, fixed by the seed)
    eval_examples: int | None = None  # validate on a fixed stratified subset of this many examples (default: all)
    max_len: int | None = None  # cut texts to this many tokens (default: the model's window)
    scratch: bool = False  # keep the init run's architecture and tokenizer but start from random weights
    tokenizer: str | None = None  # a tokenizer name or path (default: the init run's own; must match its vocabulary)
    dropout: float | None = None  # dropout in the body while fine-tuning (default: the checkpoint's)
    head_dropout: float = 0.1  # dropout before W_y (0.1 in both papers); 0 turns it off (runs compared across world sizes)
    pool: str | None = None  # what W_y reads: last (decoder default), cls (encoder default) or mean (over the real tokens)
    text_column: str = "text"  # a user file's text column, or two comma-separated for text pairs
    label_column: str = "label"  # a user file's label column
    label_kind: str | None = None  # single (one class), regression (a number: MSE) or multi (classes 'a|b': BCE); default: the task's, else single
    val: str | None = None  # the user's own validation file (with --test): used as given, no automatic split
    test: str | None = None  # the user's own test file (with --val)
    split_column: str | None = None  # a column of the task file naming each row's split (train, val, test)
    head_bias: bool | None = None  # a bias in W_y (default yes); false for a decoder that is to export to HF's *ForSequenceClassification (no bias in score)
    adapter: str | None = None  # 'lora' (train low-rank adapters and the head only), or an adapter.safetensors to continue from
    lora_rank: int = 8  # LoRA's rank r (Hu et al. 2021 use 8)
    lora_alpha: float = 16.0  # LoRA's alpha: the update is scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_targets: str = "all"  # all (every matrix of a block), or comma-separated: q, k, v, o (attention), gate, up, down (the MLP)

    @classmethod
    def from_overrides(cls, d: dict | None, **given) -> "FinetuneConfig":
        """The defaults under `given` (the verb's own options, e.g. task) under the user's `d`."""
        known = {f.name for f in fields(cls)}
        for k in d or {}:
            if k not in known:
                raise PretuneError(f"unknown fine-tuning option '{k}'", None, f"known: {', '.join(sorted(known))}")
        return cls(**{**given, **(d or {})})


def finetune_train_defaults(recipe: dict) -> dict:
    """Fine-tuning's defaults for the `--train.*` options it reads before training: the family's
    fine-tuning recipe (config/training_recipes.py) for lr, batch size, warmup (a fraction of the
    steps if < 1) and weight decay, and FINETUNE_SEED."""
    return {**{k: recipe[k] for k in ("lr", "batch_size", "warmup", "weight_decay")}, "seed": FINETUNE_SEED}


# ---- defaults from measurements ----------------------------------------------------------
# The published recipes (config/training_recipes.py) were made for BERT-base/large and GPT-1 (110M+
# parameters) on tens of thousands of labels. Where a size band was measured here, its settings
# replace the recipe's for what the user leaves unset (docs/finetuning.md, "Defaults from
# measurements": 3 seeds, the table and its command). A band is (family, smallest, largest
# parameter count, adapter); outside every band the family's published recipe stands. A LoRA run
# takes the full fine-tuning band's settings, then lr = models/lora.py's DEFAULT_LR (Hu et al.),
# then a LoRA band's settings over both.
MEASURED_BANDS = [
    # all-MiniLM-L6-v2 (22.6M) on movie-sentiment, 1,000 labels, 3 seeds: see the docs' table
    ("encoder", 10_000_000, 100_000_000, None, dict(lr=1e-4, batch_size=16, epochs=2.0)),
    # SmolLM2-135M (GGUF import) LoRA on movie-sentiment, 1,000 labels, 3 seeds: at lr 5e-4 and 2
    # epochs it was still learning at its last step (82.6% against full fine-tuning's 86.9%)
    ("decoder", 100_000_000, 400_000_000, "lora", dict(lr=1e-3, batch_size=16, epochs=3.0)),
]


def measured_band(cfg, adapter: str | None = None) -> dict:
    """The measured settings for `cfg`'s family and size, fully fine-tuned or with `adapter` ({}
    where nothing was measured for full fine-tuning)."""
    from ..models.counting import count_params
    from ..models.lora import DEFAULT_LR
    family, n = ("decoder" if cfg.causal else "encoder"), count_params(cfg)["total"]

    def band(kind):
        return next((dict(s) for f, lo, hi, a, s in MEASURED_BANDS if f == family and a == kind and lo <= n < hi), {})
    if adapter is None:
        return band(None)
    return {**band(None), "lr": DEFAULT_LR, **band(adapter)}


def default_pool(cfg, has_pooler: bool) -> str | None:
    """The readout a classifier of `cfg` gets when --finetune.pool is unset. An encoder whose
    checkpoint has no NSP pooler (a sentence encoder such as all-MiniLM: its [CLS] was never
    trained as a summary) in a measured band reads the mean of its tokens, the readout it was
    trained with; else None, the paper's own (models/heads.py: default_pooling)."""
    if not cfg.causal and not has_pooler and measured_band(cfg):
        return "mean"
    return None


def resolved_recipe(cfg, recipe: dict, adapter: str | None = None) -> dict:
    """The family's fine-tuning recipe with the measured band's settings (for `adapter`) over it."""
    return {**recipe, **measured_band(cfg, adapter)}
