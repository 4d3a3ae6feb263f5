"""Training recipes: each family's published optimiser and schedule, as TrainConfig defaults.

A preset names its recipe (`ModelConfig.recipe`); `TrainConfig.for_model` lays the
recipe under the caller's settings and the user's `--train.*` options, so any field
stays overridable (`--train.beta2 0.95` wins over BERT's 0.999). Each number cites
where it was published; where a paper is silent the released code is cited instead.

A config without a recipe (a custom shape, an import, a config.json written before
recipes existed) gets its family's by shape (`recipe_name`): an encoder is BERT, a
post-LN decoder GPT-1, an RMSNorm decoder Llama, any other decoder GPT-2/3.

Weight decay (`no_decay`: which kinds of parameter AdamW leaves alone). All four
families decay every weight matrix, embeddings included, and none of the biases and
norm gains:
  GPT-1   "modified L2 regularization ... w = 0.01 on all non bias or gain weights"
          (Radford et al. 2018, sec. 4.1); openai/finetune-transformer-lm opt.py decays
          every tensor of rank > 1 (`vector_l2` off), the token embedding included.
  BERT    google-research/bert optimization.py: `exclude_from_weight_decay=["LayerNorm",
          "layer_norm", "bias"]`: the word, position and segment embeddings are decayed.
  GPT-2/3 Brown et al. 2020, sec. B: "weight decay of 0.1", no word on which tensors.
          Megatron-LM and nanoGPT (`configure_optimizers`: every 2-D tensor, "all weight
          tensors in matmuls + embeddings decay, all biases and layernorms don't") decay
          the embeddings; that is the choice here. GPT-2's paper gives no optimiser at all
          (Radford et al. 2019), so the GPT-2 presets train by GPT-3's recipe.
  Llama   Touvron et al. 2023, sec. 2.2: "weight decay of 0.1"; no biases; as GPT-3.
Experts of a mixture follow their family: the stacked expert matrices and the router
decay, the stacked expert biases do not. Before recipes every family left the
embeddings undecayed: `--train.no-decay bias,norm,embedding` is that policy.

Warmup. The papers warm up for a fixed count (BERT 10,000 steps of 1,000,000; GPT-1
2,000 updates; GPT-3 375M tokens of 300B; Llama 2,000 steps), well under 1% of their
runs. A recipe gives that count; a run gets it, but never more than a tenth of its own
steps (`WARMUP_CAP`), so that a short run is not all warmup. At the papers' lengths the
cap does not bind. `--train.warmup N` sets it outright.
"""

from __future__ import annotations

import math
from typing import Any


WARMUP_CAP = 0.1  # a recipe's warmup is at most this fraction of the run's steps


# Fine-tuning a decoder classifier: GPT-1's, the one published for a GPT (GPT-2 and GPT-3
# were evaluated zero/few-shot, Brown et al. 2020 sec. 2). Radford et al. 2018, sec. 4.1:
# "a learning rate of 6.25e-5 and a batchsize of 32 ... 3 epochs ... a linear learning rate
# decay schedule with warmup over 0.2% of training. lambda was set to 0.5." Adam's betas,
# eps, L2 0.01 and the clip: openai/finetune-transformer-lm train.py / opt.py defaults.
_GPT1_FINETUNE = dict(lr=6.25e-5, batch_size=32, epochs=3.0, warmup=0.002, decay="linear", min_lr_ratio=0.0,
                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, no_decay="bias,norm", grad_clip=1.0)


RECIPES: dict[str, dict[str, Any]] = {
    # Radford et al. 2018, sec. 4.1: Adam, max lr 2.5e-4, "increased linearly from zero over the
    # first 2000 updates and annealed to 0 using a cosine schedule", L2 w = 0.01 on all non-bias,
    # non-gain weights. The paper gives no betas/eps: finetune-transformer-lm opt.py's 0.9/0.999/1e-8.
    "gpt1": dict(
        source="Radford et al. 2018, sec. 4.1; openai/finetune-transformer-lm",
        pretrain=dict(lr=2.5e-4, warmup_steps=2000, decay="cosine", min_lr_ratio=0.0, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.01, no_decay="bias,norm", grad_clip=1.0),
        finetune=_GPT1_FINETUNE),
    # Brown et al. 2020, sec. B: Adam beta1 0.9, beta2 0.95, eps 1e-8, clip 1.0, cosine decay to 10%
    # (over 260B of 300B tokens; here over the run), linear warmup over the first 375M tokens,
    # weight decay 0.1. The peak lr is GPT-3 Small's (Table 2.1: 6.0e-4; smaller for larger models).
    "gpt3": dict(
        source="Brown et al. 2020, sec. B and Table 2.1",
        pretrain=dict(lr=6e-4, warmup_tokens=375e6, decay="cosine", min_lr_ratio=0.1, beta1=0.9, beta2=0.95,
                      eps=1e-8, weight_decay=0.1, no_decay="bias,norm", grad_clip=1.0),
        finetune=_GPT1_FINETUNE),
    # Devlin et al. 2019, sec. A.2: "Adam with learning rate of 1e-4, beta1 = 0.9, beta2 = 0.999, L2
    # weight decay of 0.01, learning rate warmup over the first 10,000 steps, and linear decay of the
    # learning rate"; eps 1e-6, decay to 0 and the clip at 1.0: google-research/bert optimization.py.
    # Fine-tuning (sec. 4.1, A.3): batch 32, 3 epochs, lr from {5e-5, 4e-5, 3e-5, 2e-5}; 5e-5, warmup
    # 10% of the steps and the same optimiser are run_classifier.py's defaults.
    "bert": dict(
        source="Devlin et al. 2019, sec. 4.1, A.2, A.3; google-research/bert optimization.py, run_classifier.py",
        pretrain=dict(lr=1e-4, warmup_steps=10_000, decay="linear", min_lr_ratio=0.0, beta1=0.9, beta2=0.999,
                      eps=1e-6, weight_decay=0.01, no_decay="bias,norm", grad_clip=1.0),
        finetune=dict(lr=5e-5, batch_size=32, epochs=3.0, warmup=0.1, decay="linear", min_lr_ratio=0.0,
                      beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, no_decay="bias,norm", grad_clip=1.0)),
    # Touvron et al. 2023a (LLaMA), sec. 2.2: AdamW beta1 0.9, beta2 0.95, cosine to 10% of the peak,
    # weight decay 0.1, clip 1.0, 2,000 warmup steps; lr 3.0e-4 for 7B/13B (Table 2). eps 1e-5:
    # Touvron et al. 2023b (Llama 2), sec. 2.2.
    "llama": dict(
        source="Touvron et al. 2023a, sec. 2.2 and Table 2; Touvron et al. 2023b, sec. 2.2",
        pretrain=dict(lr=3e-4, warmup_steps=2000, decay="cosine", min_lr_ratio=0.1, beta1=0.9, beta2=0.95,
                      eps=1e-5, weight_decay=0.1, no_decay="bias,norm", grad_clip=1.0),
        finetune=_GPT1_FINETUNE),
}


STAGES = ("pretrain", "finetune")


FINETUNE_ONLY = ("epochs", "warmup")  # fine-tuning options of `finetune()`, not TrainConfig fields as given


def recipe_name(cfg) -> str:
    """The config's recipe: its own field, else its family's by shape."""
    if getattr(cfg, "recipe", None):
        return cfg.recipe
    if not cfg.causal:
        return "bert"
    if cfg.norm_placement == "post":
        return "gpt1"
    return "llama" if cfg.norm == "rmsnorm" else "gpt3"


def recipe_for(cfg, stage: str) -> dict[str, Any]:
    """The recipe's settings for a stage ("pretrain" or "finetune"), a fresh dict."""
    return dict(RECIPES[recipe_name(cfg)][stage])


def warmup_steps(recipe: dict, steps: int, tokens_per_step: int) -> int:
    """A pre-training recipe's warmup for a run of `steps` steps of `tokens_per_step` tokens:
    the paper's count (steps, or tokens turned into steps), at most WARMUP_CAP of the run."""
    if "warmup_tokens" in recipe:
        w = math.ceil(recipe["warmup_tokens"] / max(1, tokens_per_step))
    else:
        w = recipe["warmup_steps"]
    return min(w, int(steps * WARMUP_CAP))


def train_defaults(recipe: dict) -> dict[str, Any]:
    """The recipe's TrainConfig fields (its warmup count and fine-tuning-only options left out)."""
    return {k: v for k, v in recipe.items() if k not in ("warmup_steps", "warmup_tokens", *FINETUNE_ONLY)}
