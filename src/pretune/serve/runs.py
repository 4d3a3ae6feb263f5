"""The runs a server holds: each loaded once at start, named by its folder's name, looked up by
that name only (a request never names a path: an unknown name is a 404, nothing is read)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PretuneError
from ..runs.layout import RunDir

class UnknownRun(LookupError):
    """A name that is not one of the loaded runs (404)."""


class Refused(ValueError):
    """A request the server will not serve as asked (400): one line saying why."""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Loaded:
    """One run: its model (a Transformer, or a Classifier for a fine-tuned run), what it can do."""
    name: str
    path: Path
    kind: str  # decoder | encoder | classifier
    model: object
    cfg: object
    tok: object
    info: dict = field(default_factory=dict)  # a fine-tuned run's task (labels, pair)
    source: dict = field(default_factory=dict)  # an imported run's pooling / normalize
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass at a time per model

    @property
    def capabilities(self) -> list[str]:
        if self.kind == "classifier":
            return ["classify", "metrics"]
        caps = ["generate"] if self.kind == "decoder" else (["fill-mask"] if self.model.lm_head is not None else [])
        return caps + ["similarity", "metrics"]

    def describe(self) -> dict:
        c = self.cfg
        d = {"name": self.name, "kind": self.kind, "capabilities": self.capabilities,
             "window": self.body.max_positions, "layers": c.n_layer, "d_model": c.d_model,
             "vocab_size": c.vocab_size}
        if self.kind == "classifier":
            d["labels"] = list(self.info["labels"])
            d["pair"] = bool(self.info.get("pair", False))
        return d

    @property
    def body(self):
        return self.model.body if self.kind == "classifier" else self.model


def load_runs(paths: list[Path], weights: str = "auto") -> dict[str, Loaded]:
    """name -> Loaded, in the order given; a second run of the same folder name gets '-2', '-3'.
    `weights`: auto (each run's own), fp32, bf16, int8 or int4 for every run (models/quantize.py), as `generate --weights`."""
    from ..models.load import load_classifier, load_model

    if not paths:
        raise PretuneError("no run given", "pretune serve", "name one or more run directories, e.g. runs/gpt-mini")
    out: dict[str, Loaded] = {}
    for p in paths:
        p = Path(p)
        rd = RunDir(p)
        if not rd.exists():
            raise PretuneError("the run directory does not exist", str(p), "give a folder made by pretrain, finetune or import")
        d = rd.read_config()
        base = re.sub(r"[^A-Za-z0-9._-]", "-", p.resolve().name).lstrip(".-_") or "run"
        name, i = base[:60], 2
        while name in out:
            name, i = f"{base[:56]}-{i}", i + 1
        if "task" in d:
            model, cfg, tok, info = load_classifier(p, weights=weights)
            out[name] = Loaded(name, p, "classifier", model, cfg, tok, info=info)
            continue
        model, cfg, tok = load_model(p, weights=weights)
        if tok is None:
            raise PretuneError("the run has no tokenizer.json", str(p), "re-create the run with pretrain or import")
        out[name] = Loaded(name, p, "decoder" if cfg.causal else "encoder", model, cfg, tok,
                           source=d.get("source") or {})
    return out


def get_run(runs: dict[str, Loaded], name: str, capability: str | None = None) -> Loaded:
    """The loaded run called `name`; a name that is not one (a path, a typo) is refused by name only."""
    r = runs.get(name) if isinstance(name, str) else None
    if r is None:
        shown = name if isinstance(name, str) and NAME.fullmatch(name) else repr(str(name)[:40])
        raise UnknownRun(f"unknown run {shown}: this server has {', '.join(runs) or 'none'}"
                          + ("" if NAME.fullmatch(str(name)) else " (runs are named, never given as paths)"))
    if capability and capability not in r.capabilities:
        can = [n for n, x in runs.items() if capability in x.capabilities]
        raise Refused(f"run {name} ({r.kind}) cannot {capability}"
                         + (f"; these can: {', '.join(can)}" if can else ""))
    return r
