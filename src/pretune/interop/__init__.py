"""Real pretrained weights in and out of the one `Transformer`.

    pretune import hf:DIR   --out RUN     a Hugging Face folder (config.json + model.safetensors)
    pretune import gguf:FILE --out RUN    a llama.cpp GGUF file (needs the `gguf` extra)
    pretune export RUN --format hf --out DIR

An import makes an ordinary run directory (run.json, tokenizer.json,
checkpoints/step-000000/ with model.safetensors and a manifest), so every verb
that takes a run takes it. The mapping of each architecture is in `hf_config.py`, `hf_weights.py` and
docs/interop.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import PretuneError

def _load_hf(path: str):
    from .hf_weights import load_hf_folder
    return load_hf_folder(path)


def _load_gguf(path: str):
    from .gguf import load_gguf
    return load_gguf(path)


# The importers: scheme -> (what it names, the loader, whether a bare path is one of them).
# A loader returns (model, tokenizer or None, info about the source). To add a format: one entry.
IMPORTERS: dict[str, tuple[str, Callable, Callable[[Path], bool]]] = {
    "hf": ("DIR", _load_hf, lambda p: p.is_dir()),
    "gguf": ("FILE", _load_gguf, lambda p: p.suffix == ".gguf"),
}
SOURCES = tuple(f"{k}:{what}" for k, (what, _, _) in IMPORTERS.items())


def source_kind(source: str) -> tuple[str, str]:
    """(scheme, path) of 'SCHEME:PATH' (IMPORTERS), or of a bare path one of them recognises."""
    kind, sep, rest = source.partition(":")
    if not sep or kind not in IMPORTERS:
        kind = next((k for k, (_, _, owns) in IMPORTERS.items() if owns(Path(source))), None)
        if kind is None:
            raise PretuneError(f"unknown source '{source}'", None, f"write {' or '.join(SOURCES)}")
        rest = source
    return kind, rest


def load_source(source: str):
    """(model, tokenizer or None, info) from 'SCHEME:PATH' (IMPORTERS), or a bare path one of them recognises."""
    kind, rest = source_kind(source)
    return IMPORTERS[kind][1](rest)


# What `import --weights` can keep in the run: the floats, or a GGUF file's 4-bit blocks as int4
# packs (models/packed.py). bf16 and int8 are cheap to make at load (`--weights` on the verbs).
IMPORT_WEIGHTS = ("fp32", "int4")


def _check_import_weights(weights: str, kind: str, where: str) -> None:
    if weights not in IMPORT_WEIGHTS:
        raise PretuneError(f"import --weights {weights} is not kept in a run (it keeps {' or '.join(IMPORT_WEIGHTS)})",
                           where, f"import as fp32 and pass --weights {weights} to generate, evaluate or serve")
    if weights == "int4" and kind != "gguf":
        raise PretuneError(f"import --weights int4 keeps a GGUF file's 4-bit blocks, and a {kind}: source holds "
                           "floats", where, "import it as fp32 and pass --weights int4 to generate, evaluate "
                           "or serve (they quantize at load)")


def write_run(out: str | Path, model, tok, source: dict, packed: tuple | None = None) -> Path:
    """A run directory holding `model` as step 0, built in a temporary sibling and renamed into place.
    `packed`: (ModelConfig, tensors) of int4 packs (models/packed.py) written instead; `model` None."""
    from ..runs.checkpoint import save_checkpoint
    from ..fileio import atomic_dir, make_dir
    from ..runs.layout import RunDir

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PretuneError("the run directory exists and is not empty", str(out),
                           "choose a new --out, or delete the folder")
    make_dir(out.parent, "the run directory", where=out)
    cfg = packed[0] if packed else model.config
    if tok is not None and cfg.tokenizer in ("run",):
        # the run's own tokenizer.json; load_tokenizer() accepts a path
        cfg = cfg.replace(tokenizer=RunDir.TOKENIZER)  # relative to the run: the run's own file
        if model is not None:
            model.config = cfg
    with atomic_dir(out, replace=False, what="the run directory") as tmp:
        RunDir(tmp).write_config({"model": cfg.to_dict(), "source": source,
                                  **({"weights": "int4"} if packed else {})})
        if tok is not None:
            tok.save(tmp)
        if packed:
            from ..models.packed import METADATA
            save_checkpoint(tmp, 0, None, tensors=(packed[1], METADATA))
        else:
            save_checkpoint(tmp, 0, model)
    return out


def import_cmd(source: str, out: Path | None = None, weights: str = "fp32") -> Path:
    """Import pretrained weights (a Hugging Face folder or a GGUF file) as a pretune run directory.

    Args:
        source: hf:DIR (config.json + model.safetensors) or gguf:FILE
        out: the run directory to create (default: runs/<source name>)
        weights: fp32 (dequantized, trainable), or int4: a GGUF file's Q4_0 / Q4_1 blocks kept as int4 packs, for generate/evaluate/serve --weights int4 (docs/interop.md)
    """
    kind, path = source_kind(source)
    _check_import_weights(weights, kind, source)
    if weights == "int4":
        from ..models.counting import count_params
        from .gguf_int4 import gguf_int4_state

        state, c, tok, info = gguf_int4_state(path)
        n_params = count_params(c)["total"]
        model = None
    else:
        model, tok, info = IMPORTERS[kind][1](path)
        c, n_params = model.config, model.num_params()
    if out is None:
        out = Path("runs") / (Path(info["path"]).stem.replace(".", "-") + ("-int4" if model is None else ""))
    run = write_run(out, model, tok, info, packed=None if model is not None else (c, state))
    kind = "decoder" if c.causal else "encoder"
    print(f"imported {info['architecture']} {kind}: {c.n_layer} layers, d={c.d_model}, {c.n_head} heads"
          f"{f' ({c.kv_heads} KV)' if c.kv_heads != c.n_head else ''}, vocab {c.vocab_size}, "
          f"{n_params / 1e6:.1f}M parameters"
          f"{f', int4 packs {sum(t.nbytes for t in state.values()) / 1e6:.0f} MB' if model is None else ''} -> {run}")
    if info.get("ignored"):
        print(f"ignored (nothing the model uses): {', '.join(info['ignored'])}")
    return run


def export_cmd(run: Path, out: Path | None = None, format: str = "hf") -> Path:
    """Export a run's latest checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer).

    Args:
        run: a run directory (pretrain, finetune or import)
        out: the folder to create (required)
        format: hf (the only format; see docs/interop.md for the architecture mapping)
    """
    if out is None:
        raise PretuneError("missing --out", "pretune export", "name the folder to create, e.g. --out exported/")
    if format != "hf":
        raise PretuneError(f"unknown export format '{format}'", None, "use --format hf")
    from ..models.load import load_model
    from ..runs.checkpoint import read_run_config
    from ..fileio import check_creatable
    check_creatable(out, "the export folder")  # before any weights are read
    from .hf_weights import export_hf
    from .hf_config import hf_class, hf_family

    rc = read_run_config(run)
    if "task" in rc:  # a fine-tuned run: its classifier, as *ForSequenceClassification
        return _export_classifier(run, out, rc)
    hf_family(read_config(run))  # refuse before loading any weights
    model, cfg, tok = load_model(run)
    src = read_run_config(run).get("source")
    path = export_hf(model, tok, out, {"pretune_run": str(Path(run).resolve()), **({"source": src} if src else {})})
    print(f"exported {run} as {hf_class(cfg, hf_family(cfg))} -> {path}")
    return path


def _export_classifier(run: Path, out: Path, rc: dict) -> Path:
    from ..models.load import load_classifier
    from ..runs.layout import RunDir
    from .hf_classifier import check_exportable, export_classifier
    check_exportable(read_config(run), rc.get("finetune", {}), str(run))  # before any weights are read
    model, cfg, tok, info = load_classifier(run)  # LoRA adapters merged
    ft = rc.get("finetune", {})
    src = {"pretune_run": str(Path(run).resolve()), "objective": rc.get("objective"), "adapter": ft.get("adapter")}
    path = export_classifier(model, tok, out, info, RunDir(run).results(), src)
    import json
    print(f"exported {run} as {json.loads((path / 'config.json').read_text())['architectures'][0]} "
          f"(with README.md, the model card) -> {path}")
    return path


def read_config(run: str | Path):
    from ..runs.resolve import resolve_model_config
    return resolve_model_config(Path(run), where=str(run))
