"""Loading a trained model from a run directory: a pre-trained Transformer, or a fine-tuned
Classifier at its best checkpoint, with its tokenizer checked against the weights."""

from __future__ import annotations

from pathlib import Path

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..runs import checkpoint as ckpt
from ..runs.checkpoint import load_weights, require_checkpoint
from ..runs.layout import RunDir
from ..runs.resolve import resolve_model_config
from .heads import Classifier


def _weights_of(rd: RunDir, fix: str) -> Path:
    """A checkpoint folder itself (verified), else the run's latest good checkpoint."""
    if rd.is_checkpoint():
        ckpt.refuse_pickles(rd.root)
        problem = ckpt.verify(rd.root)
        if problem is not None:
            raise PretuneError(f"the checkpoint is unusable ({problem})", str(rd.root), "use another checkpoint")
        return rd.root
    return require_checkpoint(rd.root, fix)


def _with_weights(model, weights: str, device: str, where: str):
    """The loaded fp32 model in the chosen weights (models/quantize.py): fp32, bf16, int8, int4."""
    from .quantize import check_weights, quantize_model

    check_weights(weights, where)
    if weights != "fp32" and str(device) != "cpu":
        raise PretuneError(f"--weights {weights} runs on the CPU kernels only", where,
                           "use --weights fp32 on an accelerator, or run on the CPU")
    return quantize_model(model.to(device).eval(), weights)


def _packed(ck: Path, cfg: ModelConfig, weights: str | None, device: str, where: str):
    """The int4 model of a checkpoint holding int4 packs (`import --weights int4`, models/packed.py),
    built from them (no fp32 copy); None for an ordinary checkpoint. Other weights are refused:
    making them would mean dequantizing the packs, which the fp32 import does exactly."""
    stored = ckpt.stored_weights(ck)
    if stored == "fp32":
        return None
    if weights not in (None, stored):
        need = f"--weights {weights} needs" if weights != "fp32" else "fp32 weights, training and export need"
        raise PretuneError(f"the run holds {stored} weights (imported with --weights {stored}), not the floats "
                           f"{need}", where, f"pass --weights {stored} to generate, evaluate or serve; import "
                           f"the file again without --weights {stored} to fine-tune or export it")
    if str(device) != "cpu":
        raise PretuneError(f"--weights {stored} runs on the CPU kernels only", where, "run on the CPU")
    from .packed import load_packed
    return load_packed(cfg, ck)


def load_model(run_dir: str | Path, device: str = "cpu", weights: str | None = "fp32"):
    """(model, ModelConfig, tokenizer) from a run directory's latest good checkpoint, or from one
    checkpoint folder (self-contained: its model.json and tokenizer.json, else its run's).
    `weights`: fp32 (as trained), bf16, int8 or int4 (models/quantize.py; the CPU only); a run
    imported with `--weights int4` holds int4 packs and loads them, with weights int4 (or auto /
    None: the run's own, fp32 for any other run; the verbs' default). The default here is fp32:
    the library's other callers (fine-tuning, export, resuming) need the floats."""
    from .quantize import check_weights
    from .transformer import Transformer

    if weights is not None:
        check_weights(weights, str(run_dir))  # before any weights are read
    weights = None if weights == "auto" else weights
    rd = RunDir(run_dir)
    cfg_d = rd.read_config()
    if "task" in cfg_d:  # a fine-tuned run: the Transformer is its classifier's body (tasks/finetune.py)
        clf, cfg, tok, _ = load_classifier(run_dir, device, weights or "fp32")
        return clf.body, cfg, tok
    cfg = resolve_model_config(rd.root)
    ck = _weights_of(rd, "train the run first, or import weights into it")
    packed = _packed(ck, cfg, weights, device, str(rd.root))
    if packed is not None:
        return packed, cfg, rd.tokenizer()
    model = Transformer(cfg)
    load_weights(model, ck)
    return _with_weights(model, weights or "fp32", device, str(rd.root)), cfg, rd.tokenizer()


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


def _best_checkpoint(rd: RunDir | str | Path) -> Path | None:
    rd = rd if isinstance(rd, RunDir) else RunDir(rd)
    if rd.is_checkpoint():
        return _weights_of(rd, "")
    best = (rd.results() or {}).get("best_step")
    if best is not None:
        p = rd.checkpoint(best)
        if p.is_dir() and ckpt.verify(p) is None:
            return p
    return ckpt.latest_checkpoint(rd.root)


def load_classifier(run_dir: str | Path, device: str = "cpu", weights: str = "fp32", merge: bool = True):
    """(Classifier, ModelConfig, tokenizer, task info) of a fine-tuned run, at its best checkpoint
    (or of one checkpoint folder of it), its weights in `weights` (see load_model); a LoRA run's
    adapters merged into the body unless `merge` is False (then only in fp32). A fine-tuned run
    holds floats (training refuses int4 packs), so auto is fp32."""
    from .quantize import check_weights
    from .transformer import Transformer

    weights = "fp32" if check_weights(weights, str(run_dir)) == "auto" else weights
    rd = RunDir(run_dir)
    d = rd.read_config()
    if "task" not in d:
        raise PretuneError(f"not a fine-tuned run (its {rd.config_file.name} has no task)", str(rd.root),
                           "fine-tune it first with `pretune finetune --init RUN`")
    cfg = resolve_model_config(rd.root)
    ft = d.get("finetune", {})
    model = Classifier(Transformer(cfg), len(d["task"]["labels"]), pool=ft.get("head"),
                       kind=d["task"].get("kind", "single"), bias=ft.get("head_bias", True))
    lora = ft.get("adapter")
    if lora and not merge and weights != "fp32":
        raise PretuneError(f"--weights {weights} needs the LoRA adapters merged", str(rd.root),
                           "load with merge=True (the default), or use fp32 weights")
    if lora:  # the checkpoint holds the base and its adapters under their own keys (models/lora.py)
        from .lora import apply_lora
        apply_lora(model.body, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    ck = _best_checkpoint(rd)
    if ck is None:
        raise ckpt.no_checkpoint_error(rd.root, "run the fine-tuning (again) to write one")
    ckpt.load_weights(model, ck)
    if lora and merge:  # B A folded into W: plain Linears, as fast as the base (and what export writes)
        from .lora import merge_lora
        merge_lora(model)
    tok = rd.tokenizer()
    if tok is None:
        raise PretuneError("the run has no tokenizer.json", str(rd.root), "copy the pre-trained run's tokenizer.json")
    _check_tokenizer(tok, cfg, str(rd.root))
    return _with_weights(model, weights, device, str(rd.root)), cfg, tok, d["task"]
