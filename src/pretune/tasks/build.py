"""What fine-tuning starts from: the body (a pre-trained run, an import, a fine-tuned run's body,
or a preset's random init), the classifier built on it, and what is frozen."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..models.heads import Classifier
from ..models.load import _check_tokenizer, load_classifier, load_model
from ..models.lora import apply_lora, check_base, load_adapter, parse_targets, read_adapter


ADAPTER_FILE = "adapter.safetensors"  # a LoRA fine-tuned run's adapters and head, beside its checkpoints
from ..runs.layout import RunDir
from ..runs.resolve import resolve_model_config


def load_init(init: str | Path, scratch: bool = False, tokenizer: str | None = None, seed: int = 0):
    """(body Transformer, ModelConfig, tokenizer, NSP pooler state or None, where) to fine-tune from.

    init: a run directory (pretrain, import, or finetune: its body) or a preset name (random init).
    scratch: the run's architecture and tokenizer, randomly initialised (the experiment's baseline)."""
    from ..models.transformer import Transformer
    from ..data.tokenizers import load_tokenizer

    p = Path(init)
    rd = RunDir(p)
    if not rd.exists() and not (p / RunDir.LEGACY_CONFIG).is_file():  # a preset: the one resolver
        cfg = resolve_model_config(str(init), where="--init")
        tok = load_tokenizer(tokenizer or cfg.tokenizer)
        _check_tokenizer(tok, cfg, f"preset {init}")
        torch.manual_seed(seed)
        return Transformer(cfg), cfg, tok, None, f"{init} (random init)"
    run_cfg = rd.read_config()  # a Hugging Face folder: one line saying to import it
    own = rd.tokenizer()
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
                     dropout: float | None = None, pool: str | None = None, kind: str = "single",
                     bias: bool = True, head_dropout: float = 0.1) -> Classifier:
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
    clf = Classifier(body, n_classes, head_dropout=head_dropout, pool=pool, kind=kind, bias=bias)
    if pooler is not None and clf.head.pooler is not None:
        clf.head.pooler.load_state_dict(pooler)
    return clf


def freeze(model: Classifier, what: str | None) -> str:
    """requires_grad=False on the embeddings ("embeddings") or the embeddings and the lowest N blocks ("N").
    Must run before the optimizer is built (it only takes trainable parameters)."""
    if what in (None, "", "none", "0"):
        return "nothing"
    body = model.body
    emb = body.embedding_modules()  # W_e, a position table (positions.py), segments, the embedding norm
    if what == "embeddings":
        mods, desc = emb, "the embeddings"
    else:
        try:
            k = int(what)
        except ValueError:
            raise PretuneError(f"--finetune.freeze {what!r} is not understood", None,
                               "use 'embeddings' or a number of lowest blocks N (embeddings included)")
        if not 0 <= k <= len(body.blocks):
            raise PretuneError(f"--finetune.freeze {k}: the model has {len(body.blocks)} blocks", None,
                               f"use 0 .. {len(body.blocks)}")
        mods, desc = emb + list(body.blocks[:k]), f"the embeddings and the lowest {k} blocks"
    for m in mods:
        for prm in m.parameters():
            prm.requires_grad_(False)
    return desc


def _is_file(adapter: str) -> bool:
    return adapter != "lora"


def check_lora_spec(spec, init) -> None:
    """The LoRA options, refused in one line before anything is loaded: the adapter's kind or file,
    its base (by checksum), the targets."""
    if _is_file(spec.adapter):
        if not str(spec.adapter).endswith(".safetensors"):
            raise PretuneError(f"unknown adapter '{spec.adapter}'", None,
                               "use --finetune.adapter lora, or an adapter.safetensors file to continue from")
        _, settings = read_adapter(spec.adapter)
        check_base(settings, RunDir(init).weights_sha256(), str(spec.adapter))
    else:
        parse_targets(spec.lora_targets)
        if not isinstance(spec.lora_rank, int) or spec.lora_rank <= 0:
            raise PretuneError(f"--finetune.lora-rank {spec.lora_rank} must be a positive integer", None,
                               "e.g. --finetune.lora-rank 8")


def attach_lora(model: Classifier, spec, init_sha: str | None) -> dict:
    """LoRA adapters on the body (new, or an adapter file's on its own base); the head stays trainable."""
    if _is_file(spec.adapter):
        tensors, settings = read_adapter(spec.adapter)
        check_base(settings, init_sha, str(spec.adapter))
        s = apply_lora(model.body, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
        load_adapter(model, tensors)
        return s
    return apply_lora(model.body, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_targets)
