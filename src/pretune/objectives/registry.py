"""The objectives, one entry each: what a run minimises, what batches it reads, what share of
positions its LM head predicts (what FLOPs and MFU count), whether a perplexity means anything,
and, for a pre-training objective, how fine-tuning feeds its body and what L3 adds to L2.

    L1       next-token log-likelihood (Radford et al. 2018, eq. 1)                pre-training
    MLM+NSP  masked-LM on 15% of the tokens + next-sentence prediction (Devlin et al. 2019)
    L2       log-likelihood of the label (Radford et al. 2018, eq. 4)              fine-tuning
    L3       L2 + lambda * the body's own LM loss (eq. 5; MLM for an encoder)

A run records its objective by name (`run config["objective"]`); the model config's `causal`
is the attention mask only. Runs from before the field have it derived once, by
`derived_objective`. To add an objective: one `register(Objective(...))` here, naming the loader
(`data.loaders.LOADERS`) its batches come from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PretuneError
from .losses import l1_loss, l3_loss, label_loss, mlm_loss, mlm_nsp_loss, next_token_loss, shift_targets, weighted
from .masking import MLM_P


TEMPLATES = ("decoder", "encoder")  # data.encoding.TextEncoder: <s> A <e>, [CLS] A [SEP]


@dataclass(frozen=True)
class Objective:
    """One objective. A pre-training one has `task_loss` and `batches`; a fine-tuning one has `build`."""

    name: str
    stage: str                                   # "pretrain" | "finetune"
    task_loss: Callable | None = None            # (model, batch) -> (loss, parts), without any router loss
    batches: str | None = None                   # the loader of its batches: a name in data.loaders.LOADERS
    predicted: float = 1.0                       # share of positions the LM head runs on (FLOPs, MFU)
    perplexity: bool = False                     # exp(loss) is a perplexity (a likelihood of every token)
    template: str | None = None                  # the fine-tuning input of its body: one of TEMPLATES
    aux_lm: Callable | None = None               # L3's term: (classifier, batch, h) -> (part, loss, router loss)
    aux_name: str | None = None                  # that term's name in a fine-tuning run ("L1", "MLM")
    aux_masks: bool = False                      # the term reads a BERT-masked copy of the text ([MASK])
    build: Callable | None = None                # fine-tuning: build(lam, body_objective) -> loss_fn

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        """What pre-training minimises: the task loss plus a mixture-of-experts model's routers'
        auxiliary losses (in parts as `moe_aux`)."""
        loss, parts = self.task_loss(model, batch)
        aux = model.moe_losses()
        if torch.is_tensor(aux):
            aux = weighted(batch, "moe_aux", aux)
            parts["moe_aux"] = aux
            loss = loss + aux
        return loss, parts


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add (or replace) an objective; returns it."""
    if objective.stage not in ("pretrain", "finetune"):
        raise ValueError(f"objective {objective.name}: stage must be pretrain or finetune")
    if objective.template is not None and objective.template not in TEMPLATES:
        raise ValueError(f"objective {objective.name}: template must be one of {TEMPLATES}")
    OBJECTIVES[objective.name] = objective
    return objective


def names(stage: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, o in OBJECTIVES.items() if stage is None or o.stage == stage)


def get(name: str, stage: str | None = None) -> Objective:
    """The objective `name` (of `stage`, if given); an unknown one fails in one line naming the near ones."""
    known = names(stage)
    if name not in known:
        lower = {k.lower(): k for k in known}
        near = [lower[k] for k in difflib.get_close_matches(str(name).lower(), lower, n=2)]
        listed = ", ".join(known[:-1]) + " or " + known[-1] if len(known) > 1 else ", ".join(known)
        raise PretuneError(f"unknown objective '{name}'", None,
                           (f"did you mean {' or '.join(near)}? " if near else "") + f"use {listed}")
    return OBJECTIVES[name]


def derived_objective(cfg) -> str:
    """The pre-training objective of a model that records none (runs from before the field, imports,
    presets): the one its LM head trains, L1 for a next-token head, MLM+NSP for an MLM head; a model
    without an LM head is named by its family, as before (the decoder's L1, the encoder's MLM+NSP)."""
    head = getattr(cfg, "lm_head", None)
    if isinstance(head, str):  # a named head kind
        return "L1" if head == "next-token" else "MLM+NSP"
    return "L1" if cfg.causal else "MLM+NSP"


def pretraining_objective(cfg, recorded: str | None = None) -> Objective:
    """The pre-training objective of a body: `recorded` (a run's own) where that names one, else derived."""
    if recorded is not None and recorded in OBJECTIVES and OBJECTIVES[recorded].stage == "pretrain":
        return OBJECTIVES[recorded]
    return OBJECTIVES[derived_objective(cfg)]


def body_objective(cfg, run_config: dict | None = None) -> Objective:
    """The pre-training objective of a run's body: a fine-tuned run's `finetune.body_objective`, a
    pre-training run's `objective`, else (older runs, imports, presets) derived from its model config."""
    rc = run_config or {}
    ft = rc.get("finetune") if isinstance(rc.get("finetune"), dict) else {}
    return pretraining_objective(cfg, ft.get("body_objective") or rc.get("objective"))


def pretrain_task_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """The task loss of the model's own pre-training objective, without any router's auxiliary loss."""
    return pretraining_objective(model.config).task_loss(model, batch)


def pretrain_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """What pre-training the model's own objective minimises (`Objective.loss`)."""
    return pretraining_objective(model.config).loss(model, batch)


# ---- the pre-training objectives ----------------------------------------------------

def _l1_task(model, batch) -> tuple[torch.Tensor, dict]:
    loss = weighted(batch, "l1", l1_loss(model, batch["input_ids"], batch["targets"], batch.get("attention_mask")))
    return loss, {"l1": loss}


def _l1_aux(model, batch, h):
    """L1 on the labelled sequence, from the classifier's own h_n."""
    targets = shift_targets(batch["input_ids"], batch["attention_mask"])
    return "l1", next_token_loss(model.body, h, targets), None


def _mlm_aux(model, batch, h):
    """MLM on a masked copy of the labelled sequence (a second forward pass; its router losses too)."""
    body = model.body
    h2 = body(batch["mlm_input_ids"], segment_ids=batch.get("segment_ids"), attention_mask=batch["attention_mask"])
    return "mlm", mlm_loss(body, h2, batch["mlm_labels"], batch.get("mlm_rows")), model.moe_losses()


register(Objective("L1", "pretrain", task_loss=_l1_task, batches="windows", predicted=1.0, perplexity=True,
                   template="decoder", aux_lm=_l1_aux, aux_name="L1"))
register(Objective("MLM+NSP", "pretrain", task_loss=mlm_nsp_loss, batches="pairs", predicted=MLM_P,
                   perplexity=False, template="encoder", aux_lm=_mlm_aux, aux_name="MLM", aux_masks=True))


# ---- the fine-tuning objectives ------------------------------------------------------

def _finetune(with_lm: bool) -> Callable:
    def build(lam: float = 0.5, body_objective: Objective | None = None):
        """loss_fn(model, batch) -> (loss, parts) for the Trainer: L2, or L3 = L2 + lam * the body's LM term."""
        def loss_fn(model, batch):
            logits, h = model(batch["input_ids"], batch["attention_mask"], batch["lengths"], batch.get("segment_ids"),
                              padded=batch.get("padded"))
            l2 = weighted(batch, "l2", label_loss(getattr(model.head, "kind", "single"), logits, batch["labels"]))
            parts = {"l2": l2}
            loss = l2
            aux = model.moe_losses()
            if with_lm:
                pre = body_objective or pretraining_objective(model.body.config)
                part, lm, more = pre.aux_lm(model, batch, h)
                lm = weighted(batch, part, lm)
                parts[part] = lm
                if more is not None:
                    aux = aux + more
                loss = l3_loss(l2, lm, lam)
            if torch.is_tensor(aux):
                aux = weighted(batch, "moe_aux", aux)
                parts["moe_aux"] = aux
                loss = loss + aux
            return loss, parts
        return loss_fn
    return build


register(Objective("L2", "finetune", build=_finetune(False)))
register(Objective("L3", "finetune", build=_finetune(True)))
