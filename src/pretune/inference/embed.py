"""Sentence embeddings: one vector per text, a "summary of the sequence" read off h_n.

    mean   the average of h_n over the real tokens (padding excluded), as
           sentence-transformers pools all-MiniLM-L6-v2 (Reimers & Gurevych 2019)
    cls    h_n at [CLS], the position BERT's pre-training makes a summary of the pair (encoders);
           the raw state: BERT's tanh pooler belongs to the classification head, not here
    last   h_n at the last real token, the only one that has seen the whole text (decoders)

The poolings are `models.heads.POOLINGS`, read through `models.heads.pool`, the one
definition the fine-tuning classifier reads too.

A run imported from a sentence-transformers folder remembers its pooling and
whether it L2-normalises (modules.json); those are the defaults here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PretuneError
from .texts import read_texts
from ..models import heads


@torch.no_grad()
def embed_texts(model, tok, texts: list[str], pooling: str = "mean", normalize: bool = False,
                batch_size: int = 32, max_len: int | None = None) -> torch.Tensor:
    """(N, d) float32 embeddings of `texts`, batched with padding that is never attended to."""
    c = model.config
    heads.check_pooling(pooling, c.causal, "--pooling")
    max_len = min(max_len or model.max_positions, model.max_positions)
    pad = tok.pad_id if tok.pad_id is not None else 0
    model.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok.encode_batch(list(texts[s:s + batch_size]))
        # truncate as Hugging Face does: keep the closing special token ([SEP]) if there is one
        enc = [e if len(e) <= max_len else
               (e[:max_len - 1] + e[-1:] if e[-1] in tok.special_ids else e[:max_len]) for e in enc]
        if any(len(e) == 0 for e in enc):
            raise PretuneError("an empty text has no embedding", None, "remove empty lines")
        T = max(map(len, enc))
        ids = torch.tensor([e + [pad] * (T - len(e)) for e in enc])
        mask = torch.tensor([[True] * len(e) + [False] * (T - len(e)) for e in enc])
        dev = next(model.parameters()).device
        h = model(ids.to(dev), attention_mask=mask.to(dev)).float()
        v = heads.pool(h, mask.to(dev).sum(1), pooling)  # padding is on the right: the real tokens are h[:, :length]
        out.append(F.normalize(v, dim=-1) if normalize else v)
    return torch.cat(out).cpu() if out else torch.zeros(0, c.d_model)


def embed_cmd(texts: list[str], run: Path = Path("runs/bert-mini"), pooling: str | None = None,
              normalize: bool | None = None, out: Path | None = None, batch_size: int = 32):
    """Sentence embeddings of texts: mean-pooled, [CLS] or last-token h_n, as JSON or .npy.

    Args:
        texts: the texts; "@FILE" reads one text per line of FILE, "-" reads stdin
        run: a run directory (pretrain, finetune or import)
        pooling: mean | cls (encoders) | last (decoders); default: what the run was imported with, else mean (encoders) or last (decoders)
        normalize: L2-normalise each vector; default: what the run was imported with, else no
        out: write here (.npy, or .json) instead of printing JSON
        batch_size: texts per forward pass
    """
    from ..models.load import load_model
    from ..runs.checkpoint import read_run_config
    from ..fileio import atomic_write_bytes, atomic_write_json, check_creatable

    if out is not None:
        check_creatable(out, "the embeddings file", folder=False)  # before the model is loaded
    src = read_run_config(run).get("source") or {}
    model, cfg, tok = load_model(run)
    if tok is None:
        raise PretuneError("the run has no tokenizer.json", str(run), "re-create the run with pretrain or import")
    texts = read_texts(list(texts), "embed")
    pooling = pooling or src.get("pooling") or heads.default_pooling(cfg.causal, "embed")
    normalize = bool(src.get("normalize", False)) if normalize is None else normalize
    emb = embed_texts(model, tok, texts, pooling, normalize, batch_size, src.get("max_seq_length"))
    if out is not None:
        out = Path(out)
        if out.suffix == ".npy":
            import numpy as np
            buf = io.BytesIO()
            np.save(buf, emb.numpy())
            atomic_write_bytes(out, buf.getvalue())
        else:
            atomic_write_json(out, {"pooling": pooling, "normalize": normalize, "texts": texts,
                                    "embeddings": emb.tolist()})
        print(f"{len(texts)} embeddings of {emb.shape[1]} dimensions ({pooling} pooling"
              f"{', normalised' if normalize else ''}) -> {out}")
    else:
        print(json.dumps(emb.tolist()))
    return emb
