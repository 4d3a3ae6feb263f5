"""Evaluating a pre-trained language model: validation loss (and perplexity, for L1) on prepared data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import PretuneError
from ..models.load import load_model
from ..models.quantize import weights_of
from ..runs.layout import RunDir


def _evaluate_lm(run: Path, d: dict, data: Path | None, json_out: bool, weights: str = "auto") -> dict:
    """Validation loss (and perplexity, for L1) of a pre-trained run on a prepared data folder."""
    from ..data.loaders import validation_batches
    from ..objectives.registry import body_objective

    model, cfg, tok = load_model(run, weights=weights)
    obj = body_objective(cfg, d)  # the run's recorded objective (derived for a run from before the field)
    data = Path(data or RunDir(run).path(d.get("data")) or "")  # the run records it relative to itself
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
        for batch in validation_batches(obj.batches, data, "val", tc.get("batch_size", 16), seq_len,
                                        n_batches=tc.get("eval_batches", 10)):
            loss, _ = obj.task_loss(model, batch)  # the perplexity is of L1 alone, not the routers' aux
            losses += loss.item()
            aux_sum += float(model.moe_losses())
            n += 1
    val = losses / max(n, 1)
    m = {"val_loss": val, "batches": n, "data": str(data), "weights": weights_of(model)}
    if cfg.n_expert:
        m["val_moe_aux"] = aux_sum / max(n, 1)
    if obj.perplexity:
        m["perplexity"] = math.exp(val)
    print(json.dumps(m) if json_out else
          f"{run}: validation loss {val:.4f}" + (f", perplexity {m['perplexity']:.1f}" if obj.perplexity else "")
          + f" on {data} ({n} batches)")
    return m
