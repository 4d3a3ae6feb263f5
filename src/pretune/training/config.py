"""TrainConfig, the learning-rate schedule, the parameter groups of AdamW and the device."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..errors import PretuneError
from .resume import RESUME_DELIBERATE, RESUME_FREE, allowed_changes


NO_DECAY_KINDS = ("bias", "norm", "embedding")


@dataclass
class TrainConfig:
    """How to train: the optimiser, the schedule, precision, logging and checkpoints.
    The defaults here are GPT-3's recipe; `for_model` gives a model its own family's (config/training_recipes.py)."""

    steps: int = 1000  # optimizer steps in all
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # tokens per sequence; None = the model's window
    lr: float = 6e-4  # peak learning rate (this and the optimiser's fields: the model's recipe, config/training_recipes.py)
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup: float = 100  # linear warmup steps; < 1: a fraction of the steps (recipe: the paper's, at most a tenth of the steps)
    decay: str = "cosine"  # cosine | linear (BERT) | constant
    weight_decay: float = 0.1  # AdamW's decoupled decay, on every parameter no_decay does not name
    no_decay: str = "bias,norm"  # kinds AdamW does not decay: bias, norm (gains), embedding; "" = none
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with dynamic loss scaling)
    eval_every: int = 100  # steps between validation-loss estimates; 0 = only at the end
    eval_batches: int = 10  # batches per validation estimate
    log_every: int = 10  # steps between metrics.jsonl lines (the loss is read only then)
    ckpt_every: int = 200  # steps between checkpoints; a final one is always written
    keep_last: int = 3  # checkpoints kept (plus the best by validation loss)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (opt-in)
    guard: bool = True  # roll back on a loss spike or a non-finite loss/gradient (training/hooks.py: LossGuard)
    guard_factor: float = 3.0  # a loss above this many times the recent median is a spike
    guard_window: int = 50  # steps in the recent median
    guard_lr_scale: float = 0.1  # after a rollback the lr is multiplied by this ...
    guard_cooldown: int = 50  # ... for this many steps, then ramps back to 1 over as many
    guard_max: int = 5  # rollbacks allowed; trouble once more stops the run
    parallel: str = "auto"  # auto | none | ddp | fsdp: data parallelism under torchrun (auto: ddp above one process)
    global_batch: int | None = None  # sequences per optimizer step over all ranks (sets grad_accum); None = batch_size x grad_accum x world
    log: str = "jsonl"  # jsonl | tensorboard (metrics.jsonl always; tensorboard adds event files under tb/)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    allow_change: str = ""  # on resume: comma-separated schedule options a rerun may change on purpose (lr, warmup...)

    def __post_init__(self):
        def bad(msg, fix):
            raise PretuneError(f"bad training option: {msg}", None, fix)
        for f in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, f) <= 0:
                bad(f"{f}={getattr(self, f)} must be positive", f"set --train.{f.replace('_', '-')} to 1 or more")
        if self.seq_len is not None and self.seq_len <= 1:
            bad(f"seq_len={self.seq_len} must be at least 2", "use the model's window or a smaller positive value")
        if not self.lr > 0 or not math.isfinite(self.lr):
            bad(f"lr={self.lr} must be a positive number", "use e.g. 3e-4")
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad(f"precision={self.precision!r} is unknown", "use fp32, bf16 or fp16")
        if self.decay not in ("cosine", "linear", "constant"):
            bad(f"decay={self.decay!r} is unknown", "use cosine, linear or constant")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            bad("warmup must be >= 0 and min_lr_ratio in [0, 1]", "fix the schedule options")
        # a whole number of steps; a fraction of the steps (fine-tuning's recipes: 0.002, 0.1) resolved here
        self.warmup = int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)
        kinds = [k for k in str(self.no_decay).split(",") if k.strip()]
        wrong = [k for k in kinds if k.strip() not in NO_DECAY_KINDS]
        if wrong:
            bad(f"no_decay={self.no_decay!r}: '{wrong[0]}' is not a kind of parameter",
                f"list some of {', '.join(NO_DECAY_KINDS)}, comma-separated (or '' to decay all)")
        if not self.guard_factor > 1 or self.guard_window < 3 or not 0 < self.guard_lr_scale <= 1 \
                or self.guard_cooldown < 0 or self.guard_max < 0:
            bad("guard_factor must be > 1, guard_window >= 3, guard_lr_scale in (0, 1], "
                "guard_cooldown and guard_max >= 0", "fix the --train.guard-* options")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            bad(f"parallel={self.parallel!r} is unknown", "use auto, none, ddp or fsdp")
        if self.log not in ("jsonl", "tensorboard"):
            bad(f"log={self.log!r} is unknown", "use jsonl or tensorboard")
        if self.global_batch is not None and self.global_batch <= 0:
            bad(f"global_batch={self.global_batch} must be positive", "set --train.global-batch to 1 or more")
        for k in self.allowed_changes():
            if k not in RESUME_DELIBERATE:
                bad(f"allow_change names '{k}', which a resume {'may change anyway' if k in RESUME_FREE else 'never changes'}",
                    f"--train.allow-change takes {', '.join(sorted(RESUME_DELIBERATE))} (docs/training.md)")

    def allowed_changes(self) -> list[str]:
        return allowed_changes(self.allow_change)

    @classmethod
    def from_overrides(cls, d: dict | None, **defaults) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for k in d or {}:
            if k not in known:
                raise PretuneError(f"unknown training option '{k}'", None, f"known: {', '.join(sorted(known))}")
        return cls(**{**defaults, **(d or {})})

    @classmethod
    def for_model(cls, model_cfg, d: dict | None = None, stage: str = "pretrain", **defaults) -> "TrainConfig":
        """The model's recipe for `stage` (pretrain | finetune; config/training_recipes.py), under the caller's
        `defaults` (a demo's tuned budget, finetune's steps), under the user's options `d`
        (--train.*): `--train.beta2 0.95` wins over any recipe."""
        from ..config.training_recipes import recipe_for, train_defaults, warmup_steps

        cls.from_overrides(d, **defaults)  # an unknown or bad option fails here, before the recipe is read
        recipe = recipe_for(model_cfg, stage)
        base = train_defaults(recipe)
        given = {**defaults, **(d or {})}
        if stage == "pretrain" and "warmup" not in given:
            dflt = {f.name: f.default for f in fields(cls)}
            get = lambda k: given.get(k, base.get(k, dflt[k]))
            tokens_per_step = get("batch_size") * get("grad_accum") * (get("seq_len") or model_cfg.max_seq_len)
            base["warmup"] = warmup_steps(recipe, get("steps"), tokens_per_step)
        return cls.from_overrides(d, **{**base, **defaults})


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine or linear decay to lr * min_lr_ratio.
    A pure function of the step, so a resumed run needs no scheduler state."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.decay == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    floor = tc.lr * tc.min_lr_ratio
    if tc.decay == "linear":
        return tc.lr - (tc.lr - floor) * progress
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)


def param_kind(mod: torch.nn.Module, name: str, p: torch.Tensor) -> str:
    """bias | norm | embedding | weight. A bias by name (the stacked expert biases of models/moe.py are
    (E, F)), a norm's gain by its module or by being 1-D, an embedding table by its module."""
    if name.endswith("bias"):
        return "bias"
    if isinstance(mod, _NORMS) or p.dim() < 2:
        return "norm"
    return "embedding" if isinstance(mod, torch.nn.Embedding) else "weight"


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: str = "bias,norm") -> list[dict]:
    """[decayed, not decayed]: every trainable parameter whose kind `no_decay` does not name is
    decayed. The recipes' "bias,norm" is GPT-1's "all non bias or gain weights" (Radford et al. 2018,
    sec. 4.1) and BERT's `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`: the
    embeddings decay (config/training_recipes.py). A tied W_e is one parameter, classed by the embedding table."""
    skip = {k.strip() for k in no_decay.split(",") if k.strip()}
    decay, keep, seen = [], [], set()
    for _, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (keep if param_kind(mod, name, p) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the decoupled weight decay of Loshchilov & Hutter (what GPT-1's "modified L2" and
    BERT's AdamWeightDecayOptimizer do), tc's betas and eps, decay on param_groups' first group."""
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    try:  # fused AdamW: one kernel for all parameters (CPU and CUDA in torch >= 2.4)
        return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.no_decay), fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.no_decay), foreach=True, **kw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PretuneError("device 'cuda' asked for, but no CUDA device is available", None, "use --train.device cpu")
    return torch.device(name)
