"""Pre-training: a fresh GPT (L1) or BERT (MLM + NSP), or any registered pre-training objective, on
prepared shards, through the one loop."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..fileio import check_creatable, make_dir
from ..runs.layout import RunDir
from ..runs.resolve import resolve_model_config
from .config import TrainConfig, resolve_device
from .hooks import Hook, default_hooks
from .loop import Trainer
from .resume import check_resume, data_fingerprint


def build_pretraining(model_cfg, tc: TrainConfig, data_dir: Path, seq_len: int, objective=None, tok=None):
    """(train batches, eval function, loss function) of the objective (an `Objective`; default: the
    model's own, `pretraining_objective`): its loader's batches, its task loss on a fixed validation set.
    `tok`: the data's tokenizer (loaded from data_dir if not given), for the loaders' special ids."""
    from ..data.loaders import training_batches
    from ..objectives.registry import pretraining_objective
    from ..tokenizer.core import Tokenizer

    from .distributed import current

    obj = objective or pretraining_objective(model_cfg)
    train = training_batches(obj.batches, data_dir, tc.batch_size, seq_len, tc.seed, tok or Tokenizer.load(data_dir))
    train.partition(current().rank, current().world, tc.grad_accum)  # this rank's share of each global batch

    def eval_fn_for(model):
        def eval_fn():
            # batches of the global batch, split as training splits it: the same at any world size
            G = tc.global_batch or tc.batch_size * tc.grad_accum * current().world
            return validation_loss(model, obj, data_dir, G, seq_len, tc.eval_batches, tc.grad_accum)
        return eval_fn

    return train, eval_fn_for, obj.loss


def validation_loss(model, objective, data_dir: Path, batch_size: int, seq_len: int, n_batches: int,
                    accum: int = 1) -> dict:
    """{"val_loss", "val_<part>" ...} of `objective` on its fixed validation batches of `batch_size`
    rows (the run's global batch: the same set at every world size and micro-batch). val_loss is
    the task loss alone (L1, MLM + NSP): a router's auxiliary losses are no part of the model's
    likelihood; they are logged apart, as val_moe_aux. Each rank evaluates its micro-batch-sized
    slices of each batch (part a W + r of A W, as training splits a global batch) and each term's
    mean over the batch is put together from the slices' counts (objectives.losses.loss_counts),
    all-reduced once: the one-process numbers, at a micro-batch's memory."""
    import numpy as np

    from ..data.loaders import validation_batches
    from ..objectives.losses import loss_counts
    from .distributed import current

    dp = current()
    P, dev = dp.world * accum, next(model.parameters()).device
    names: list[str] = []
    rows = []  # per batch: {term: [sum of n * mean, n]}
    for batch in validation_batches(objective.batches, data_dir, "val", batch_size, seq_len, n_batches=n_batches):
        G, acc = batch["input_ids"].shape[0], {}
        cuts = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(G), P)])
        for a in range(accum):
            lo, hi = int(cuts[a * dp.world + dp.rank]), int(cuts[a * dp.world + dp.rank + 1])
            b = {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() and v.shape[0] == G else v)
                 for k, v in batch.items() if k != "mlm_rows"}  # mlm_rows index the whole batch
            counts = loss_counts(b)
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
            loss, parts = objective.task_loss(model, b)
            aux = model.moe_losses()
            if torch.is_tensor(aux):
                parts["moe_aux"] = aux
                counts["moe_aux"] = torch.tensor(hi - lo)  # per row: an approximation beyond one process
            for k, v in parts.items():
                n = float(counts.get(k, hi - lo))
                s = acc.setdefault(k, [0.0, 0.0])
                s[0], s[1] = s[0] + float(v) * n, s[1] + n
                if k not in names:
                    names.append(k)
        rows.append(acc)
    names = sorted(names)
    t = torch.tensor([[r.get(k, [0.0, 0.0])[i] for k in names for i in (0, 1)] for r in rows],
                     dtype=torch.float64).reshape(len(rows), len(names), 2)
    t = dp.sum_cpu(t)
    means = t[..., 0] / t[..., 1].clamp_min(1)  # (batches, terms): each term's mean over each batch
    out = {f"val_{k}": float(means[:, i].mean()) for i, k in enumerate(names)}
    out["val_loss"] = float(sum(means[:, i] for i, k in enumerate(names) if k != "moe_aux").mean())
    return out


def pretrain(model_cfg, tc: TrainConfig, data_dir: Path, out: Path, progress: bool = True,
             hooks: list[Hook] | None = None, extra_config: dict | None = None,
             objective: str | None = None) -> dict:
    """Pre-train a fresh model (or resume `out`), returning the final metrics. `objective`: a
    pre-training objective's name in objectives/registry.py (default: the model's own, L1 for a
    decoder, MLM+NSP for an encoder); the run records it and resumes only with the same one."""
    from ..models.transformer import Transformer
    from ..objectives.registry import get, pretraining_objective
    from ..tokenizer.core import Tokenizer

    obj = get(objective, "pretrain") if objective is not None else pretraining_objective(model_cfg)

    from .distributed import setup

    out = Path(out)
    dp = setup(tc)  # torchrun's process group, if any; resolves --train.global-batch into grad_accum
    seq_len = tc.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise PretuneError(f"seq_len={seq_len} exceeds the model's window max_seq_len={model_cfg.max_seq_len}",
                           None, "lower --train.seq-len or raise --model.max-seq-len")
    tok = Tokenizer.load(data_dir)
    if tok.vocab_size > model_cfg.vocab_size:
        raise PretuneError(f"the data's tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{model_cfg.vocab_size}", str(data_dir),
                           f"set --model.vocab-size {tok.vocab_size} or prepare the data with the model's tokenizer")
    rd = RunDir(out)
    run_config = rd.portable({"model": model_cfg.to_dict(), "train": asdict(tc), "data": str(data_dir),
                              "data_sha256": data_fingerprint(data_dir),
                              "objective": obj.name, **(extra_config or {})})
    dp.check_same("configs", run_config)  # one line, exit 2, before anything is written
    changes = check_resume(out, run_config)  # before anything is built or written
    resolve_device(tc.device)  # a bad --train.device fails before the run directory is made
    torch.manual_seed(tc.seed)
    model = Transformer(model_cfg)
    train, eval_fn_for, loss_fn = build_pretraining(model_cfg, tc, data_dir, seq_len, obj, tok)
    if changes and dp.main:
        print(f"note: resuming {out} with changed options: {'; '.join(changes)}")
    if dp.main:  # only rank 0 writes the run's files
        make_dir(out, "the run directory")
        rd.write_config(run_config)
        if not rd.tokenizer_file.exists():
            tok.save(out)
    dp.barrier()
    all_hooks = default_hooks(model_cfg, tc, "pretrain", extra=hooks or (), seq_len=seq_len,
                              predicted=obj.predicted)
    trainer = Trainer(model, tc, train, loss_fn, out, eval_fn=None, hooks=all_hooks,
                      run_config=run_config, progress=progress,
                      tokens_per_batch=tc.batch_size * seq_len)
    trainer.eval_fn = eval_fn_for(trainer.model)
    return trainer.fit()


def default_data_dir(tokenizer: str, root: Path = Path("runs/data")) -> Path:
    return root / f"builtin-{tokenizer}"


def pretrain_cmd(model: str = "gpt-mini", arch: Annotated[ModelConfig, "model"] = None, train: TrainConfig = None,
                 data: Path | None = None, out: Path | None = None) -> dict:
    """Pre-train a GPT (L1) or BERT (MLM + NSP) from scratch; rerun the same command to resume.

    The optimiser and schedule are the preset's recipe (docs/training.md); --train.* overrides any.

    Args:
        model: a preset name (gpt-mini, bert-mini, gpt2, bert-base, ...), a run directory or a .json/.yaml model config
        data: a folder made by `pretune prepare` (default: the built-in corpus, prepared on first use)
        out: the run directory (default: runs/<model>)
    """
    cfg = resolve_model_config(model, arch or None)
    tc = TrainConfig.for_model(cfg, train)  # the preset's recipe under --train.* (config/training_recipes.py)
    out = Path(out or f"runs/{cfg.name}")
    check_creatable(out, "the run directory")  # before the built-in corpus is prepared
    if data is None:
        from ..data.prepare import prepare
        data = default_data_dir(cfg.tokenizer)
        if not (data / "meta.json").exists():
            prepare(["builtin"], cfg.tokenizer, data)
    final = pretrain(cfg, tc, Path(data), out)
    from .distributed import current
    if not current().main:
        return final
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()}))
    print(f"run directory: {out}")
    return final
