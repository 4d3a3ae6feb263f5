"""Loading a trained model from a run directory: a pre-trained Transformer, or a fine-tuned
Classifier at its best checkpoint, with its tokenizer checked against the weights."""

from __future__ import annotations

import json
from pathlib import Path

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..runs import checkpoint as ckpt
from ..runs.checkpoint import load_weights, read_run_config, require_checkpoint
from .heads import Classifier


def load_model(run_dir: str | Path, device: str = "cpu"):
    """(model, ModelConfig, tokenizer) from a run directory's latest good checkpoint."""
    from ..config.model import ModelConfig
    from .transformer import Transformer
    from ..tokenizer.core import Tokenizer

    cfg_d = read_run_config(run_dir)
    if "task" in cfg_d:  # a fine-tuned run: the Transformer is its classifier's body (tasks/finetune.py)
        clf, cfg, tok, _ = load_classifier(run_dir, device)
        return clf.body, cfg, tok
    cfg = ModelConfig.from_dict(cfg_d["model"], str(Path(run_dir) / "config.json"))
    model = Transformer(cfg)
    ck = require_checkpoint(run_dir, "train the run first, or import weights into it")
    load_weights(model, ck)
    tok = Tokenizer.load(run_dir) if (Path(run_dir) / "tokenizer.json").exists() else None
    return model.to(device).eval(), cfg, tok


# ---- building and loading ----------------------------------------------------------

def _check_tokenizer(tok, cfg: ModelConfig, where: str, reference=None) -> None:
    """A tokenizer that does not match the checkpoint's vocabulary is refused."""
    if tok is None:
        raise PretuneError("the run has no tokenizer.json", where, "pass --tokenizer with the run's vocabulary")
    if tok.vocab_size > cfg.vocab_size:
        raise PretuneError(f"the tokenizer '{tok.name}' has {tok.vocab_size:,} tokens, the checkpoint's "
                           f"embedding only {cfg.vocab_size:,}", where, "use the checkpoint's own tokenizer")
    if reference is not None and reference._tok.get_vocab() != tok._tok.get_vocab():
        raise PretuneError(f"the tokenizer '{tok.name}' does not match the checkpoint's vocabulary "
                           f"({reference.vocab_size:,} tokens in its tokenizer.json)", where,
                           "leave out --tokenizer to use the run's own")


def _best_checkpoint(run_dir: Path) -> Path | None:
    res = run_dir / "results.json"
    if res.exists():
        try:
            best = json.loads(res.read_text()).get("best_step")
        except ValueError:
            best = None
        if best is not None:
            p = run_dir / "checkpoints" / f"step-{best:06d}"
            if p.is_dir() and ckpt.verify(p) is None:
                return p
    return ckpt.latest_checkpoint(run_dir)


def load_classifier(run_dir: str | Path, device: str = "cpu"):
    """(Classifier, ModelConfig, tokenizer, task info) of a fine-tuned run, at its best checkpoint."""
    from .transformer import Transformer
    from ..tokenizer.core import Tokenizer

    run_dir = Path(run_dir)
    d = ckpt.read_run_config(run_dir)
    if "task" not in d:
        raise PretuneError("not a fine-tuned run (its config.json has no task)", str(run_dir),
                           "fine-tune it first with `pretune finetune --init RUN`")
    cfg = ModelConfig.from_dict(d["model"], str(run_dir / "config.json"))
    model = Classifier(Transformer(cfg), len(d["task"]["labels"]), pool=d.get("finetune", {}).get("head"))
    ck = _best_checkpoint(run_dir)
    if ck is None:
        raise ckpt.no_checkpoint_error(run_dir, "run the fine-tuning (again) to write one")
    ckpt.load_weights(model, ck)
    if not (run_dir / "tokenizer.json").exists():
        raise PretuneError("the run has no tokenizer.json", str(run_dir), "copy the pre-trained run's tokenizer.json")
    tok = Tokenizer.load(run_dir)
    _check_tokenizer(tok, cfg, str(run_dir))
    return model.to(device).eval(), cfg, tok, d["task"]
